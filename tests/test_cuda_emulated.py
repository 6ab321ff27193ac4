"""The CUDA kernels of csrc/cuda/dcnv4_cuda.cu run on the CPU under tests/emulator, against the float64
reference: every thread of every block executes the kernel source as written, with real warp shuffles
and atomics, bounds-checked loads and guard zones around the outputs. This checks indexing, the launch
rule, the lane reductions and the vector and scalar paths on machines without a GPU; it says nothing
about speed, and the memory model of a real GPU is not emulated (tests/test_cuda.py covers the GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from op_cases import BWD_TOL, CASES, FWD_TOL, call_args, make_case, rel_err
from unet_dcnv4.ops import dcnv4_reference
from unet_dcnv4.ops._build import CSRC, find_nvcc

HERE = Path(__file__).resolve().parent / "emulator"
GUARD = 64  # elements of sentinel before and after every output
SENTINEL = 12345.0

# The emulated shapes: those of the GPU tests, batches cut to at most 2 (the emulator runs every thread
# of the grid on two cores).
EMULATED = {name: dict(case, N=min(case["N"], 2)) for name, case in CASES.items()}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VARIANTS = ["atomic", "tiled"]  # the backward kernels (BackwardVariant in csrc/cuda/dcnv4_cuda.h)
FLOAT64_CASES = ["7x7_D4", "1x1", "k1_D24", "stride2", "scale_D1", "far_offsets", "padded_P"]


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder (the emulator compiles the kernels against its headers)."""
    candidates = []
    if find_nvcc():
        candidates.append(Path(find_nvcc()).resolve().parents[1] / "include")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)


def build_emulator(tmp_path_factory, name: str, defines: tuple[str, ...] = ()):
    include = cuda_include_dir()
    if include is None:
        pytest.skip("the CUDA headers (cuda_runtime.h) are not installed")
    from torch.utils.cpp_extension import load

    build_dir = tmp_path_factory.mktemp(f"{name}_build")
    return load(name, [str(HERE / "kernels.cpp")], build_directory=str(build_dir),
                extra_include_paths=[str(CSRC), str(HERE), str(include)],
                extra_cflags=["-O1", "-std=c++20", "-Wno-attributes", *defines], verbose=False)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory, "dcnv4_emulator")


@pytest.fixture(scope="module")
def emu_bwd16_v4(tmp_path_factory):
    """The kernels built with DCNV4_BWD16_V=4: the 16-bit backward takes 4 channels a lane (8-byte loads)."""
    return build_emulator(tmp_path_factory, "dcnv4_emulator_bwd16_v4", ("-DDCNV4_BWD16_V=4",))


@pytest.fixture(scope="module")
def emu_acc16(tmp_path_factory):
    """The kernels built with DCNV4_BWD16_ACC16: the 16-bit backward accumulates grad_value in its own type."""
    return build_emulator(tmp_path_factory, "dcnv4_emulator_acc16", ("-DDCNV4_BWD16_ACC16",))


@pytest.fixture(scope="module")
def emu_index64(tmp_path_factory):
    """The kernels built with DCNV4_FWD_INDEX64 and DCNV4_BWD_INDEX64: both directions take int64 indices at
    every size (the default build takes int32 where every index fits, as at every shape here)."""
    return build_emulator(tmp_path_factory, "dcnv4_emulator_index64", ("-DDCNV4_FWD_INDEX64", "-DDCNV4_BWD_INDEX64"))


@pytest.fixture(scope="module")
def emu_variants(tmp_path_factory):
    """The kernels built with the build-time variants a GPU run is to time, in one build: DCNV4_FWD32_V=8 and
    DCNV4_FWD16_V=16 (the forward takes two 16-byte words a corner, 8 fp32 channels a lane for groups of a
    multiple of 8, 16 half-precision ones for multiples of 16), DCNV4_BWD32_V=8 (the fp32 backward likewise,
    8 channels a lane) and DCNV4_BWD_SKIP_ZERO (the backward sends no atomic for a corner of weight zero)."""
    return build_emulator(tmp_path_factory, "dcnv4_emulator_variants",
                          ("-DDCNV4_FWD32_V=8", "-DDCNV4_FWD16_V=16", "-DDCNV4_BWD32_V=8", "-DDCNV4_BWD_SKIP_ZERO"))


