"""benchmarks/sass_count.py: the SASS parsing, instruction classes and point-loop rule on hand-written SASS,
and one run on the real kernels (skipped where nvcc or cuobjdump is missing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_count_script", ROOT / "benchmarks" / "sass_count.py")
sc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sc  # dataclasses look their module up there
_spec.loader.exec_module(sc)

FORWARD_F32 = "_ZN5dcnv446_GLOBAL__N__7c139f1b_13_dcnv4_cuda_cu_03b7084014forward_kernelIfLi4EEEvNS_6ParamsEPKT_S5_PS3_iil"


def sass(name: str, lines: list[str]) -> str:
    """cuobjdump -sass text of one function whose instructions are `lines`, 16 bytes apart."""
    out = ["", "\tcode for sm_90", f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"']
    for n, text in enumerate(lines):
        out.append(f"        /*{16 * n:04x}*/                   {text} ;                      /* 0x00000a00ff017b82 */")
        out.append("                                                                      /* 0x000fe20000000800 */")
    return "\n".join(out) + "\n"


# Outer loop [0x20, 0x140] around the point loop [0x40, 0x100] (seven read-only loads: one point) and a
# lane-sum loop without loads [0x110, 0x120]; after EXIT a cold path jumps back over a plain load (a
# shorter span than the point loop), then the branch to itself that ends a kernel, and padding.
LINES = [
    "LDC R1, c[0x0][0x28]",                                 # 0x000
    "S2R R0, SR_TID.X",                                     # 0x010
    "IMAD.WIDE.U32 R4, R0, 0x4, R2",                        # 0x020 outer loop
    "LDG.E.128.CONSTANT R24, desc[UR4][R4.64]",             # 0x030 a load of the outer loop only
    "LDG.E.CONSTANT R6, desc[UR4][R4.64]",                  # 0x040 point loop
    "LDG.E.CONSTANT R7, desc[UR4][R4.64+0x4]",              # 0x050
    "LDG.E.CONSTANT R8, desc[UR4][R4.64+0x8]",              # 0x060
    "LEA R10, P0, R7, R2, 0x4",                             # 0x070
    "IADD3.X R11, R3, RZ, RZ, P0, !PT",                     # 0x080
    "@P3 LDG.E.128.CONSTANT R12, desc[UR4][R10.64]",        # 0x090
    "@P4 LDG.E.128.CONSTANT R16, desc[UR4][R10.64+0x10]",   # 0x0a0
    "@P5 LDG.E.128.CONSTANT R20, desc[UR4][R10.64+0x20]",   # 0x0b0
    "@P6 LDG.E.128.CONSTANT R24, desc[UR4][R10.64+0x30]",   # 0x0c0
    "FFMA R26, R12, R13, R26",                              # 0x0d0
    "ISETP.GE.AND P0, PT, R7, R9, PT",                      # 0x0e0
    "@!P0 BRA 0x40",                                        # 0x0f0 closes the point loop
    "HFMA2 R17, R14, R15, R17",                             # 0x100
    "SHFL.BFLY PT, R18, R26, 0x1, 0x1f",                    # 0x110 lane-sum loop
    "@P1 BRA 0x110",                                        # 0x120
    "STG.E desc[UR4][R4.64], R26",                          # 0x130
    "@P2 BRA 0x20",                                         # 0x140 closes the outer loop
    "LDG.E R20, desc[UR4][R4.64]",                          # 0x150 plain load (grad_offset_mask's read-back)
    "EXIT",                                                 # 0x160
    "BRA 0x150",                                            # 0x170 cold path's jump back
    "BRA 0x180",                                            # 0x180 the end
    "NOP",                                                  # 0x190
]
POINT_LOOP = (0x40, 0xF0)
TEXT = sass(FORWARD_F32, LINES)

PTXAS = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{FORWARD_F32}' for 'sm_90'
ptxas info    : Function properties for {FORWARD_F32}
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers
ptxas info    : Compile time = 68.572 ms
"""


def test_parse_sass():
    kernels = sc.parse_sass(TEXT)
    assert list(kernels) == [FORWARD_F32]
    instrs = kernels[FORWARD_F32]
    assert len(instrs) == len(LINES)
    assert [i.addr for i in instrs] == [16 * n for n in range(len(LINES))]
    ld = instrs[9]
    assert (ld.pred, ld.opcode, ld.base, ld.operands) == ("@P3", "LDG.E.128.CONSTANT", "LDG", "R12, desc[UR4][R10.64]")
    assert instrs[15].target == 0x40 and instrs[15].pred == "@!P0"
    assert instrs[0].target is None and instrs[22].target is None  # LDC, EXIT
    assert [i.base for i in sc.counted(instrs)][-3:] == ["LDG", "EXIT", "BRA"]  # no NOP, no branch to itself


