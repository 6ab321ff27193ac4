"""Tests of the DCNv4 layers: against a float64 composition of their parts, initialisation, autocast,
memory format, official parameter layout and configuration errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from op_cases import OpLog
from unet_dcnv4.modules import DCNv4, DCNv4Conv2d
from unet_dcnv4.ops import dcnv4_reference


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Random weights everywhere, offsets large enough to leave the grid and the image."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _composition(m: DCNv4, x: torch.Tensor) -> torch.Tensor:
    """The layer written out from its parts with the reference op; x is (N, H, W, C_in)."""
    value = F.linear(x, m.value_proj.weight, m.value_proj.bias)
    off_in = x
    if m.dw_kernel_size is not None:
        off_in = F.conv2d(x.permute(0, 3, 1, 2), m.offset_mask_dw.weight, m.offset_mask_dw.bias,
                          padding=m.dw_kernel_size // 2, groups=m.in_channels).permute(0, 2, 3, 1)
    (sh, sw), (ph, pw) = m.stride, m.padding
    kh, kw = m.kernel_size
    H, W = x.shape[1:3]
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    rows = [min(max(i * sh - ph + (kh - 1) // 2, 0), H - 1) for i in range(Ho)]
    cols = [min(max(j * sw - pw + (kw - 1) // 2, 0), W - 1) for j in range(Wo)]
    off_in = off_in[:, rows][:, :, cols]
    om = F.linear(off_in, m.offset_mask.weight, m.offset_mask.bias)
    out = dcnv4_reference(value, om, m.kernel_size, m.stride, m.padding, 1, m.group, m.offset_scale,
                          m.remove_center)
    return F.linear(out, m.output_proj.weight, m.output_proj.bias)


@pytest.mark.parametrize("cin,cout,kwargs,hw", [
    (16, 32, dict(), (6, 7)),                                    # widening, like ResnetBlock2D.conv1
    (32, 4, dict(), (5, 5)),                                     # narrowing to latents, like conv_out
    (4, 32, dict(dw_kernel_size=3), (5, 6)),                     # like conv_in, depthwise offset branch
    (32, 32, dict(stride=2, group_channels=8), (7, 6)),          # like the downsample conv
    (16, 16, dict(padding=0, remove_center=True, offset_scale=0.5), (6, 6)),
    (16, 32, dict(bias=False, dw_kernel_size=3, stride=2), (7, 7)),  # no output bias, both offset inputs
])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_dcnv4conv2d_matches_float64_composition(cin, cout, kwargs, hw, memory_format):
    """Output and every gradient (input and parameters) against autograd through the composition: the
    layer's backward is written out by hand (csrc/layer.cpp), with matrix products on pixel rows for
    channels_last input and one per image for NCHW input."""
    torch.manual_seed(0)
    m = DCNv4Conv2d(cin, cout, 3, **kwargs).double()
    _randomise(m)
    x = torch.randn(2, cin, *hw, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_(True)
    y = m(x)
    expected = _composition(m, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(expected)
    inputs = [x, *m.parameters()]
    for got, want in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    conv = torch.nn.Conv2d(cin, cout, 3, stride=kwargs.get("stride", 1), padding=kwargs.get("padding", 1))
    assert y.shape == conv(x.float()).shape


def test_init_is_a_box_filter_between_the_projections():
    torch.manual_seed(0)
    m = DCNv4Conv2d(16, 32).double()
    m.reset_parameters()  # mask bias 1/K in float64, not a rounded float32
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    value = F.linear(x.permute(0, 2, 3, 1), m.value_proj.weight).permute(0, 3, 1, 2)  # biases start at 0
    box = F.conv2d(value, torch.full((32, 1, 3, 3), 1 / 9, dtype=torch.float64), padding=1, groups=32)
    expected = F.linear(box.permute(0, 2, 3, 1), m.output_proj.weight).permute(0, 3, 1, 2)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_every_parameter_learns_from_the_first_step_unlike_the_official_init():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5)
    ours, official = DCNv4Conv2d(16, 16, dw_kernel_size=3), DCNv4Conv2d(16, 16, official_init=True)
    ours(x).square().sum().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # The depthwise conv feeds the zero-initialised offset/mask weights: it learns from step two.
        assert (p.grad.abs().sum() > 0) == (not name.startswith("offset_mask_dw")), name
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    ours.zero_grad()
    ours(x).square().sum().backward()
    assert ours.offset_mask_dw.weight.grad.abs().sum() > 0
    y = official(x)
    assert torch.equal(y, torch.zeros_like(y))
    (y + 1).square().sum().backward()
    assert torch.equal(official.value_proj.weight.grad, torch.zeros_like(official.value_proj.weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("without_pointwise", [False, True])
def test_autocast_hands_the_op_one_dtype(dtype, without_pointwise):
    torch.manual_seed(0)
    m = DCNv4(16, dw_kernel_size=3, without_pointwise=without_pointwise)
    _randomise(m, scale=0.1)  # small offsets: half-precision rounding of a large offset moves the sample
    x = torch.randn(2, 5, 6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = m(x)
    assert y.dtype == (torch.float32 if without_pointwise else dtype)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.1, atol=0.1)


def _saved_storages(fn, exclude) -> dict[int, tuple]:
    """Distinct storages autograd keeps for the backward while fn() runs: data_ptr -> (shape, dtype)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def test_autocast_keeps_one_half_precision_copy_of_the_input():
    """Both projections read one cast of a float32 input, so the backward keeps one copy, not two."""
    m = DCNv4(16, in_channels=24)
    x = torch.randn(2, 5, 6, 24, requires_grad=True)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)

    saved = _saved_storages(forward, exclude=[x, *m.parameters()])
    input_copies = [v for v in saved.values() if v[0][-1] == 24 and v[1] == torch.bfloat16 and len(v[0]) > 1
                    and math.prod(v[0]) == x.numel()]
    assert len(input_copies) == 1, saved


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_recompute_value_is_exact_and_keeps_less(autocast):
    """recompute_value gives bit-identical outputs and gradients and keeps no copy of value."""
    torch.manual_seed(0)
    # Strided, so that value (at the input's size) and the op's output (kept either way) differ in shape.
    plain = DCNv4Conv2d(16, 32, stride=2)
    _randomise(plain, scale=0.3)
    recomputing = DCNv4Conv2d(16, 32, stride=2, recompute_value=True)
    recomputing.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 7, 5, requires_grad=True)
    results, saved = [], []
    for m in (plain, recomputing):
        x.grad = None

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return m(x)

        y = forward()
        y.float().square().sum().backward()
        results.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        saved.append(_saved_storages(forward, exclude=[x, *m.parameters()]))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    value_shape = (2, 7, 5, 32)  # (N, H, W, C) out of value_proj
    assert value_shape in [v[0] for v in saved[0].values()]
    assert value_shape not in [v[0] for v in saved[1].values()]
    nbytes = [sum(math.prod(shape) * dtype.itemsize for shape, dtype in s.values()) for s in saved]
    value_bytes = math.prod(value_shape) * (2 if autocast else 4)
    assert nbytes[0] - nbytes[1] >= value_bytes, saved


