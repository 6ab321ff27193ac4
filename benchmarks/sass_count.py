"""Counts the CUDA kernels' SASS instructions, registers and spills per kernel instantiation, on a machine
without a GPU: nvcc compiles csrc/cuda/dcnv4_cuda.cu once per variant, cuobjdump disassembles it.

    python benchmarks/sass_count.py
    python benchmarks/sass_count.py --variants default= bwd16_v4=-DDCNV4_BWD16_V=4 --json sass.json
    python benchmarks/sass_count.py --arch sm_90 --keep /tmp/cubins --cuobjdump /path/to/cuobjdump

A variant is a name and extra nvcc flags (NAME=FLAGS, shell-split), added to the build's own flags
(unet_dcnv4.ops._build.NVCC_FLAGS). cuobjdump (and the nvdisasm it runs) come with a CUDA toolkit or
from pip: `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`.

The point loop is the loop over the K sampling points. Rule: every backward branch (a BRA to an address
at or below its own, other than the branch to itself that ends a kernel) closes a loop spanning [target,
branch]; the point loop is the shortest such span that contains a read-only global load (LDG ... .CONSTANT,
the __ldg of offsets, masks and corners). The loops around it (chunks, tasks) are longer and contain it;
the backward's lane-sum loops and shared-memory CAS loops hold no such load, nor do the jumps back from
the shuffles' divergent paths (which do reach over the backward's plain read of grad_offset_mask). Counts
are static: every instruction of the span once, though the backward's lane-sum loops inside it run
log2(lanes) times; code the compiler moved out of the span (the shuffles' divergent paths after the
kernel's EXIT) is not counted.

Points per loop iteration: the span's read-only global loads (LDG ... .CONSTANT) divided by the seven a
point makes (two offsets, one mask, four corners; a corner of more than 16 bytes, the fp32 forward's 8
channels, is two loads); `#pragma unroll 2` makes it 2 in the forward.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "csrc" / "cuda" / "dcnv4_cuda.cu"
DEFAULT_VARIANTS = ["default=", "bwd16_v4=-DDCNV4_BWD16_V=4"]
KERNELS = ("forward_kernel", "backward_kernel", "backward_tiled_kernel")
# Mangled template arguments <scalar_t, V, index_t, KC> of the forward and atomic backward kernels, e.g.
# ...14forward_kernelIfLi4EiLi9EEE... (int32_t, K = 9), <scalar_t, V, KC> of the tiled backward (int64
# indices), e.g. ...21backward_tiled_kernelIfLi4ELi0EEE..., and <scalar_t, V> as the kernels were before.
DTYPES = {"f": "fp32", "d": "fp64", "6__half": "fp16", "13__nv_bfloat16": "bf16"}
INDEX_TYPES = {"i": "int32", "l": "int64"}
KERNEL_RE = re.compile(r"\d+(" + "|".join(KERNELS) + r")I(" + "|".join(DTYPES) + r")Li(\d+)E(?:([il])?Li(\d+)E)?E")
LOADS_PER_POINT = 7  # two offsets, one mask, four corners, all read-only loads
ITEM_BYTES = {"fp32": 4, "fp64": 8, "fp16": 2, "bf16": 2}


def loads_per_point(dtype: str, V: int) -> int:
    """Read-only loads a point makes: two offsets and a mask, then each corner's V channels in 16-byte words
    (one word, or one scalar, when they take 16 bytes or fewer)."""
    return 3 + 4 * max(1, V * ITEM_BYTES[dtype] // 16)

# Instruction classes by base opcode (the part before the first '.'); uniform-datapath forms (UIADD3,
# ULDC, ...) are classed as their vector forms. Anything not listed is "other".
INT_OPS = frozenset("""IMAD IMADSP IMUL IADD IADD3 IADD32I LEA SHF SHL SHR LOP LOP3 LOP32I ISETP ICMP SEL IABS
    IMNMX VIMNMX VIADD VIADDMNMX FLO POPC BREV BMSK SGXT PRMT I2F F2I I2I I2IP F2IP IDP ISCADD BFE BFI XMAD
    VABSDIFF VABSDIFF4""".split())
FLOAT_OPS = frozenset("""FFMA FFMA32I FMUL FMUL32I FADD FADD32I FSETP FSET FSEL FMNMX FCHK FRND MUFU F2F F2FP
    HADD2 HADD2_F32 HMUL2 HFMA2 HSETP2 HSET2 HMNMX2 DADD DMUL DFMA DSETP DMNMX FSWZADD HMMA""".split())
MEMORY_OPS = frozenset("""LDG STG LD ST LDS STS LDL STL LDC RED REDG ATOM ATOMG ATOMS LDSM LDGSTS LDGDEPBAR
    CCTL MEMBAR FENCE ERRBAR""".split())
CLASSES = ("int", "float", "memory", "other")

INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
FUNCTION_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
HEX_RE = re.compile(r"0x[0-9a-f]+")
PTXAS_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
PTXAS_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REG_RE = re.compile(r"Used (\d+) registers")


class ToolError(RuntimeError):
    """A tool is missing or failed; the message is one line for the user."""


@dataclass(frozen=True)
class Instr:
    addr: int  # byte offset in the kernel
    opcode: str  # with modifiers, e.g. LDG.E.128.CONSTANT
    operands: str
    pred: str = ""  # guard predicate, e.g. @!P0

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def target(self) -> int | None:
        """A direct branch's target address (BRA, the last hex operand), else None."""
        if self.base != "BRA":
            return None
        found = HEX_RE.findall(self.operands)
        return int(found[-1], 16) if found else None


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """`cuobjdump -sass` output -> {mangled kernel name: its instructions in address order}."""
    kernels: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        m = FUNCTION_RE.match(line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = INSTR_RE.match(line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), (m.group(2) or "").strip()))
    return kernels