def test_parse_sass_keeps_lowercase_modifiers():
    text = sass("k", ["REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR26][R24.64], R20", "BRA 0x10"])
    red = sc.parse_sass(text)["k"][0]
    assert (red.opcode, red.base, sc.classify(red.opcode)) == ("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU", "REDG", "memory")


@pytest.mark.parametrize("opcode,cls", [
    ("IMAD.WIDE.U32", "int"), ("IMAD.MOV.U32", "int"), ("IADD3.X", "int"), ("LEA.HI.X", "int"),
    ("SHF.R.S64", "int"), ("LOP3.LUT", "int"), ("ISETP.GE.U32.AND", "int"), ("SEL", "int"), ("IABS", "int"),
    ("I2F.F64.S64", "int"), ("F2I.FTZ.TRUNC.NTZ", "int"), ("UIADD3", "int"), ("UIMAD.WIDE.U32", "int"),
    ("FFMA", "float"), ("FMUL.FTZ", "float"), ("FADD", "float"), ("HFMA2.MMA", "float"), ("F2F.F32.F64", "float"),
    ("F2FP.BF16.F32.PACK_AB", "float"), ("DFMA", "float"), ("FSETP.GT.AND", "float"), ("FRND.FLOOR", "float"),
    ("LDG.E.128.CONSTANT", "memory"), ("STG.E.128", "memory"), ("REDG.E.ADD.F32x4", "memory"), ("LDS", "memory"),
    ("ATOMS.CAS", "memory"), ("LDC.64", "memory"), ("ULDC.64", "memory"),
    ("BRA", "other"), ("BSSY", "other"), ("BSYNC", "other"), ("SHFL.BFLY", "other"), ("PLOP3.LUT", "other"),
    ("MOV", "other"), ("UMOV", "other"), ("S2R", "other"), ("EXIT", "other"), ("WARPSYNC.COLLECTIVE", "other"),
])
def test_classify(opcode, cls):
    assert sc.classify(opcode) == cls


def test_point_loop_is_the_innermost_with_readonly_loads():
    loop = sc.point_loop(sc.parse_sass(TEXT)[FORWARD_F32])
    assert (loop[0].addr, loop[-1].addr) == POINT_LOOP
    assert sum(sc.is_readonly_load(i) for i in loop) == sc.LOADS_PER_POINT


@pytest.mark.parametrize("dtype,V,loads", [("fp32", 4, 7), ("fp32", 8, 11), ("fp32", 1, 7), ("bf16", 8, 7),
                                          ("fp16", 4, 7), ("fp64", 1, 7)])
def test_loads_per_point(dtype, V, loads):
    assert sc.loads_per_point(dtype, V) == loads


def test_point_loop_none():
    assert sc.point_loop(sc.parse_sass(sass("k", ["LDG.E.CONSTANT R1, desc[UR4][R2.64]", "EXIT"]))["k"]) == []
    assert sc.point_loop(sc.parse_sass(sass("k", ["IADD3 R1, R1, 0x1, RZ", "@P0 BRA 0x0", "EXIT"]))["k"]) == []


def test_rows_on_snippet():
    (row,) = sc.rows("v", TEXT, PTXAS)
    assert (row["variant"], row["kernel"], row["dtype"], row["V"]) == ("v", "forward_kernel", "fp32", 4)
    assert (row["registers"], row["spill_bytes"], row["stack_bytes"]) == (64, 28, 8)
    assert row["total"] == len(LINES) - 2
    assert row["loop"] == 12 and row["points_per_iter"] == 1
    assert row["loop_classes"] == {"int": 3, "float": 1, "memory": 7, "other": 1}
    assert row["per_point"] == 12 and row["per_point_channel"] == 3
    assert "| v | forward_kernel | fp32 | 4 | - | 64 | 28 | 24 | 12 | 3 | 1 | 7 | 1 | 1 | 12.0 | 3.0 |" in sc.table([row])