def guarded(shape, dtype, fill):
    """A contiguous tensor of `shape`, filled with `fill`, inside a buffer whose GUARD elements on each
    side hold SENTINEL."""
    n = int(torch.Size(shape).numel())
    buf = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype)
    view = buf[GUARD: GUARD + n].view(shape)
    view.fill_(fill)
    return buf, view


def assert_guards_intact(buf, view):
    start = view.storage_offset()
    before, after = buf[:start], buf[start + view.numel():]
    assert (before == SENTINEL).all() and (after == SENTINEL).all(), "a kernel wrote outside its output"


def placed(t, offset=0):
    """A copy of t at `offset` elements past a 16-byte boundary."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def emulated_forward(emu, value, om, kwargs):
    Ho, Wo = om.shape[1:3]
    buf, out = guarded((value.shape[0], Ho, Wo, value.shape[3]), value.dtype, float("nan"))
    err = emu.forward(value, om, out, *call_args(kwargs))
    assert err == "", err
    assert_guards_intact(buf, out)
    return out


def emulated_backward(emu, grad_out, value, om, kwargs, variant="atomic"):
    """As the CUDA binding does it: atomics into a zeroed float32 (float64) buffer, converted after (the
    16-bit types' own in a build that accumulates in them)."""
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if value.dtype in (torch.float16, torch.bfloat16) and emu.accumulates_16bit():
        acc_dtype = value.dtype
    acc_buf, acc = guarded(value.shape, acc_dtype, 0.0)
    gom_buf, gom = guarded(om.shape, om.dtype, float("nan"))
    err = emu.backward(grad_out, value, om, acc, gom, *call_args(kwargs), variant)
    assert err == "", err
    assert_guards_intact(acc_buf, acc)
    assert_guards_intact(gom_buf, gom)
    return acc.to(value.dtype), gom


def used_channels(kwargs):
    return 3 * kwargs["groups"] * (kwargs["kernel_size"][0] * kwargs["kernel_size"][1] - int(kwargs["remove_center"]))


def check_forward(emu, case, dtype, seed):
    value, om, kwargs = make_case(**case, seed=seed)
    value, om = value.to(dtype), om.to(dtype)
    ref = dcnv4_reference(value.double(), om.double(), **kwargs)
    out = emulated_forward(emu, value, om, kwargs)
    if ref.numel():
        assert torch.isfinite(out).all(), "unwritten (NaN) output elements"
        assert rel_err(out, ref) < FWD_TOL[dtype]


def check_backward(emu, case, dtype, seed, variant="atomic"):
    value, om, kwargs = make_case(**case, seed=seed)
    value, om = value.to(dtype), om.to(dtype)
    value64, om64 = value.double().requires_grad_(), om.double().requires_grad_()
    ref = dcnv4_reference(value64, om64, **kwargs)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
    gv, gom = emulated_backward(emu, grad_out, value, om, kwargs, variant)
    used = used_channels(kwargs)
    assert torch.isfinite(gom[..., :used]).all(), "unwritten (NaN) offset_mask gradient elements"
    assert torch.isnan(gom[..., used:]).all(), "the kernel must leave the padding channels to the binding"
    if ref.numel() == 0:
        return
    ref_gv, ref_gom = torch.autograd.grad(ref, (value64, om64), grad_out.double())
    assert rel_err(gv, ref_gv) < BWD_TOL[dtype]
    assert rel_err(gom[..., :used], ref_gom[..., :used]) < BWD_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", list(EMULATED), ids=str)
def test_emulated_forward_matches_reference(emu, case, dtype):
    check_forward(emu, EMULATED[case], dtype, seed=2 * list(EMULATED).index(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", ["13x9", "k5_D32", "remove_center", "far_offsets", "D36_scalar_half", "stride2"],
                         ids=str)
def test_emulated_forward_with_int64_indices(emu_index64, case, dtype):
    """The forward's int64 builds, which the launcher takes for tensors of 2^30 elements or more, with K = 9
    (3x3 cases) and with any K."""
    check_forward(emu_index64, EMULATED[case], dtype, seed=70 + list(EMULATED).index(case))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", ["13x9", "k5_D32", "remove_center", "D36_scalar_half"], ids=str)
def test_emulated_backward_with_int64_indices(emu_index64, case, dtype, variant):
    """The atomic backward's int64 builds (K = 9 and any K); the tiled kernel is int64 in every build."""
    check_backward(emu_index64, EMULATED[case], dtype, seed=80 + list(EMULATED).index(case), variant=variant)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", ["13x9", "k5_D32", "D64", "remove_center", "far_offsets", "stride2", "7x7_D4",
                                  "D36_scalar_half", "padded_P"], ids=str)