def classify(opcode: str) -> str:
    """The class of an opcode (with or without modifiers): "int" (integer, address and conversion work),
    "float", "memory" or "other" (moves, branches, barriers, predicates, shuffles)."""
    base = opcode.split(".")[0]
    for name in (base, base[1:] if base.startswith("U") else None):
        if name in INT_OPS:
            return "int"
        if name in FLOAT_OPS:
            return "float"
        if name in MEMORY_OPS:
            return "memory"
    return "other"


def counted(instrs: list[Instr]) -> list[Instr]:
    """The instructions that do work: not the NOP padding, not the branch-to-self that ends a kernel."""
    return [i for i in instrs if i.base != "NOP" and i.target != i.addr]


def is_readonly_load(i: Instr) -> bool:
    """A load through the read-only path (LDG ... .CONSTANT): the kernels' __ldg of offsets, masks and corners."""
    return i.base == "LDG" and "CONSTANT" in i.opcode.split(".")


def point_loop(instrs: list[Instr]) -> list[Instr]:
    """The body of the innermost loop with a read-only global load (the rule in the module docstring),
    from the branch target to the backward branch inclusive; [] when there is none."""
    index = {i.addr: n for n, i in enumerate(instrs)}
    best: tuple[int, int] | None = None
    for end, ins in enumerate(instrs):
        t = ins.target
        if t is None or t >= ins.addr or t not in index:
            continue
        start = index[t]
        if any(is_readonly_load(i) for i in instrs[start:end + 1]) and (best is None or end - start < best[1] - best[0]):
            best = (start, end)
    return [] if best is None else instrs[best[0]:best[1] + 1]


def class_counts(instrs: list[Instr]) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    for i in counted(instrs):
        counts[classify(i.opcode)] += 1
    return counts


def kernel_id(mangled: str) -> tuple[str, str, int, str] | None:
    """(kernel, dtype, V, build) of a mangled instantiation name, None for other functions. build names the
    index type and K ("int32 K=9", "int64 K any"; int64 where K is the only other argument), "" for
    instantiations of <scalar_t, V> alone."""
    m = KERNEL_RE.search(mangled)
    if m is None:
        return None
    index = INDEX_TYPES[m.group(4) or "l"]
    build = "" if m.group(5) is None else f"{index} K={m.group(5)}" if int(m.group(5)) else f"{index} K any"
    return m.group(1), DTYPES[m.group(2)], int(m.group(3)), build


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """`-Xptxas -v` output -> {mangled kernel: registers, stack, spill_stores, spill_loads (bytes)}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = PTXAS_ENTRY_RE.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := PTXAS_SPILL_RE.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := PTXAS_REG_RE.search(line)):
            current["registers"] = int(m.group(1))
    return out


def rows(variant: str, sass: str, ptxas: str) -> list[dict]:
    """One row per kernel instantiation: resources, instruction counts, the point loop's counts."""
    resources = parse_ptxas(ptxas)
    out = []
    for mangled, instrs in parse_sass(sass).items():
        ident = kernel_id(mangled)
        if ident is None:
            continue
        kernel, dtype, V, build = ident
        loop = counted(point_loop(instrs))
        loads = sum(1 for i in loop if is_readonly_load(i))
        points = loads / loads_per_point(dtype, V)
        points = int(points) if points.is_integer() else points
        res = resources.get(mangled, {})
        row = {
            "variant": variant, "kernel": kernel, "dtype": dtype, "V": V, "build": build,
            "registers": res.get("registers", 0),
            "spill_bytes": res.get("spill_stores", 0) + res.get("spill_loads", 0),
            "stack_bytes": res.get("stack", 0),
            "total": len(counted(instrs)), "total_classes": class_counts(instrs),
            "loop": len(loop), "loop_classes": class_counts(loop), "loop_global_loads": loads,
            "points_per_iter": points,
            "per_point": len(loop) / points if points else None,
        }
        row["per_point_channel"] = row["per_point"] / V if points else None
        out.append(row)
    order = {k: n for n, k in enumerate(KERNELS)}
    dorder = {d: n for n, d in enumerate(("fp32", "bf16", "fp16", "fp64"))}
    return sorted(out, key=lambda r: (order[r["kernel"]], dorder[r["dtype"]], -r["V"], r["build"]))


