"""The front door and its pages: README short, every link and file they name exists, and every table generated
from a JSON file the tools write is current (docs/tables.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "docs" / "tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)

PAGES = tables.pages()
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Repository paths named in backticks: files with an extension under the repo's own folders, or top-level scripts.
NAMED_FILE = re.compile(r"`((?:benchmarks|configs|docs|unet_dcnv4|pipelines|csrc|tests)/[\w./-]+\.\w+|\w+\.py)`")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the details belong in docs/"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:4] == ["## Install", "## Run", "## Test",
                            "## Quickstart: does the DCNv4 U-Net beat the conv U-Net?"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_named_files_exist(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            anchors = {slug(line.lstrip("#")) for line in resolved.read_text().splitlines() if line.startswith("#")}
            assert anchor in anchors, f"{page.name} links to {target}: no such heading in {resolved.name}"
    for name in NAMED_FILE.findall(text):
        assert (ROOT / name).exists() or any(ROOT.glob(f"**/{name}")), f"{page.name} names `{name}`, not in the repo"


def test_generated_tables_are_current():
    assert tables.main(["--check"]) == 0, "run python docs/tables.py"


def test_regenerate_fills_blocks_and_reports_bad_ones(tmp_path):
    data = {"gpu": "GPU X", "copy_GBps": 1000.0,
            "rows": [{"N": 2, "H": 4, "W": 4, "C": 16, "G": 1, "dtype": "float32", "best_fwd_impl": "a",
                      "best_fwd_x_floor": 3.25, "best_bwd_impl": "b", "best_bwd_x_floor": 10.0}]}
    (tmp_path / "anchors.json").write_text(json.dumps(data))
    page = "intro\n<!-- generated: anchors anchors.json -->\nstale text\n<!-- end generated -->\noutro\n"
    fresh = tables.regenerate(page, tmp_path)
    assert fresh.startswith("intro\n<!-- generated: anchors anchors.json -->\n") and fresh.endswith("outro\n")
    assert "stale text" not in fresh and "| 2, 4, 4, 16, 1 | float32 | 3.2 (a) | 10.0 (b) |" in fresh
    assert tables.regenerate(fresh, tmp_path) == fresh  # a second pass changes nothing
    with pytest.raises(ValueError, match="unknown generated table kind 'plot'"):
        tables.regenerate(page.replace("anchors anchors", "plot anchors"), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tables.regenerate(page.replace("anchors.json", "missing.json"), tmp_path)


def test_study_and_comparison_tables_render_from_their_json(tmp_path):
    row = {"row": "r1", "changes": "x=1", "label": "DCNv4", "block_out_channels": [32, 96], "parameters": 7e5,
           "parameter_ratio": 1.04, "gflops": 0.03, "gflops_ratio": 0.98, "num_runs": 3, "fid_mean": 150.0,
           "fid_std": 2.0, "kid_mean": 0.1, "kid_std": 0.01, "fid_difference": -3.5, "ci95": [-6.0, -1.0], "df": 4.0,
           "p_value": 0.01, "method": "Welch", "verdict": "DCNv4 lower FID", "p_holm": 0.01,
           "verdict_holm": "DCNv4 lower FID"}
    base = {**row, "row": "baseline", "changes": "model_type=conv", "fid_difference": None, "ci95": None, "df": None,
            "p_value": None, "method": None, "verdict": None, "p_holm": None, "verdict_holm": None}
    text = tables.render_study({"rows": [row, base]})
    assert "| r1 | x=1 | (32, 96) |" in text and "-3.50 [-6.00, -1.00]" in text and "p (Holm, 1 rows)" in text


def test_add_copies_a_result_with_portable_paths(tmp_path):
    root = Path("/repo/checkout")
    data = {"run_dir": "/repo/checkout/outputs/runs/seed0", "weights": "/usr/lib/python3/site-packages/pkg/w.pt",
            "runs": [{"reference": "/repo/checkout/.data/images at 32px"}], "fid": 1.5}
    assert tables.portable(data, root) == {"run_dir": "outputs/runs/seed0", "weights": "pkg/w.pt",
                                           "runs": [{"reference": ".data/images at 32px"}], "fid": 1.5}
    source = tmp_path / "comparison.json"
    source.write_text(json.dumps({"x": str(tables.ROOT.resolve() / "outputs" / "a")}))
    dest = tmp_path / "data" / "copy.json"
    assert tables.main(["--add", str(source), str(dest)]) == 0
    assert json.loads(dest.read_text()) == {"x": "outputs/a"}
    assert tables.main(["--add", str(tmp_path / "absent.json"), str(dest)]) == 2
    # outputs/ as a link to another disk: paths under its target are named through the link.
    checkout, disk = tmp_path / "checkout", tmp_path / "disk" / "outputs"
    checkout.mkdir()
    disk.mkdir(parents=True)
    (checkout / "outputs").symlink_to(disk)
    links = tables.linked_folders(checkout)
    assert links == {str(disk.resolve()): "outputs"}
    assert tables.portable({"run": f"{disk.resolve()}/runs/seed0"}, checkout, links) == {"run": "outputs/runs/seed0"}
