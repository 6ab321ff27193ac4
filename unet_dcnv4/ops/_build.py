"""Builds the kernels' sources on first use with torch.utils.cpp_extension (ninja) and loads them into
torch.ops. The sources are the package `unet_dcnv4._csrc` (csrc/ of the repository, installed inside the
package), found through the import system, so an installed wheel builds from its own copy.

The build folder is named by a hash of the sources, the compiler flags and the torch version, so an
edit triggers exactly one rebuild and unchanged sources load from the cache. CUDA sources are added
when torch has CUDA, a GPU is visible and nvcc is found (or when forced, as the compile test does).
$UNET_DCNV4_NVCC_FLAGS adds nvcc flags (a kernel variant's define, say) and a build folder of their own.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path

import torch

# A folder on disk in every supported install (wheel, editable): the compiler needs real paths.
CSRC = Path(str(importlib.resources.files("unet_dcnv4._csrc")))
CPU_SOURCES = ("ops.cpp", "autograd.cpp", "layer.cpp", "dcnv4_cpu.cpp")
CUDA_SOURCES = ("cuda/dcnv4_cuda.cpp", "cuda/dcnv4_cuda.cu")
# The C++ standard is the one torch asks for. -fopenmp: at::parallel_for is a header template whose
# OpenMP pragma only takes effect when the extension itself is compiled with OpenMP.
# -fno-trapping-math: lets the compiler vectorise floor() and float-to-int conversions (the kernels never
# read the floating-point exception flags).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
# The CPU kernels' inner loops are 8-wide fused multiply-adds where the machine has AVX2 and FMA (as
# torch's own dispatch detects them); elsewhere the compiler's baseline. The flags are part of the build
# folder's hash, so machines of different capability sharing one cache build their own.
X86_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
# Extra nvcc flags for experiments with the CUDA kernels (e.g. "-DDCNV4_BWD16_V=4"), part of the hash.
NVCC_FLAGS_ENV = "UNET_DCNV4_NVCC_FLAGS"

_loaded_path: str | None = None


class BuildError(RuntimeError):
    """The compiled kernels could not be built."""


def cache_root() -> Path:
    """Where builds are cached: $UNET_DCNV4_BUILD_DIR or ~/.cache/unet_dcnv4/build."""
    env = os.environ.get("UNET_DCNV4_BUILD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "unet_dcnv4" / "build"


def find_nvcc() -> str | None:
    """The nvcc to use: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc or the one on PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_wanted() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available() and find_nvcc() is not None


def _cuda_env() -> list[str]:
    """Point torch at a full CUDA toolkit; returns extra include folders (the pip nvidia headers)."""
    nvcc = Path(find_nvcc()).resolve()
    os.environ.setdefault("CUDA_HOME", str(nvcc.parents[1]))
    import torch.utils.cpp_extension as ext

    ext.CUDA_HOME = os.environ["CUDA_HOME"]
    includes = []
    try:
        import nvidia

        for root in nvidia.__path__:
            includes += [str(p) for p in sorted(Path(root).glob("cu*/include"))]
    except ImportError:
        pass
    return includes


def isa_flags() -> list[str]:
    """Instruction-set flags for the CPU sources: X86_AVX2_FLAGS on x86-64 CPUs with AVX2, else none."""
    if platform.machine().lower() in ("x86_64", "amd64") and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return list(X86_AVX2_FLAGS)
    return []


def cuda_flags() -> list[str]:
    """nvcc's flags: NVCC_FLAGS, then those in $UNET_DCNV4_NVCC_FLAGS (shell-split)."""
    return NVCC_FLAGS + shlex.split(os.environ.get(NVCC_FLAGS_ENV, ""))


def _sources(with_cuda: bool) -> list[Path]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [CSRC / n for n in names]


def _digest(sources: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(" ".join(flags).encode())
    h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    with_cuda = any(s.suffix == ".cu" for s in sources)
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu") and (with_cuda or "cuda" not in path.parts):
            h.update(str(path.relative_to(CSRC)).encode())
            h.update(path.read_bytes())
    h.update(" ".join(str(s.relative_to(CSRC)) for s in sources).encode())
    return h.hexdigest()[:16]


def build(with_cuda: bool | None = None, verbose: bool = False) -> str:
    """Compile the extension (or find it in the cache) and return the path of the shared library.

    Args:
        with_cuda: include the CUDA kernels; None decides from the machine (torch CUDA, GPU, nvcc).
        verbose: print the compiler's commands.
    """
    if with_cuda is None:
        with_cuda = cuda_wanted()
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise BuildError("unet_dcnv4 needs a C++ compiler to build its kernels (none found as $CXX or c++); "
                         "install g++, or pass impl='reference' to run the slow PyTorch reference")
    if with_cuda and find_nvcc() is None:
        raise BuildError("unet_dcnv4: building the CUDA kernels needs nvcc; set CUDA_HOME to a CUDA toolkit")
    import torch.utils.cpp_extension as ext

    includes = [str(CSRC)] + (_cuda_env() if with_cuda else [])
    sources = _sources(with_cuda)
    flags = CXX_FLAGS + isa_flags() + (["-DDCNV4_WITH_CUDA"] if with_cuda else [])
    nvcc_flags = cuda_flags()
    tag = _digest(sources, flags + LD_FLAGS + (nvcc_flags if with_cuda else []))
    name = f"unet_dcnv4_{'cuda' if with_cuda else 'cpu'}_{tag}"
    folder = cache_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"{name}.so"
    if not library.exists():
        print(f"unet_dcnv4: building the {'CPU+CUDA' if with_cuda else 'CPU'} kernels in {folder} "
              "(once; takes a minute or two)...", file=sys.stderr, flush=True)
    try:
        ext.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_include_paths=includes,
            extra_cflags=flags,
            extra_ldflags=list(LD_FLAGS),  # copies: cpp_extension appends to the lists it is given
            extra_cuda_cflags=nvcc_flags if with_cuda else None,
            build_directory=str(folder),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as err:  # the compiler's output is in the exception text
        raise BuildError(f"unet_dcnv4: building the kernels in {folder} failed:\n{err}\n"
                         "Pass impl='reference' to run the slow PyTorch reference instead.") from err
    return str(library)


def load() -> None:
    """Build if needed and load the kernels into torch.ops.unet_dcnv4 (once per process)."""
    global _loaded_path
    if _loaded_path is None:
        path = build()
        # cpp_extension.load(is_python_module=False) already loaded it into the process.
        _loaded_path = path