def test_recompute_value_must_be_a_bool():
    with pytest.raises(TypeError, match="recompute_value must be a bool"):
        DCNv4(16, recompute_value="yes")


@pytest.mark.parametrize("impl,cuda_backward", [("reference", "atomic"), ("kernel", "tiled"), ("auto", "atomic")])
def test_impl_and_cuda_backward_reach_the_op(impl, cuda_backward):
    """The layer's arguments are attributes, and what the op is called with, forward and backward."""
    torch.manual_seed(0)
    m = DCNv4Conv2d(16, 16, impl=impl, cuda_backward=cuda_backward).double()
    assert (m.impl, m.cuda_backward) == (impl, cuda_backward)
    assert f"impl={impl}, cuda_backward={cuda_backward}" in repr(m)
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    with OpLog() as log:
        y = m(x)
        y.sum().backward()
    if impl == "reference":
        assert log.calls == []
    else:
        # The dispatcher leaves out an argument equal to its schema default ("atomic").
        passed = () if cuda_backward == "atomic" else (cuda_backward,)
        # One op for the whole layer (projections, op, output projection), forward and backward.
        assert [(name, args[7:]) for name, args in log.calls] == [("dcnv4_layer_forward", passed),
                                                                   ("dcnv4_layer_backward", passed)]
    torch.testing.assert_close(y, _composition(m, x.detach().permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_hooks_and_wrapped_projections_are_honoured():
    """The layer op takes the projections' weights; a projection with a hook, or replaced by another module
    (an adapter), is called instead, so that neither is silently skipped."""
    torch.manual_seed(0)
    m = DCNv4Conv2d(16, 16)
    _randomise(m, scale=0.3)
    x = torch.randn(2, 16, 5, 5)
    plain = m(x)
    calls = []
    handle = m.value_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    torch.testing.assert_close(m(x), plain, rtol=1e-5, atol=1e-6)
    assert calls == [(2, 5, 5, 16)]
    handle.remove()

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return 2 * self.inner(t)

    m.output_proj = Doubled(m.output_proj)
    torch.testing.assert_close(m(x), 2 * plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2), dict(dw_kernel_size=3)], ids=["plain", "stride2", "dw"])