def find_cuobjdump(override: str | None = None) -> str:
    """cuobjdump: the override, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin or the pip package's bin/."""
    if override:
        if not (Path(override).is_file() and os.access(override, os.X_OK)):
            raise ToolError(f"--cuobjdump {override}: not an executable file")
        return override
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "cuobjdump"))
    try:
        import nvidia  # the pip wheels' namespace package: nvidia/cu13/bin/cuobjdump, nvidia/cuda_cuobjdump/bin/...

        for root in nvidia.__path__:
            candidates += sorted(str(p) for p in Path(root).glob("*/bin/cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise ToolError("cuobjdump not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, pip's nvidia/*/bin); "
                    "get it with `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` or pass --cuobjdump PATH")


def find_nvcc() -> str:
    from unet_dcnv4.ops._build import find_nvcc as build_nvcc

    nvcc = build_nvcc()
    if nvcc is None:
        raise ToolError("nvcc not found (CUDA_HOME, /usr/local/cuda/bin or PATH); install a CUDA toolkit")
    return nvcc


def _run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise ToolError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {last[-1] if last else 'no output'}")
    return proc.stdout + proc.stderr


def compile_and_count(variant: str, flags: list[str], arch: str, folder: Path, nvcc: str, cuobjdump: str,
                      source: Path = SOURCE) -> list[dict]:
    """Compile `source` to folder/<variant>.cubin with the build's nvcc flags plus `flags`, and count it."""
    from unet_dcnv4.ops._build import NVCC_FLAGS

    cubin = folder / f"{variant}.cubin"
    ptxas = _run([nvcc, *NVCC_FLAGS, *flags, f"-arch={arch}", "-cubin", "-Xptxas", "-v",
                  "-I", str(source.parents[1]), "-I", str(source.parent), "-o", str(cubin), str(source)])
    # cuobjdump runs nvdisasm for -sass: the pip wheels install it next to cuobjdump.
    env = dict(os.environ)
    env["PATH"] = str(Path(cuobjdump).parent) + os.pathsep + env.get("PATH", "")
    sass = _run([cuobjdump, "-sass", str(cubin)], env=env)
    return rows(variant, sass, ptxas)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--variants: expected NAME=FLAGS with NAME of letters, digits, _ . -, got {text!r}")
    return name, shlex.split(flags)


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))


def table(rows_: list[dict]) -> str:
    """A markdown table of the rows: resources, totals, the point loop and its classes."""
    head = ["variant", "kernel", "dtype", "V", "build", "regs", "spill B", "total", "loop", "int", "float", "mem", "other",
            "pts/iter", "instr/pt", "instr/pt-ch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows_:
        c = r["loop_classes"]
        cells = [r["variant"], r["kernel"], r["dtype"], r["V"], r["build"] or "-", r["registers"], r["spill_bytes"], r["total"], r["loop"],
                 c["int"], c["float"], c["memory"], c["other"], r["points_per_iter"], r["per_point"],
                 r["per_point_channel"]]
        lines.append("| " + " | ".join(_fmt(x) for x in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME=FLAGS",
                        help="nvcc variants to compile (default: %(default)s)")
    parser.add_argument("--arch", default="sm_90", help="nvcc -arch (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--keep", type=Path, help="keep the cubins in this folder")
    parser.add_argument("--cuobjdump", help="the cuobjdump to run (default: searched)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the .cu file (default: the repository's)")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        parser.error(str(e))
    if len({n for n, _ in variants}) != len(variants):
        parser.error("--variants: names must be distinct")
    if not args.source.is_file():
        parser.error(f"--source {args.source}: no such file")
    try:
        nvcc = find_nvcc()
        cuobjdump = find_cuobjdump(args.cuobjdump)
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            out = []
            for name, flags in variants:
                print(f"sass_count: {name}: nvcc {' '.join(flags) or '(build flags only)'} -arch={args.arch}",
                      file=sys.stderr, flush=True)
                out += compile_and_count(name, flags, args.arch, folder, nvcc, cuobjdump, args.source)
    except ToolError as e:
        print(f"sass_count.py: {e}", file=sys.stderr)
        return 1
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
