"""The op's times under several kernel builds side by side: reads the `bench_op.py --out` JSON of each build
(<folder>/bench_<build>.json, as benchmarks/gpu_check.sh writes them) and prints, per shape, dtype and
offset std, each build's forward and backward milliseconds, the fastest build, and the first build against
the second (default against before, in gpu_check's order) and against the memory floor.

    python benchmarks/compare_builds.py benchmarks/out default before unroll9 wide skip0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DIRECTIONS = (("forward", "fwd_ms", "floor_fwd_ms"), ("backward (atomic kernel)", "bwd_ms", "floor_bwd_ms"),
              ("backward (tiled kernel)", "bwd_tiled_ms", "floor_bwd_ms"))


def row_key(row: dict) -> tuple:
    return (row["N"], row["H"], row["W"], row["C"], row["G"], row["dtype"], row.get("offset_std", 2.0))


def read_builds(folder: Path, builds: list[str]) -> dict[str, dict[tuple, dict]]:
    """build -> row key -> row, for the builds whose JSON exists."""
    runs = {}
    for build in builds:
        path = folder / f"bench_{build}.json"
        if path.is_file():
            runs[build] = {row_key(r): r for r in json.loads(path.read_text())["rows"]}
    return runs


def tables(runs: dict[str, dict[tuple, dict]]) -> str:
    """One table per direction over the keys every build measured; the first build is the reference."""
    builds = list(runs)
    if not builds:
        return "no build was measured"
    first, second = builds[0], builds[1] if len(builds) > 1 else None
    keys = [k for k in runs[first] if all(k in runs[b] for b in builds)]
    lines = []
    for title, field, floor in DIRECTIONS:
        lines.append(f"{title}, ms")
        head = ["shape N,H,W,C,G", "dtype", "std", *builds, "fastest"]
        if second:
            head.append(f"{first} / {second}")
        head.append(f"{first} x floor")
        lines.append(" | ".join(head))
        for key in keys:
            ms = {b: runs[b][key][field] for b in builds}
            cells = [",".join(map(str, key[:5])), key[5], f"{key[6]:g}", *(f"{ms[b]:.4f}" for b in builds),
                     min(ms, key=ms.get)]
            if second:
                cells.append(f"{ms[first] / ms[second]:.2f}")
            cells.append(f"{ms[first] / runs[first][key][floor]:.2f}")
            lines.append(" | ".join(cells))
        lines.append("")
    errors = {b: max(r["err_fwd"] for r in runs[b].values()) for b in builds}
    lines.append("largest forward error against the fp32 reference: " +
                 ", ".join(f"{b} {e:.2e}" for b, e in errors.items()))
    missing = sorted(set().union(*(set(r) for r in runs.values())) - set(keys))
    if missing:
        lines.append(f"left out: {len(missing)} rows not measured by every build")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where bench_<build>.json are")
    parser.add_argument("builds", nargs="+", help="the builds, the reference first")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"compare_builds.py: folder {str(args.folder)!r} does not exist", file=sys.stderr)
        return 2
    runs = read_builds(args.folder, args.builds)
    absent = [b for b in args.builds if b not in runs]
    if absent:
        print(f"compare_builds.py: no bench_<build>.json for {absent} in {args.folder}; left out", file=sys.stderr)
    print(tables(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