def test_output_and_input_gradient_keep_the_input_memory_format(impl, kwargs):
    """As a convolution's: NCHW in, NCHW out (the layer op writes it without a copy), channels_last in,
    channels_last out, on both paths; the layer op hands the input's gradient on in the input's format, so
    that a network run in NCHW sees no channels_last tensors (mixed layouts sent the ops around the layers
    down slow paths)."""
    torch.manual_seed(0)
    m = DCNv4Conv2d(16, 32, impl=impl, **kwargs)
    x = torch.randn(2, 16, 6, 6)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        leaf = x.contiguous(memory_format=fmt).detach().requires_grad_(True)
        # The gradient as the layer hands it on (a leaf's .grad is made to match the leaf's strides).
        xf, handed_on = leaf * 1, []
        xf.register_hook(handed_on.append)
        y = m(xf)
        assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous(
            memory_format=torch.channels_last if fmt is torch.contiguous_format else torch.contiguous_format)
        y.backward(torch.ones_like(y))
        if impl == "auto":  # the layer op's backward (the reference's is autograd's through an NHWC copy)
            assert handed_on[0].is_contiguous(memory_format=fmt)
        outs.append((y.detach(), handed_on[0]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameter_names_and_shapes_follow_the_official_layer():
    m = DCNv4(64, group_channels=16, dw_kernel_size=3)  # official DCNv4(64, group=4, dw_kernel_size=3)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    padded = math.ceil(4 * 9 * 3 / 8) * 8
    assert shapes == {
        "offset_mask_dw.weight": (64, 1, 3, 3), "offset_mask_dw.bias": (64,),
        "offset_mask.weight": (padded, 64), "offset_mask.bias": (padded,),
        "value_proj.weight": (64, 64), "value_proj.bias": (64,),
        "output_proj.weight": (64, 64), "output_proj.bias": (64,),
    }
    assert padded == 112
    assert DCNv4(64, groups=4).group == 4 and DCNv4(64).group == 4


@pytest.mark.parametrize("build,match", [
    (lambda: DCNv4(48, group_channels=32), r"divisible by group_channels \(32\).*allowed"),
    (lambda: DCNv4(64, groups=3), r"divisible by groups \(3\)"),
    (lambda: DCNv4(64, groups=2, group_channels=16), "disagree"),
    (lambda: DCNv4(64, dw_kernel_size=4), "dw_kernel_size must be a positive odd int"),
    (lambda: DCNv4Conv2d(20, 40, group_channels=16), r"channels \(20\) must be divisible by group_channels"),
    (lambda: DCNv4(16, without_pointwise=True, out_channels=32), "without_pointwise needs"),
    (lambda: DCNv4(16, impl="cuda"), r"impl must be one of \('auto', 'kernel', 'reference'\), got 'cuda'"),
    (lambda: DCNv4Conv2d(16, 16, cuda_backward="fast"), r"cuda_backward must be one of \('atomic', 'tiled'\)"),
])
def test_bad_configuration_raises_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_wrong_input_shape_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(N, 16, H, W\)"):
        DCNv4Conv2d(16, 16)(torch.randn(1, 8, 4, 4))
