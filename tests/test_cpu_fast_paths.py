"""The CPU kernels' specialised paths against the float64 reference, forward and backward: the group widths
with loops of compile-time length (4, 8, 16, 32, 64), the AVX2 channel loops (widths of 8k; float32, and
bfloat16 and float16 with their vector conversions), the backward's compact (image, group) slices, the
runtime-width path in blocks of 64 channels (widths above 64), more points than the stack scratch holds
(K > 64), and corners outside the image (zero rows) at odd shapes, strides, paddings and dilations."""

from __future__ import annotations

import pytest
import torch

from unet_dcnv4.ops import dcnv4, dcnv4_reference, load_extension, output_size
from unet_dcnv4.ops.reference import pair


@pytest.fixture(autouse=True)
def _kernels():
    load_extension()


def make_case(N, H, W, G, D, kernel_size, stride, padding, dilation, remove_center, offset_std, extra=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = pair(kernel_size, "kernel_size")
    Ho, Wo = output_size(H, W, (kh, kw), pair(stride, "s"), pair(padding, "p"), pair(dilation, "d"))
    K = kh * kw - int(remove_center)
    value = torch.randn(N, H, W, G * D, generator=gen, dtype=torch.float64)
    offset_mask = torch.randn(N, Ho, Wo, 3 * G * K + extra, generator=gen, dtype=torch.float64)
    used = offset_mask[..., : 3 * G * K].reshape(N, Ho, Wo, G, 3 * K)
    used[..., : 2 * K] *= offset_std
    offset_mask[..., : 3 * G * K] = used.reshape(N, Ho, Wo, 3 * G * K)
    return value, offset_mask, 3 * G * K


def check_against_reference(value, offset_mask, used, args, dtype, tol):
    """Forward and both gradients of the kernel in `dtype` against the float64 reference on the same inputs."""
    value = value.to(dtype).requires_grad_(True)
    offset_mask = offset_mask.to(dtype).requires_grad_(True)
    out = dcnv4(value, offset_mask, *args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, offset_mask), grad_out.to(dtype))
    v64 = value.detach().double().requires_grad_(True)
    om64 = offset_mask.detach().double().requires_grad_(True)
    ref = dcnv4_reference(v64, om64, *args)
    ref_grads = torch.autograd.grad(ref, (v64, om64), grad_out)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grads[1][..., :used], ref_grads[1][..., :used], rtol=1e-10, atol=1e-10)
    else:
        scale = ref.abs().max().item()
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * scale)
        gscale = ref_grads[0].abs().max().item()
        torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=tol, atol=tol * gscale)
        # Offset gradients jump where a sample crosses a pixel edge, so they are compared in norm.
        diff = (grads[1][..., :used].double() - ref_grads[1][..., :used]).norm()
        assert diff <= 10 * tol * ref_grads[1][..., :used].norm()
    assert torch.all(grads[1][..., used:] == 0)


# (N, H, W, G, D, kernel_size, stride, padding, dilation, remove_center, offset_std)
WIDTH_CASES = [
    (2, 7, 5, 3, 4, 3, 1, 1, 1, False, 1.5),
    (1, 6, 9, 2, 8, 3, 2, 1, 1, False, 1.5),
    (2, 9, 6, 2, 16, 3, 1, 2, 2, False, 1.5),
    (1, 5, 7, 1, 32, (3, 5), 1, (1, 2), 1, True, 1.5),
    (1, 4, 6, 2, 64, 3, 1, 1, 1, False, 1.5),
    (1, 5, 3, 1, 72, 3, 1, 1, 1, False, 1.5),
    (2, 6, 5, 3, 12, 3, (2, 1), (0, 1), (1, 2), False, 1.5),
    (1, 11, 4, 2, 16, 3, 1, 1, 1, False, 6.0),
]
WIDTH_IDS = [f"N{c[0]}_{c[1]}x{c[2]}_G{c[3]}_D{c[4]}_k{c[5]}_s{c[6]}_p{c[7]}_d{c[8]}_std{c[10]}" for c in WIDTH_CASES]


@pytest.mark.parametrize("case", WIDTH_CASES, ids=WIDTH_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_group_widths_match_reference(case, dtype):
    N, H, W, G, D, k, s, p, d, rc, std = case
    value, offset_mask, used = make_case(N, H, W, G, D, k, s, p, d, rc, std)
    tol = {torch.float64: 0.0, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    check_against_reference(value, offset_mask, used, (k, s, p, d, G, 0.75, rc), dtype, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_more_points_than_the_stack_scratch(dtype):
    """A 9x9 kernel has K = 81 points, past the 64 the per-thread scratch keeps on the stack."""
    value, offset_mask, used = make_case(1, 10, 9, 2, 8, 9, 1, 4, 1, False, 1.5)
    check_against_reference(value, offset_mask, used, (9, 1, 4, 1, 2, 1.0, False), dtype, 1e-5)


@pytest.mark.parametrize("D", [8, 16])
def test_every_corner_outside_or_straddling_the_border(D):
    """Offsets that put samples just across the border (corners on both sides) and far outside (no
    corner inside): the zero rows and scratch rows must leave value's gradient and the output exact."""
    value, offset_mask, used = make_case(2, 5, 6, 2, D, 3, 1, 1, 1, False, 1.0)
    om = offset_mask[..., :used].view(2, 5, 6, 2, 27)
    om[0, :, :, 0, :18] = 0.5 - 3.0  # every sample half a pixel left and three pixels up
    om[1, :, :, 1, :18] = 1e4  # far outside: the group's output is 0
    check_against_reference(value, offset_mask, used, (3, 1, 1, 1, 2, 1.0, False), torch.float32, 1e-5)
    out = dcnv4(value.float(), offset_mask.float(), 3, 1, 1, 1, 2)
    assert torch.all(out[1, ..., D:] == 0)


def test_parallel_chunks_agree_with_one_thread():
    """The forward's pixel chunks and the backward's (image, group) chunks give the same result on one
    thread and on several (bitwise: each output and each grad_value slice has one owner)."""
    value, offset_mask, used = make_case(3, 9, 7, 4, 16, 3, 1, 1, 1, False, 1.5)
    value, offset_mask = value.float().requires_grad_(True), offset_mask.float().requires_grad_(True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = dcnv4(value, offset_mask, 3, 1, 1, 1, 4)
            results.append((out, *torch.autograd.grad(out, (value, offset_mask), torch.ones_like(out))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