def test_emulated_forward_with_two_words_a_corner(emu_variants, case, dtype):
    """The forward built with DCNV4_FWD32_V=8 and DCNV4_FWD16_V=16 (the other groups keep one word a corner)."""
    check_forward(emu_variants, EMULATED[case], dtype, seed=90 + list(EMULATED).index(case))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", ["13x9", "k5_D32", "D64", "7x7_D4", "padded_P"], ids=str)
def test_emulated_backward_variants(emu_variants, case, dtype, variant):
    """The backward built with DCNV4_BWD32_V=8 (fp32 groups of a multiple of 8 take two words a corner) and
    DCNV4_BWD_SKIP_ZERO."""
    check_backward(emu_variants, EMULATED[case], dtype, seed=110 + list(EMULATED).index(case), variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_skips_the_corners_of_weight_zero(emu, emu_variants, variant):
    """At zero offsets every sampling position is a pixel: three corners of four have weight zero, and the
    DCNV4_BWD_SKIP_ZERO build sends grad_value only the fourth (the pixel itself), with the same result."""
    value, om, kwargs = make_case(N=2, H=7, W=6, G=2, D=16, seed=5)
    value, om = value.float(), om.float()
    om.view(2, 7, 6, 2, 27)[..., :18] = 0  # both groups' offsets; the masks kept
    grad_out = torch.randn(2, 7, 6, 32, generator=torch.Generator().manual_seed(6))
    gv, gom = emulated_backward(emu, grad_out, value, om, kwargs, variant)
    every = emu.counters()
    gv_s, gom_s = emulated_backward(emu_variants, grad_out, value, om, kwargs, variant)
    skipped = emu_variants.counters()

    def sent(c):
        return c["atomics16"] + c["atomics_shared"] + c["atomics_scalar"]

    if variant == "atomic":
        # A corner inside the 7x6 image costs 4 float4 atomics a task in both builds (4 lanes x 4 channels,
        # or 2 lanes x 8), 2 tasks (groups) a pixel; 3x3 taps with padding 1.
        points = sum(1 for ho in range(7) for wo in range(6) for i in (-1, 0, 1) for j in (-1, 0, 1)
                     if 0 <= ho + j < 7 and 0 <= wo + i < 6)
        corners = sum(1 for ho in range(7) for wo in range(6) for i in (-1, 0, 1) for j in (-1, 0, 1) for c in range(4)
                      if 0 <= ho + j + (c >> 1) < 7 and 0 <= wo + i + (c & 1) < 6)
        assert sent(every) == 2 * 2 * 4 * corners, every  # 2 images x 2 groups
        assert sent(skipped) == 2 * 2 * 4 * points, skipped
    assert sent(skipped) < sent(every) / 2, (every, skipped)
    torch.testing.assert_close(gv_s, gv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gom_s, gom, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", list(EMULATED), ids=str)
def test_emulated_backward_matches_reference(emu, case, dtype, variant):
    check_backward(emu, EMULATED[case], dtype, seed=2 * list(EMULATED).index(case) + 1, variant=variant)


@pytest.mark.parametrize("case", FLOAT64_CASES, ids=str)
def test_emulated_float64(emu, case):
    check_forward(emu, EMULATED[case], torch.float64, seed=40 + FLOAT64_CASES.index(case))
    for variant in VARIANTS:
        check_backward(emu, EMULATED[case], torch.float64, seed=50 + FLOAT64_CASES.index(case), variant=variant)


@pytest.mark.parametrize("case", ["13x9", "stride2", "dilation2", "k5_D32", "far_offsets", "28x28_tiles"], ids=str)
def test_tiled_backward_uses_shared_memory_and_fewer_global_atomics(emu, case):
    """The tiled kernel runs (the region fits), absorbs contributions in shared memory and sends fewer
    atomics to global memory than the atomic kernel; with far offsets most go global, still correct."""
    value, om, kwargs = make_case(**EMULATED[case], seed=21)
    value, om = value.float(), om.float()
    grad_out = torch.randn(value.shape[0], *om.shape[1:3], value.shape[3], generator=torch.Generator().manual_seed(3))
    gv_a, gom_a = emulated_backward(emu, grad_out, value, om, kwargs, "atomic")
    atomic = emu.counters()
    gv_t, gom_t = emulated_backward(emu, grad_out, value, om, kwargs, "tiled")
    tiled = emu.counters()
    assert atomic["atomics_shared"] == 0 and atomic["barriers"] == 0
    assert tiled["atomics_shared"] > 0 and tiled["barriers"] > 0, tiled
    global_atomic = atomic["atomics16"] + atomic["atomics_scalar"]
    global_tiled = tiled["atomics16"] + tiled["atomics_scalar"]
    if case != "far_offsets":
        assert global_tiled < global_atomic, (atomic, tiled)
    assert torch.equal(gom_t, gom_a)  # grad_offset_mask: same arithmetic, no atomics
    # Element by element, as tight as the float32 summation order allows: a contribution put on the
    # wrong pixel is a small part of the norm but not of its element.
    torch.testing.assert_close(gv_t, gv_a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_vector_and_scalar_paths(emu, dtype):
    """Aligned inputs with whole 16-byte chunks take the vector path (16-byte loads, and float4 atomics
    for the float32 buffer); a value one element off 16 bytes takes the scalar path, same results."""
    value, om, kwargs = make_case(N=2, H=6, W=5, G=2, D=16, seed=9)
    value, om = value.to(dtype), om.to(dtype)
    grad_out = torch.randn(2, 6, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = dcnv4_reference(value.double(), om.double(), **kwargs)

    out = emulated_forward(emu, value, om, kwargs)
    c = emu.counters()
    assert c["loads16"] > 0
    gv, gom = emulated_backward(emu, grad_out, value, om, kwargs)
    c = emu.counters()
    assert c["loads16"] > 0 and c["atomics16"] > 0 and c["atomics_scalar"] == 0, c
    gv_t, gom_t = emulated_backward(emu, grad_out, value, om, kwargs, "tiled")
    c = emu.counters()
    assert c["loads16"] > 0 and c["atomics16"] > 0 and c["atomics_scalar"] == 0, c

    shifted = placed(value, offset=1)
    assert shifted.data_ptr() % 16 != 0
    out_s = emulated_forward(emu, shifted, om, kwargs)
    assert emu.counters()["loads16"] == 0
    gv_s, gom_s = emulated_backward(emu, placed(grad_out), shifted, om, kwargs)
    c = emu.counters()
    assert c["loads16"] == 0 and c["atomics16"] == 0 and c["atomics_scalar"] > 0, c
    gv_st, gom_st = emulated_backward(emu, placed(grad_out), shifted, om, kwargs, "tiled")
    c = emu.counters()
    assert c["loads16"] == 0 and c["atomics16"] == 0 and c["atomics_scalar"] > 0, c

    assert rel_err(out_s, ref) < FWD_TOL[dtype] and rel_err(out, ref) < FWD_TOL[dtype]
    assert rel_err(gv_s, gv) < BWD_TOL[dtype] and rel_err(gom_s, gom) < BWD_TOL[dtype]
    for gv_x, gom_x in ((gv_t, gom_t), (gv_st, gom_st)):
        assert rel_err(gv_x, gv) < BWD_TOL[dtype] and rel_err(gom_x, gom) < BWD_TOL[dtype]


@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_offset_mask_gradient_is_deterministic(emu, variant):
    """grad_offset_mask is written without atomics: two runs agree bit for bit."""
    value, om, kwargs = make_case(N=2, H=7, W=6, G=2, D=16, seed=4)
    value, om = value.float(), om.float()
    grad_out = torch.randn(2, 7, 6, 32, generator=torch.Generator().manual_seed(2))
    _, gom_a = emulated_backward(emu, grad_out, value, om, kwargs, variant)
    _, gom_b = emulated_backward(emu, grad_out, value, om, kwargs, variant)
    assert torch.equal(gom_a, gom_b)


def test_emulator_runs_warp_shuffles(emu):
    err, out = emu.selftest("shuffle_sum", 20000)
    assert err == ""
    assert out == [float(sum(range(32)) + 32 * 32 * (t // 32 % 2)) for t in range(128)]


@pytest.mark.parametrize("which, message", [("divergent_shuffle", "deadlock"),
                                            ("out_of_bounds", "outside every registered buffer"),
                                            ("misaligned_vector", "not 16-byte aligned")])
def test_emulator_reports_broken_kernels(emu, which, message):
    """The checks the kernel tests rely on do fire: a lane that skips a shuffle, a read past a buffer
    and a misaligned 16-byte load are each reported."""
    err, _ = emu.selftest(which, 500)
    assert message in err


@pytest.mark.parametrize("offset_scale", [1e6, -3.0, float("nan")], ids=["huge", "negative", "nan"])
def test_tiled_backward_with_extreme_offset_scales(emu, offset_scale):
    """Offset scales that put every sample far outside (or nowhere): the tiled kernel's region stays
    inside the image and agrees with the atomic kernel (NaN: both propagate it, neither faults)."""
    value, om, kwargs = make_case(N=1, H=9, W=10, G=2, D=16, offset_scale=offset_scale, seed=31)
    value, om = value.float(), om.float()
    grad_out = torch.randn(1, 9, 10, 32, generator=torch.Generator().manual_seed(4))
    gv_a, gom_a = emulated_backward(emu, grad_out, value, om, kwargs, "atomic")
    gv_t, gom_t = emulated_backward(emu, grad_out, value, om, kwargs, "tiled")
    torch.testing.assert_close(gv_t, gv_a, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(gom_t, gom_a, rtol=0, atol=0, equal_nan=True)
    if offset_scale == offset_scale:  # finite: against the reference too
        check_backward(emu, dict(N=1, H=9, W=10, G=2, D=16, offset_scale=offset_scale), torch.float32, seed=31,
                       variant="tiled")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", ["13x9", "7x7_D4", "D264_many_chunks", "far_offsets"], ids=str)
def test_emulated_16bit_backward_with_4_channels_a_lane(emu_bwd16_v4, case, dtype, variant):
    """The 16-bit backward built with DCNV4_BWD16_V=4 matches the reference, on its vector path: 8-byte
    loads (none of 16 bytes) and float4 atomics."""
    check_backward(emu_bwd16_v4, EMULATED[case], dtype, seed=60 + list(EMULATED).index(case), variant=variant)
    if EMULATED[case]["D"] % 4 == 0:
        value, om, kwargs = make_case(**EMULATED[case], seed=3)
        value, om = value.to(dtype), om.to(dtype)
        grad_out = torch.randn(value.shape[0], *om.shape[1:3], value.shape[3],
                               generator=torch.Generator().manual_seed(4)).to(dtype)
        emulated_backward(emu_bwd16_v4, grad_out, value, om, kwargs, variant)
        c = emu_bwd16_v4.counters()
        assert c["loads16"] == 0 and c["atomics16"] + c["atomics_shared"] > 0 and c["atomics_scalar"] == 0, c


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", ["13x9", "k5_D32", "D36_scalar_half"], ids=str)
def test_emulated_16bit_accumulation(emu, emu_acc16, case, dtype, variant):
    """The 16-bit backward accumulating grad_value in its own type (DCNV4_BWD16_ACC16) stays within the 16-bit
    tolerance of the float64 reference; it is less precise than the float accumulator (a 16-bit sum loses its
    low bits at every addition), and grad_offset_mask, which it does not touch, is unchanged."""
    assert emu_acc16.accumulates_16bit() and not emu.accumulates_16bit()
    check_backward(emu_acc16, EMULATED[case], dtype, seed=130 + list(EMULATED).index(case), variant=variant)
    value, om, kwargs = make_case(**EMULATED[case], seed=5)
    value, om = value.to(dtype), om.to(dtype)
    grad_out = torch.randn(value.shape[0], *om.shape[1:3], value.shape[3],
                           generator=torch.Generator().manual_seed(8)).to(dtype)
    v64, om64 = value.double().requires_grad_(), om.double().requires_grad_()
    ref_gv, _ = torch.autograd.grad(dcnv4_reference(v64, om64, **kwargs), (v64, om64), grad_out.double())
    gv32, gom32 = emulated_backward(emu, grad_out, value, om, kwargs, variant)
    gv16, gom16 = emulated_backward(emu_acc16, grad_out, value, om, kwargs, variant)
    assert torch.equal(gom16, gom32)
    assert rel_err(gv16, ref_gv) < BWD_TOL[dtype]
    if variant == "atomic":
        # Every contribution is a 16-bit addition here (3.2-5.9x the float accumulator's error measured); the
        # tiled kernel sums a region in float first and adds it once.
        assert rel_err(gv16, ref_gv) > 2 * rel_err(gv32, ref_gv)

