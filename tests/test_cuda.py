"""The DCNv4 CUDA kernels: a compile check that needs only nvcc, and the GPU-only checks (each CUDA backward
variant, misaligned inputs, determinism) against the float64 reference, skipped without a GPU. The forward and
default backward of every shared case run on CUDA through the `device` fixture of test_ops.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from op_cases import BWD_TOL, CASES, FWD_TOL, call_args, make_case, poison_allocator, rel_err
from unet_dcnv4.ops import dcnv4, dcnv4_reference, load_extension
from unet_dcnv4.ops._build import CSRC, find_nvcc

ROOT = Path(__file__).resolve().parents[1]
def needs_gpu(test):
    """A GPU-only check: marked `cuda` (`-m cuda` selects them) and skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


# ---------------------------------------------------------------------------------------------------
# Compilation (no GPU needed)


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_cuda_kernels_compile_for_sm90(tmp_path):
    """nvcc alone, no torch headers: a broken .cu fails here in seconds."""
    cmd = [find_nvcc(), "-std=c++17", "-O3", "-arch=sm_90", "--use_fast_math", "--resource-usage", "-c",
           str(CSRC / "cuda" / "dcnv4_cuda.cu"), "-I", str(CSRC), "-o", str(tmp_path / "dcnv4_cuda.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    assert "forward_kernel" in report and "backward_kernel" in report, report
    assert (tmp_path / "dcnv4_cuda.o").stat().st_size > 0


@pytest.mark.timeout(600)
@pytest.mark.skipif(find_nvcc() is None or torch.version.cuda is None, reason="needs nvcc and a CUDA build of torch")
def test_full_cuda_build_registers_cuda_kernels(tmp_path):
    """The whole extension with its CUDA sources, in a fresh process (one TORCH_LIBRARY per process)."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0", UNET_DCNV4_BUILD_DIR=str(tmp_path))
    code = ("import torch\n"
            "from unet_dcnv4.ops._build import build\n"
            "build(with_cuda=True)\n"
            "print(torch._C._dispatch_has_kernel_for_dispatch_key('unet_dcnv4::dcnv4_forward', 'CUDA'),\n"
            "      torch._C._dispatch_has_kernel_for_dispatch_key('unet_dcnv4::dcnv4_backward', 'CUDA'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[-2:] == ["True", "True"], result.stdout + result.stderr
    assert list(tmp_path.glob("unet_dcnv4_cuda_*/*.so")), "no shared library in the build folder"


# ---------------------------------------------------------------------------------------------------
# Correctness on the GPU


@pytest.fixture(scope="module")
def cuda_ops():
    load_extension()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("unet_dcnv4::dcnv4_forward", "CUDA"):
        pytest.fail("the extension was built without its CUDA kernels on a machine with a GPU")
    return torch.ops.unet_dcnv4


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_gpu
@pytest.mark.parametrize("variant", ["atomic", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_backward_matches_autograd_of_reference(cuda_ops, case, dtype, variant):
    value, om, kwargs = make_case(**CASES[case], seed=2 * list(CASES).index(case) + 1)
    value, om = value.to(dtype), om.to(dtype)
    value64, om64 = value.double().requires_grad_(), om.double().requires_grad_()
    ref = dcnv4_reference(value64, om64, **kwargs)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
    grad_out_c, value_c, om_c = grad_out.cuda(), value.cuda(), om.cuda()
    poison_allocator(om_c)
    gv, gom = cuda_ops.dcnv4_backward(grad_out_c, value_c, om_c, *call_args(kwargs), variant)
    torch.cuda.synchronize()
    assert gv.dtype == dtype and gv.shape == value.shape
    assert gom.dtype == dtype and gom.shape == om.shape
    if ref.numel() == 0:
        assert gv.numel() == 0 and gom.numel() == 0
        return
    ref_gv, ref_gom = torch.autograd.grad(ref, (value64, om64), grad_out.double())
    assert torch.isfinite(gom).all(), "unwritten (NaN) offset_mask gradient elements"
    used = 3 * kwargs["groups"] * (kwargs["kernel_size"][0] * kwargs["kernel_size"][1] - int(kwargs["remove_center"]))
    assert (gom[..., used:] == 0).all(), "padding channels of grad_offset_mask must be zero"
    assert rel_err(gv, ref_gv) < BWD_TOL[dtype]
    assert rel_err(gom, ref_gom) < BWD_TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_and_noncontiguous_inputs(cuda_ops, dtype):
    """A storage offset of one element rules out 16-byte loads (scalar path); a permuted view is copied."""
    value, om, kwargs = make_case(N=2, H=9, W=7, G=2, D=16, seed=3)
    value, om = value.to(dtype), om.to(dtype)
    ref = dcnv4_reference(value.double(), om.double(), **kwargs)
    flat = torch.empty(value.numel() + 1, dtype=dtype, device="cuda")
    flat[1:] = value.cuda().flatten()
    shifted = flat[1:].view(value.shape)
    assert shifted.data_ptr() % 16 != 0
    out = cuda_ops.dcnv4_forward(shifted, om.cuda(), *call_args(kwargs))
    assert rel_err(out, ref) < FWD_TOL[dtype]
    permuted = value.cuda().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not permuted.is_contiguous()
    out = cuda_ops.dcnv4_forward(permuted, om.cuda(), *call_args(kwargs))
    assert rel_err(out, ref) < FWD_TOL[dtype]
    grad_out = torch.randn(ref.shape, dtype=dtype, device="cuda")
    gv_a, gom_a = cuda_ops.dcnv4_backward(grad_out, shifted, om.cuda(), *call_args(kwargs))
    gv_b, gom_b = cuda_ops.dcnv4_backward(grad_out, value.cuda(), om.cuda(), *call_args(kwargs))
    assert rel_err(gv_a, gv_b) < BWD_TOL[dtype] and rel_err(gom_a, gom_b) < BWD_TOL[dtype]


@needs_gpu
def test_deterministic_mode_refuses_the_atomic_backward(cuda_ops):
    value, om, kwargs = make_case(N=1, H=5, W=4, G=2, D=8, seed=12)
    value, om = value.float().cuda(), om.float().cuda()
    grad_out = torch.randn(1, 5, 4, 16, device="cuda")
    cuda_ops.dcnv4_forward(value, om, *call_args(kwargs))  # the forward is deterministic: allowed
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="dcnv4_backward"):
            cuda_ops.dcnv4_backward(grad_out, value, om, *call_args(kwargs))
        # With warn_only, a training step's backward (run by the autograd engine, which hands C++ warnings
        # to Python; a direct torch.ops call prints them to stderr instead) warns and goes on.
        torch.use_deterministic_algorithms(True, warn_only=True)
        value.requires_grad_(True)
        with pytest.warns(UserWarning, match="dcnv4_backward"):
            dcnv4(value, om, **kwargs).backward(grad_out)
        assert value.grad is not None and torch.isfinite(value.grad).all()
    finally:
        torch.use_deterministic_algorithms(False)


@needs_gpu
def test_unknown_backward_variant_is_an_error(cuda_ops):
    value, om, kwargs = make_case(N=1, H=4, W=4, G=1, D=8, seed=13)
    value, om = value.float().cuda(), om.float().cuda()
    with pytest.raises(RuntimeError, match="cuda_backward must be 'atomic' or 'tiled', got 'fast'"):
        cuda_ops.dcnv4_backward(torch.zeros_like(value), value, om, *call_args(kwargs), "fast")
    with pytest.raises(RuntimeError, match="cuda_backward must be 'atomic' or 'tiled', got 'fast'"):
        cuda_ops.dcnv4_forward(value, om, *call_args(kwargs), "fast")


@needs_gpu
@pytest.mark.parametrize("variant", ["atomic", "tiled"])
def test_dcnv4_runs_the_backward_kernel_it_is_given(cuda_ops, variant):
    """cuda_backward travels from dcnv4 through autograd to the kernel launch (seen by the profiler)."""
    value, om, kwargs = make_case(N=2, H=13, W=9, G=2, D=16, seed=14)
    value = value.float().cuda().requires_grad_()
    om = om.float().cuda().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dcnv4(value, om, **kwargs, cuda_backward=variant).sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    backward_kernels = [n for n in names if "backward_kernel" in n or "backward_tiled_kernel" in n]
    tiled = ["backward_tiled_kernel" in n for n in backward_kernels]
    assert backward_kernels and all(t == (variant == "tiled") for t in tiled), backward_kernels


@needs_gpu
def test_cuda_tensor_without_cuda_kernels_is_an_error(cuda_ops, monkeypatch):
    """No silent 40x slower reference on the GPU: "auto" and "kernel" raise, "reference" runs it."""
    from unet_dcnv4 import ops

    value, om, kwargs = make_case(N=1, H=5, W=4, G=2, D=8, seed=15)
    value, om = value.float().cuda(), om.float().cuda()
    monkeypatch.setattr(ops, "_cuda_kernels_available", lambda: False)
    for impl in ("auto", "kernel"):
        with pytest.raises(RuntimeError, match="built without CUDA.*impl='reference'"):
            dcnv4(value, om, **kwargs, impl=impl)
    out = dcnv4(value, om, **kwargs, impl="reference")
    assert rel_err(out, dcnv4_reference(value.double(), om.double(), **kwargs)) < FWD_TOL[torch.float32]
