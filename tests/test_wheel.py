"""The package as a user gets it: a wheel built from the repository, installed into a folder outside the
checkout, builds its kernels from the sources it carries, runs the op against the reference and loads a
saved pipeline folder in a fresh process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline_cases import load_in_fresh_process

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is not built from: version control, build outputs, caches, runs and data.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs",
                                     "outputs", ".whl", ".data", "out", "*.so")

# Run with the wheel's folder first on sys.path and the checkout's tests folder last (for the tiny
# pipeline): the op from the installed sources, forward and backward against the reference in float64,
# then a saved pipeline with a DCNv4 U-Net for the fresh-process load.
WHEEL_CHECK = """
import os
import sys
import torch
site, tests, folder = sys.argv[1:4]
sys.path.append(tests)
import pipelines
import unet_dcnv4
from unet_dcnv4.ops import _build, dcnv4, dcnv4_reference
from unet_dcnv4.unet import build_unet
from pipeline_cases import save_for_fresh_load, tiny_pipeline
for where in (unet_dcnv4.__file__, pipelines.__file__, _build.CSRC):
    assert str(where).startswith(site), f"{where} is not in the wheel's folder {site}"

gen = torch.Generator().manual_seed(0)
value = torch.randn(2, 6, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
offset_mask = torch.randn(2, 3, 5, 3 * 2 * 9 + 2, generator=gen, dtype=torch.float64, requires_grad=True)
args = (3, (2, 1), 1, 1, 2, 1.0, False)  # kernel_size, stride, padding, dilation, groups, offset_scale, remove_center
out = dcnv4(value, offset_mask, *args, impl="kernel")
ref = dcnv4_reference(value, offset_mask, *args)
torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
grads = torch.autograd.grad(out, (value, offset_mask), grad_out)
for got, expected in zip(grads, torch.autograd.grad(ref, (value, offset_mask), grad_out)):
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
assert _build._loaded_path.startswith(os.environ["UNET_DCNV4_BUILD_DIR"]), _build._loaded_path

pipe = tiny_pipeline()
torch.manual_seed(0)
pipe.register_modules(unet=build_unet("dcnv4", "tiny", sample_size=8).eval())
save_for_fresh_load(pipe, folder)
print("ok")
"""


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=540, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_builds_its_kernels_and_loads_pipelines_outside_the_checkout(tmp_path):
    # 1. Build the wheel from a copy of the repository (the build writes into the source folder), offline.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation", "--wheel-dir", tmp_path / "dist", source])
    (wheel,) = (tmp_path / "dist").glob("unet_dcnv4-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"unet_dcnv4/_csrc/{p.relative_to(ROOT / 'csrc').as_posix()}" for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    assert {"unet_dcnv4/_csrc/ops.cpp", "unet_dcnv4/_csrc/cuda/dcnv4_cuda.cu"} <= sources <= names, sorted(names)

    # 2. Install it into a folder of its own and run the op there, away from the checkout, with a build
    # folder of its own (so the kernels really build from the wheel's sources).
    site, work = tmp_path / "site", tmp_path / "work"
    run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel])
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), UNET_DCNV4_BUILD_DIR=str(tmp_path / "kernels"))
    result = run([sys.executable, "-c", WHEEL_CHECK, site, ROOT / "tests", work / "pipeline"], cwd=work, env=env)
    assert result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    assert list((tmp_path / "kernels").glob("unet_dcnv4_cpu_*/*.so"))

    # 3. The saved folder loads in a process that imports nothing of the project beforehand.
    out = load_in_fresh_process([work / "pipeline"], cwd=work, env=env)
    assert "LatentDiffusionPipeline unet_dcnv4.unet DCNv4UNet2DModel" in out
    assert f"unet_dcnv4 from {site}" in out, out