@pytest.mark.parametrize("suffix,ident", [
    ("14forward_kernelIfLi4EiLi9EEEvNS_6ParamsEPKT_S5_PS3_iiT1_", ("forward_kernel", "fp32", 4, "int32 K=9")),
    ("14forward_kernelI13__nv_bfloat16Li8ElLi0EEEvNS_6ParamsEPKT_S6_PS4_iiT1_",
     ("forward_kernel", "bf16", 8, "int64 K any")),
    ("14forward_kernelIfLi4EEEvNS_6ParamsEPKT_S5_PS3_iil", ("forward_kernel", "fp32", 4, "")),  # before the builds
    ("15backward_kernelI6__halfLi1EEEvNS_6ParamsEPKT_S6_S6_PNS0_3AccIS4_E4typeEPS4_iil",
     ("backward_kernel", "fp16", 1, "")),  # before the builds
    ("15backward_kernelI6__halfLi8EiLi9EEEvNS_6ParamsEPKT_S6_S6_PNS0_3AccIS4_E4typeEPS4_iiT1_",
     ("backward_kernel", "fp16", 8, "int32 K=9")),
    ("21backward_tiled_kernelIfLi4ELi0EEEvNS_6ParamsEPKT_S5_S5_PNS0_3AccIS3_E4typeEPS3_iiNS0_6TilingE",
     ("backward_tiled_kernel", "fp32", 4, "int64 K any")),
    ("21backward_tiled_kernelIdLi1EEEvNS_6ParamsEPKT_S5_S5_PNS0_3AccIS3_E4typeEPS3_iiNS0_6TilingE",
     ("backward_tiled_kernel", "fp64", 1, "")),
])
def test_kernel_id(suffix, ident):
    assert sc.kernel_id("_ZN5dcnv446_GLOBAL__N__7c139f1b_13_dcnv4_cuda_cu_03b70840" + suffix) == ident
    assert sc.kernel_id("_Z10some_otherv") is None


def test_parse_ptxas():
    assert sc.parse_ptxas(PTXAS) == {FORWARD_F32: {"stack": 8, "spill_stores": 12, "spill_loads": 16, "registers": 64}}


def test_cli_errors(capsys):
    with pytest.raises(SystemExit) as e:
        sc.main(["--variants", "noequals"])
    assert e.value.code == 2
    assert "--variants: expected NAME=FLAGS" in capsys.readouterr().err
    assert sc.main(["--cuobjdump", "/nonexistent/cuobjdump"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sass_count.py: ")


def _tools_missing() -> str | None:
    try:
        sc.find_nvcc()
        sc.find_cuobjdump()
    except sc.ToolError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def real_rows(tmp_path_factory):
    missing = _tools_missing()
    if missing:
        pytest.skip(f"needs nvcc and cuobjdump: {missing}")
    folder = tmp_path_factory.mktemp("sass")
    assert sc.main(["--json", str(folder / "rows.json"), "--keep", str(folder)]) == 0  # both default variants
    assert (folder / "default.cubin").is_file() and (folder / "bwd16_v4.cubin").is_file()
    return json.loads((folder / "rows.json").read_text())


BUILDS = ("int32 K=9", "int32 K any", "int64 K=9", "int64 K any")


def _expected(bwd16_v: int) -> set[tuple[str, str, int, str]]:
    widths = {"fp32": (4, 1), "bf16": (8, 1), "fp16": (8, 1), "fp64": (1,)}
    out = {("forward_kernel", d, v, b) for d, vs in widths.items() for v in vs for b in BUILDS}
    widths["bf16"] = widths["fp16"] = (bwd16_v, 1)
    out |= {("backward_kernel", d, v, b) for d, vs in widths.items() for v in vs for b in BUILDS}
    return out | {("backward_tiled_kernel", d, v, b) for d, vs in widths.items() for v in vs for b in BUILDS[2:]}


def test_real_kernels(real_rows):
    by_variant: dict[str, dict] = {}
    for r in real_rows:
        by_variant.setdefault(r["variant"], {})[(r["kernel"], r["dtype"], r["V"], r["build"])] = r
        assert r["registers"] > 0 and r["loop"] > 0 and r["total"] > r["loop"]
        # Points per iteration: the forward's #pragma unroll (3 with K = 9, 2 for any K), the backward's 1.
        forward = r["kernel"] == "forward_kernel"
        assert r["points_per_iter"] == ((3 if "K=9" in r["build"] else 2) if forward else 1)
    assert set(by_variant["default"]) == _expected(8)
    assert set(by_variant["bwd16_v4"]) == _expected(4)
    counts = ("registers", "spill_bytes", "total", "loop", "loop_classes", "total_classes")
    default, v4 = by_variant["default"], by_variant["bwd16_v4"]
    for key, row in default.items():
        kernel, dtype, V, _ = key
        if kernel == "forward_kernel" or dtype in ("fp32", "fp64") or V == 1:  # untouched by the switch
            assert all(row[c] == v4[key][c] for c in counts), key
    for kernel in ("backward_kernel", "backward_tiled_kernel"):
        for dtype in ("bf16", "fp16"):
            assert default[(kernel, dtype, 8, "int64 K=9")]["loop"] != v4[(kernel, dtype, 4, "int64 K=9")]["loop"]
            assert default[(kernel, dtype, 8, "int64 K=9")]["total"] != v4[(kernel, dtype, 4, "int64 K=9")]["total"]
