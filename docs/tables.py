"""Regenerates the tables of the documentation from the JSON files the repo's tools write, so that a rerun
updates the pages instead of someone retyping them.

A generated block in a markdown file is

    <!-- generated: KIND PATH -->
    ...
    <!-- end generated -->

with PATH relative to the repository root and KIND one of

    comparison  a comparison.json of compare.py / design_study.py: the arms, the FID difference and its interval,
                and the FID curves when the runs have them
    study       a study.json of benchmarks/design_study.py: one row per design choice, Holm-corrected
    bench_op    a JSON of benchmarks/bench_op.py --out: the op against its memory floor
    anchors     benchmarks/anchors_h100.json: the best earlier implementations per shape

    python docs/tables.py            # rewrite every block of README.md and docs/*.md
    python docs/tables.py --check    # exit 1 and name the blocks that are out of date
    python docs/tables.py --add outputs/study/comparisons/default/comparison.json docs/data/study/comparison.json

`--add` copies a result into docs/data with the machine's paths made relative (the repository's to the
repository, those under a linked folder's target, such as outputs/ on another disk, through the link, installed
packages' to the package), so that a page can name it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (\w+) (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_comparison(data: dict) -> str:
    """compare.py's report; the FID curves are analysed here when the file predates their analysis."""
    from unet_dcnv4.comparison import markdown_table
    from unet_dcnv4.curves import curve_analysis

    if not data.get("curves") and all(len(run.get("fid_curve", [])) > 1 for arm in data["arms"] for run in arm["runs"]):
        data = {**data, "curves": curve_analysis(*data["arms"])}
    return markdown_table(data)


def render_study(data: dict) -> str:
    return _benchmark("design_study").rows_markdown(data["rows"])


def render_bench_op(data: dict) -> str:
    device = "cpu" if data["env"].get("device") == "cpu" else "cuda"
    head = ", ".join(f"{k} {v}" for k, v in data["env"].items())
    return f"{head}\n\n```\n{_benchmark('bench_op').table(device, data['rows'])}\n```\n"


def render_anchors(data: dict) -> str:
    lines = [f"{data['gpu']}, device-to-device copy {data['copy_GBps']:.0f} GB/s. Best correct earlier implementation "
             "per shape and dtype, as a multiple of the memory floor:", "",
             "| N, H, W, C, G | dtype | forward x floor (implementation) | backward x floor (implementation) |",
             "| --- | --- | ---: | ---: |"]
    for r in data["rows"]:
        cells = []
        for d in ("fwd", "bwd"):
            x = r.get(f"best_{d}_x_floor")
            cells.append("-" if x is None else f"{x:.1f} ({r[f'best_{d}_impl']})")
        lines.append(f"| {r['N']}, {r['H']}, {r['W']}, {r['C']}, {r['G']} | {r['dtype']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


RENDERERS = {"comparison": render_comparison, "study": render_study, "bench_op": render_bench_op,
             "anchors": render_anchors}


def regenerate(text: str, root: Path = ROOT) -> str:
    """`text` with every generated block rendered afresh from its JSON file."""
    def block(match: re.Match) -> str:
        kind, path = match.group(2), match.group(3)
        if kind not in RENDERERS:
            raise ValueError(f"unknown generated table kind {kind!r} (for {path}); kinds: {sorted(RENDERERS)}")
        source = root / path
        if not source.is_file():
            raise FileNotFoundError(f"generated table {kind} {path}: no such file")
        body = RENDERERS[kind](json.loads(source.read_text()))
        return f"{match.group(1)}\n{body.rstrip()}\n\n{match.group(5)}"

    return BLOCK.sub(block, text)


def linked_folders(root: Path = ROOT) -> dict[str, str]:
    """The folders of `root` that are links elsewhere (e.g. outputs/ on a larger disk): target -> name."""
    return {str(entry.resolve()): entry.name for entry in root.iterdir() if entry.is_symlink() and entry.is_dir()}


def portable(value, root: Path = ROOT, links: dict[str, str] | None = None):
    """`value` (parsed JSON) with absolute paths made relative: under `root` to it, under the target of one of
    its linked folders (`links`, target -> name) to that folder's name, inside an installed package
    (site-packages) to the package."""
    if isinstance(value, dict):
        return {k: portable(v, root, links) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root, links) for v in value]
    if isinstance(value, str):
        for target, name in (links or {}).items():
            value = value.replace(target + "/", name + "/")
        value = value.replace(str(root) + "/", "")
        return re.sub(r"/\S*/(?:site|dist)-packages/", "", value)
    return value


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    parser.add_argument("--add", nargs=2, metavar=("SOURCE", "DEST"),
                        help="copy the JSON file SOURCE to DEST (under docs/data) with portable paths, then regenerate")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.add:
        source, dest = Path(args.add[0]), Path(args.add[1])
        if not source.is_file():
            print(f"tables.py: --add: {source} does not exist", file=sys.stderr)
            return 2
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = portable(json.loads(source.read_text()), ROOT.resolve(), linked_folders(ROOT))
        dest.write_text(json.dumps(data, indent=1) + "\n")
    stale = []
    try:
        for page in pages():
            text = page.read_text()
            fresh = regenerate(text)
            if fresh != text:
                stale.append(page.relative_to(ROOT))
                if not args.check:
                    page.write_text(fresh)
    except (ValueError, FileNotFoundError) as error:
        print(f"tables.py: {error}", file=sys.stderr)
        return 2
    if args.check and stale:
        print("out of date (run python docs/tables.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(map(str, stale))) if stale else "every generated table is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
