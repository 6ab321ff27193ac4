"""The DCNv4 operator: reference against a naive loop, kernels against the reference, gradients, torch.library
registration, torch.compile, the build, and input validation. Checks that take the `device` fixture run on the CPU
and, where a GPU is visible, on CUDA (test_cuda.py holds the GPU-only checks)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import pytest
import torch

from op_cases import BWD_TOL, CASES, FWD_TOL, OpLog, call_args, make_case, poison_allocator, rel_err
from unet_dcnv4.ops import dcnv4, dcnv4_layer, dcnv4_reference, load_extension, output_size
from unet_dcnv4.ops.reference import pair, sampling_points


@pytest.fixture(autouse=True)
def _kernels():
    """Every test here exercises the compiled op unless it asks for the reference itself."""
    load_extension()


def naive_dcnv4(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
    """The op's contract (the `dcnv4` docstring) written as a per-pixel, per-point loop (float64, tiny
    shapes only)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (pair(kernel_size, "k"), pair(stride, "s"), pair(padding, "p"),
                                              pair(dilation, "d"))
    N, H, W, C = value.shape
    D = C // groups
    Ho, Wo = output_size(H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    points = [(i, j) for i in range(kw) for j in range(kh) if not (remove_center and i == kw // 2 and j == kh // 2)]
    K = len(points)
    cw, ch = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    out = torch.zeros(N, Ho, Wo, C, dtype=torch.float64)

    def pixel(n, y, x, g):
        if 0 <= y < H and 0 <= x < W:
            return value[n, y, x, g * D:(g + 1) * D].double()
        return torch.zeros(D, dtype=torch.float64)

    for n in range(N):
        for ho in range(Ho):
            for wo in range(Wo):
                for g in range(groups):
                    om = offset_mask[n, ho, wo, 3 * K * g: 3 * K * (g + 1)].double()
                    for k, (i, j) in enumerate(points):
                        dx, dy, m = om[2 * k].item(), om[2 * k + 1].item(), om[2 * K + k].item()
                        x = wo * sw - pw + cw + offset_scale * (i * dw - cw + dx)
                        y = ho * sh - ph + ch + offset_scale * (j * dh - ch + dy)
                        x0, y0 = math.floor(x), math.floor(y)
                        lx, ly = x - x0, y - y0
                        sample = ((1 - ly) * (1 - lx) * pixel(n, y0, x0, g) + (1 - ly) * lx * pixel(n, y0, x0 + 1, g)
                                  + ly * (1 - lx) * pixel(n, y0 + 1, x0, g) + ly * lx * pixel(n, y0 + 1, x0 + 1, g))
                        out[n, ho, wo, g * D:(g + 1) * D] += m * sample
    return out


def case(name: str, dtype=torch.float64, seed: int = 0):
    """A shared case (op_cases.CASES) as (value, offset_mask, positional op arguments) in `dtype`."""
    value, offset_mask, kwargs = make_case(**CASES[name], seed=seed)
    return value.to(dtype), offset_mask.to(dtype), call_args(kwargs)


@pytest.mark.parametrize("name", ["13x9", "1x1", "batch0", "k3x5", "stride2", "remove_center", "k2x4_mixed"], ids=str)
def test_reference_matches_naive_loop(name):
    value, offset_mask, args = case(name, seed=1)
    ref = dcnv4_reference(value, offset_mask, *args)
    torch.testing.assert_close(ref, naive_dcnv4(value, offset_mask, *args), rtol=1e-12, atol=1e-12)


def test_sampling_points_are_column_major():
    assert sampling_points((3, 3), (1, 1), False)[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert (1, 1) not in sampling_points((3, 3), (1, 1), True)
    assert len(sampling_points((3, 5), (1, 1), True)) == 14


def test_reference_equals_grid_sample():
    """The sampling equals grid_sample(zeros, align_corners=False) after x -> (2x+1)/W - 1."""
    N, H, W, D = 2, 6, 7, 3
    value, offset_mask, _ = make_case(N, H, W, 1, D, kernel_size=1, padding=0)
    out = dcnv4_reference(value, offset_mask, 1, 1, 0, 1, 1, 1.0, False)
    x = torch.arange(W, dtype=torch.float64)[None, None, :] + offset_mask[..., 0]
    y = torch.arange(H, dtype=torch.float64)[None, :, None] + offset_mask[..., 1]
    grid = torch.stack([(2 * x + 1) / W - 1, (2 * y + 1) / H - 1], dim=-1)
    sampled = torch.nn.functional.grid_sample(value.permute(0, 3, 1, 2), grid, padding_mode="zeros",
                                              align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, sampled * offset_mask[..., 2:3])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("name", list(CASES), ids=str)
def test_kernel_forward_backward_matches_reference(device, name, dtype):
    """Every shared case on every device: the compiled op's forward and its backward (through autograd) against
    the float64 reference on the same rounded inputs; on CUDA every output element must be written."""
    value, offset_mask, kwargs = make_case(**CASES[name], seed=2 * list(CASES).index(name))
    value, offset_mask = value.to(dtype), offset_mask.to(dtype)
    v64, om64 = value.double().requires_grad_(True), offset_mask.double().requires_grad_(True)
    ref = dcnv4_reference(v64, om64, **kwargs)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    value, offset_mask = value.to(device).requires_grad_(True), offset_mask.to(device).requires_grad_(True)
    if device.type == "cuda":
        poison_allocator(torch.empty(ref.shape, dtype=dtype))
    out = dcnv4(value, offset_mask, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape and out.device.type == device.type
    grads = torch.autograd.grad(out, (value, offset_mask), grad_out.to(device, dtype))
    assert [g.shape for g in grads] == [value.shape, offset_mask.shape]
    if ref.numel() == 0:
        return
    ref_grads = torch.autograd.grad(ref, (v64, om64), grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), "unwritten (NaN) elements"
    k = kwargs["kernel_size"]
    used = 3 * kwargs["groups"] * (k[0] * k[1] - int(kwargs["remove_center"]))
    assert (grads[1][..., used:] == 0).all(), "padding channels of the offset_mask gradient must be zero"
    assert rel_err(out, ref) < FWD_TOL[dtype]
    assert rel_err(grads[0], ref_grads[0]) < BWD_TOL[dtype]
    assert rel_err(grads[1], ref_grads[1]) < BWD_TOL[dtype]


def test_padding_channels_get_zero_gradient(device):
    value, offset_mask, args = case("padded_P", torch.float32)
    value, offset_mask = value.to(device), offset_mask.to(device).requires_grad_(True)
    dcnv4(value, offset_mask, *args).square().sum().backward()
    assert torch.all(offset_mask.grad[..., -5:] == 0)
    assert offset_mask.grad[..., :-5].abs().sum() > 0


def test_offsets_far_outside_give_zero(device):
    value, offset_mask, args = case("13x9", torch.float32)
    offset_mask[..., : 2 * 9] = 1e6
    offset_mask[..., 27: 27 + 2 * 9] = -1e6
    out = dcnv4(value.to(device), offset_mask.to(device), *args)
    assert torch.all(out == 0)


def test_non_contiguous_inputs(device):
    value, offset_mask, args = case("13x9")
    value, offset_mask = value.to(device), offset_mask.to(device)
    value_nc = value.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # (N, H, W, C) view of NCHW memory
    wide = torch.cat([offset_mask, offset_mask], dim=-1)[..., ::2]  # strided last dim
    wide.copy_(offset_mask)
    assert not value_nc.is_contiguous() and not wide.is_contiguous()
    torch.testing.assert_close(dcnv4(value_nc, wide, *args), dcnv4_reference(value, offset_mask, *args),
                               rtol=1e-10, atol=1e-10)


def test_gradcheck_float64(device):
    value, offset_mask, kwargs = make_case(1, 5, 4, 2, 3, extra_channels=2, offset_scale=0.8, on_grid=False, seed=5)
    args = call_args(kwargs)
    value = value.to(device).requires_grad_(True)
    offset_mask = offset_mask.to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, om: dcnv4(v, om, *args), (value, offset_mask), eps=1e-6, atol=1e-6)


def test_second_derivative_is_an_error(device):
    value, offset_mask, kwargs = make_case(1, 5, 4, 2, 3, seed=6)
    value = value.to(device).requires_grad_(True)
    offset_mask = offset_mask.to(device).requires_grad_(True)
    (grad_value,) = torch.autograd.grad(dcnv4(value, offset_mask, *call_args(kwargs)).sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative of dcnv4 is not implemented"):
        grad_value.sum().backward()


def test_opcheck(device):
    value, offset_mask, args = case("13x9", torch.float32)
    value, offset_mask = value.to(device), offset_mask.to(device)
    k, s, p, d, G, scale, rc = args
    op_args = (value, offset_mask, list(pair(k, "k")), list(pair(s, "s")), list(pair(p, "p")), list(pair(d, "d")),
               G, scale, rc)
    torch.library.opcheck(torch.ops.unet_dcnv4.dcnv4_forward.default, op_args)
    value.requires_grad_(True)
    offset_mask.requires_grad_(True)
    torch.library.opcheck(torch.ops.unet_dcnv4.dcnv4_forward.default, op_args)
    grad = torch.randn(value.shape, device=device)
    torch.library.opcheck(torch.ops.unet_dcnv4.dcnv4_backward.default, (grad, value.detach(), offset_mask.detach(),
                                                                        *op_args[2:]))
    # The backward-kernel argument, given: fake kernels, autograd and schema take it too.
    torch.library.opcheck(torch.ops.unet_dcnv4.dcnv4_forward.default, (*op_args, "tiled"))
    torch.library.opcheck(torch.ops.unet_dcnv4.dcnv4_backward.default, (grad, value.detach(), offset_mask.detach(),
                                                                        *op_args[2:], "tiled"))


def _layer_case(device, dtype=torch.float32, own_offset_input=False, biases=True, seed=0, nchw=False):
    """Arguments of the layer op: x (2, 6, 5, 8) -> C = 16 (G = 2) -> 12 channels out, 3x3; with
    `own_offset_input` a stride-2 layer whose offset branch reads its own (2, 3, 3, 8) input; with `nchw`
    the 4-D inputs are NHWC views of NCHW tensors."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
        return t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) if nchw and t.dim() == 4 else t

    stride = 2 if own_offset_input else 1
    P = 3 * 2 * 9 + 2  # two padding channels
    bias = (lambda n: rand(n)) if biases else (lambda n: None)
    tensors = [rand(2, 6, 5, 8), rand(2, 3, 3, 8) if own_offset_input else None, rand(16, 8), bias(16),
               rand(P, 8, scale=0.3), bias(P), rand(12, 16), bias(12)]
    return tensors, [[3, 3], [stride, stride], [1, 1], [1, 1], 2, 1.0, False]


@pytest.mark.parametrize("own_offset_input,biases,nchw", [(False, True, False), (True, False, False),
                                                         (False, True, True), (True, False, True)],
                         ids=["x_biases", "own_no_bias", "x_biases_nchw", "own_no_bias_nchw"])
def test_layer_opcheck(device, own_offset_input, biases, nchw):
    """The layer op (projections, op, output projection in one): schema, fake kernels (with the output in
    x's layout), autograd registration and AOT dispatch, forward and backward, with offset_input and the
    biases given and absent, on NHWC tensors and on NHWC views of NCHW ones."""
    tensors, hyper = _layer_case(device, own_offset_input=own_offset_input, biases=biases, nchw=nchw)
    if nchw:  # the output is written in x's layout
        out = torch.ops.unet_dcnv4.dcnv4_layer_forward.default(*tensors, *hyper)[0]
        assert out.permute(0, 3, 1, 2).is_contiguous() and not out.is_contiguous()
    forward = torch.ops.unet_dcnv4.dcnv4_layer_forward.default
    torch.library.opcheck(forward, (*tensors, *hyper))
    for t in tensors:
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(forward, (*tensors, *hyper))
    torch.library.opcheck(forward, (*tensors, *hyper, "tiled", True))  # recompute_value: the backward recomputes
    out, value, offset_mask, sampled = (t.detach() for t in forward(*tensors, *hyper))
    detached = [None if t is None else t.detach() for t in tensors]
    x, offset_input, *weights = detached
    for kept_value in (value, None):  # None: value recomputed from x
        torch.library.opcheck(torch.ops.unet_dcnv4.dcnv4_layer_backward.default,
                              (torch.randn_like(out), x, offset_input, kept_value, offset_mask, sampled, *weights,
                               *hyper))


@pytest.mark.parametrize("nchw", [False, True], ids=["nhwc", "nchw"])
def test_layer_gradcheck_float64(device, nchw):
    tensors, hyper = _layer_case(device, torch.float64, own_offset_input=True, seed=3, nchw=nchw)
    for t in tensors:
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: dcnv4_layer(*t, *hyper), tuple(tensors), eps=1e-6, atol=1e-6)


def test_layer_second_derivative_is_an_error(device):
    tensors, hyper = _layer_case(device, torch.float64)
    x = tensors[0].requires_grad_(True)
    (grad_x,) = torch.autograd.grad(dcnv4_layer(*tensors, *hyper).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative of the DCNv4 layer is not implemented"):
        grad_x.sum().backward()


def test_layer_needs_offset_input_when_the_size_changes():
    tensors, hyper = _layer_case("cpu", own_offset_input=True)
    tensors[1] = None
    with pytest.raises(ValueError, match="offset_input is needed when the output size differs"):
        dcnv4_layer(*tensors, *hyper)


def test_flop_counter_counts_the_layer_projections():
    """torch.utils.flop_counter sees the layer op where it saw three Linears: the same matrix-product FLOPs,
    forward and backward (the sampling itself is not counted, as for dcnv4_forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    tensors, hyper = _layer_case("cpu", own_offset_input=True)
    for t in tensors:
        t.requires_grad_(True)
    x, offset_input, vw, vb, ow, ob, pw, pb = tensors
    counts = []
    for fused in (True, False):
        with FlopCounterMode(display=False) as counter:
            if fused:
                out = dcnv4_layer(*tensors, *hyper)
            else:
                value, om = torch.nn.functional.linear(x, vw, vb), torch.nn.functional.linear(offset_input, ow, ob)
                out = torch.nn.functional.linear(dcnv4(value, om, *hyper), pw, pb)
            out.sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_torch_compile_fullgraph(device):
    value, offset_mask, args = case("13x9", torch.float32)
    value, offset_mask = value.to(device), offset_mask.to(device)
    weight = torch.randn(value.shape[-1], value.shape[-1], device=device)

    def f(v, om):
        return torch.relu(dcnv4(v @ weight, om, *args)).sum(dim=-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value.requires_grad_(True)
    out = compiled(value, offset_mask)
    torch.testing.assert_close(out, f(value, offset_mask), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert value.grad is not None and torch.isfinite(value.grad).all()


def test_the_cuda_kernel_check_traces_without_a_graph_break():
    """dcnv4 asks whether the loaded kernels cover CUDA on every CUDA call; torch.compile(fullgraph=True)
    must trace that question (a dispatcher query would break the graph there)."""
    from unet_dcnv4 import ops

    load_extension()

    def f(x):
        return x + 1 if ops._cuda_kernels_available() else x - 1

    x = torch.ones(2)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
    assert ops._cuda_kernels_available() == torch._C._dispatch_has_kernel_for_dispatch_key(
        "unet_dcnv4::dcnv4_forward", "CUDA")


@pytest.mark.parametrize("impl,compiled", [("auto", True), ("kernel", True), ("reference", False)])
def test_impl_chooses_the_implementation(impl, compiled):
    value, offset_mask, args = case("13x9")
    value.requires_grad_(True)
    with OpLog() as log:
        out = dcnv4(value, offset_mask, *args, impl=impl)
        out.sum().backward()
    assert [name for name, _ in log.calls] == (["dcnv4_forward", "dcnv4_backward"] if compiled else [])
    torch.testing.assert_close(out, dcnv4_reference(value, offset_mask, *args), rtol=1e-10, atol=1e-10)


def test_cuda_backward_travels_through_autograd_to_the_backward_op():
    value, offset_mask, args = case("13x9")
    value.requires_grad_(True)
    for variant in ("tiled", "atomic"):
        with OpLog() as log:
            dcnv4(value, offset_mask, *args, cuda_backward=variant).sum().backward()
        (_, forward_args), (_, backward_args) = log.calls
        # The dispatcher leaves out an argument equal to its schema default ("atomic").
        assert forward_args[7:] == backward_args[7:] == (("tiled",) if variant == "tiled" else ())


def test_auto_runs_the_reference_where_there_are_no_kernels():
    value, offset_mask, args = case("13x9", torch.float32)
    with OpLog() as log:
        out = dcnv4(value.to("meta"), offset_mask.to("meta"), *args)
    assert not log.calls and out.device.type == "meta" and out.shape == value.shape
    with pytest.raises(ValueError, match="impl='kernel' needs tensors on a CPU or CUDA device, got meta"):
        dcnv4(value.to("meta"), offset_mask.to("meta"), *args, impl="kernel")


def _bad(**changes):
    value, offset_mask, _ = case("13x9", torch.float32)
    value, offset_mask = value[:1, :5, :5, :8].contiguous(), offset_mask[:1, :5, :5, :54].contiguous()
    kwargs = dict(value=value, offset_mask=offset_mask, kernel_size=3, stride=1, padding=1, dilation=1, groups=2)
    kwargs.update(changes)
    return kwargs


BAD_INPUTS = [
    (dict(value=torch.zeros(5, 5, 8)), ValueError, "value must be 4-D"),
    (dict(offset_mask=torch.zeros(1, 5, 5)), ValueError, "offset_mask must be 4-D"),
    (dict(value=torch.zeros(1, 5, 5, 8, dtype=torch.int32)), TypeError, "value must be float"),
    (dict(offset_mask=torch.zeros(1, 5, 5, 54, dtype=torch.float64)), TypeError, "offset_mask must have value's dtype"),
    (dict(groups=3), ValueError, "divisible by groups"),
    (dict(offset_mask=torch.zeros(1, 5, 5, 53)), ValueError, "at least 3 * groups * K = 54"),
    (dict(offset_mask=torch.zeros(1, 4, 5, 54)), ValueError, "offset_mask must have shape"),
    (dict(kernel_size=0), ValueError, "kernel_size must be positive"),
    (dict(stride=(1, 0)), ValueError, "stride must be positive"),
    (dict(dilation=-1), ValueError, "dilation must be positive"),
    (dict(padding=-1), ValueError, "padding must be non-negative"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a pair"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(kernel_size=9, padding=0), ValueError, "too small"),
    (dict(impl="cuda"), ValueError, "impl must be one of ('auto', 'kernel', 'reference'), got 'cuda'"),
    (dict(cuda_backward="fast"), ValueError, "cuda_backward must be one of ('atomic', 'tiled'), got 'fast'"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        dcnv4(**_bad(**changes))


def test_cpp_checks_name_the_argument():
    value, offset_mask, _ = case("13x9", torch.float32)
    value, offset_mask = value[:1, :5, :5, :8].contiguous(), offset_mask[:1, :5, :5, :54].contiguous()
    with pytest.raises(RuntimeError, match=r"offset_mask must have at least 3 \* groups \* K = 54 channels, got 50"):
        torch.ops.unet_dcnv4.dcnv4_forward(value, offset_mask[..., :50].contiguous(), [3, 3], [1, 1], [1, 1], [1, 1],
                                           2, 1.0, False)
    with pytest.raises(RuntimeError, match="value's channels"):
        torch.ops.unet_dcnv4.dcnv4_forward(value, offset_mask, [3, 3], [1, 1], [1, 1], [1, 1], 3, 1.0, False)
    with pytest.raises(RuntimeError, match="cuda_backward must be 'atomic' or 'tiled', got 'fast'"):
        torch.ops.unet_dcnv4.dcnv4_forward(value, offset_mask, [3, 3], [1, 1], [1, 1], [1, 1], 2, 1.0, False, "fast")
    with pytest.raises(RuntimeError, match="cuda_backward must be 'atomic' or 'tiled', got 'fast'"):
        torch.ops.unet_dcnv4.dcnv4_backward(torch.zeros_like(value), value, offset_mask, [3, 3], [1, 1], [1, 1],
                                            [1, 1], 2, 1.0, False, "fast")


def test_build_is_cached_and_reports_missing_compiler(tmp_path):
    code = (
        "import os, sys\n"
        "from unet_dcnv4.ops import _build\n"
        "first = _build.build(with_cuda=False)\n"
        "second = _build.build(with_cuda=False)\n"
        "assert first == second and os.path.exists(first), (first, second)\n"
        "os.environ['CXX'] = 'no-such-compiler'\n"
        "try:\n"
        "    _build.build(with_cuda=False)\n"
        "except _build.BuildError as err:\n"
        "    assert 'C++ compiler' in str(err), err\n"
        "else:\n"
        "    sys.exit('no BuildError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_extra_nvcc_flags_join_the_build_and_its_hash(monkeypatch):
    """$UNET_DCNV4_NVCC_FLAGS (a kernel variant's define) joins the flags build() gives nvcc and the hash
    that names the build folder."""
    from unet_dcnv4.ops import _build

    monkeypatch.delenv(_build.NVCC_FLAGS_ENV, raising=False)
    default = _build.cuda_flags()
    assert default == _build.NVCC_FLAGS
    monkeypatch.setenv(_build.NVCC_FLAGS_ENV, "-DDCNV4_BWD16_V=4  -Xptxas -v")
    assert _build.cuda_flags() == default + ["-DDCNV4_BWD16_V=4", "-Xptxas", "-v"]
    sources = _build._sources(True)
    assert _build._digest(sources, _build.cuda_flags()) != _build._digest(sources, default)


def test_build_hash_covers_every_source(tmp_path, monkeypatch):
    """An edit to any source or header, CPU or CUDA, names a new build folder (CUDA files: CUDA builds)."""
    from unet_dcnv4.ops import _build

    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_build, "CSRC", copy)
    files = [p for p in copy.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")]
    assert {"ops.cpp", "dcnv4.h", "dcnv4_cuda.h", "dcnv4_cuda.cu"} <= {p.name for p in files}
    for with_cuda in (False, True):
        sources = _build._sources(with_cuda)
        for path in files:
            if "cuda" in path.relative_to(copy).parts and not with_cuda:
                continue
            before = _build._digest(sources, [])
            path.write_text(path.read_text() + "\n// edited\n")
            assert _build._digest(sources, []) != before, path
