"""Build logic only: the optional C++/CUDA extension fusedopt._C. Metadata lives in pyproject.toml.

FUSEDOPT_BUILD_EXT=auto (default): build the extension, warn and go on without it if that fails.
FUSEDOPT_BUILD_EXT=1: a failed build is fatal (CI).   FUSEDOPT_BUILD_EXT=0: pure-Python install.
FUSEDOPT_CPU_ARCH=auto|avx512|avx2|generic: CPU vector width (auto: the widest the build machine has).
TORCH_CUDA_ARCH_LIST: GPU archs of the CUDA sources (default: the visible GPUs', else
DEFAULT_CUDA_ARCHS).
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("FUSEDOPT_BUILD_EXT", "auto").lower()
if BUILD_EXT not in ("auto", "0", "1"):
    sys.exit(f"FUSEDOPT_BUILD_EXT must be auto, 0 or 1, got {BUILD_EXT!r}")

PACKAGES = ["fusedopt", "fusedopt.optim", "fusedopt.nn", "fusedopt.kernels"]
PACKAGE_DIR = {"fusedopt.kernels": "kernels"}


# GPUs the CUDA kernels are built for when none is visible and TORCH_CUDA_ARCH_LIST is unset:
# A100 (8.0) and H100 / H200 (9.0), plus PTX that newer GPUs compile when loading.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
          "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
AVX2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def cpu_flags() -> list[str]:
    """The widest at::vec::Vectorized the build machine runs (the extension is built where it is
    used). Without a CPU_CAPABILITY_* define, Vectorized silently falls back to scalar loops."""
    arch = os.environ.get("FUSEDOPT_CPU_ARCH", "auto")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.findall(r"\w+", f.read()))
    except OSError:
        flags = set()
    has_avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags
    has_avx2 = {"avx2", "fma", "f16c"} <= flags
    if arch == "avx512" or (arch == "auto" and has_avx512):
        # bf16 stores round with one instruction where the machine has it (multi_tensor.h).
        return AVX512 + (["-mavx512bf16", "-DFUSEDOPT_AVX512_BF16"] if "avx512_bf16" in flags
                         else [])
    if arch == "avx2" or (arch == "auto" and has_avx2):
        return AVX2
    return []


def nvcc_major(torch_utils) -> int | None:
    nvcc = os.path.join(torch_utils.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def fix_cuda_home(torch_utils) -> None:
    """torch guesses CUDA_HOME (unset) as the parent of the nvcc on PATH. Where that nvcc is a
    wrapper script (/usr/local/bin/nvcc on this project's build machines), the guess holds no
    CUDA libraries and linking fails (-lcudart): take the toolkit nvcc reports (-dryrun: TOP=)."""
    home = torch_utils.CUDA_HOME
    if not home or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib")):
        return
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "-dryrun", "-x", "cu", "-c", os.devnull, "-o",
             os.devnull], capture_output=True, text=True).stderr
    except OSError:
        return
    match = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    if match:
        torch_utils.CUDA_HOME = os.path.realpath(match.group(1).strip())


def extension_modules():
    if BUILD_EXT == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if BUILD_EXT == "1":
            raise
        print(f"fusedopt: building without the C++ extension ({error})", file=sys.stderr)
        return [], {}

    sources = ["csrc/fusedopt.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp: at::parallel_for is OpenMP code inlined from torch's headers; without it, one thread.
    # No -std: torch's BuildExtension adds the C++ standard its own headers need (torch 2.14's
    # refuse C++17), here and for nvcc.
    # -ffp-contract=off, --fmad=false: the contraction policy (docs/numerics.md). No compiler fuses
    # a product into an add on its own; a kernel that wants an FMA writes one.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", *cpu_flags()]
    extra = {"cxx": cxx}
    extension = cpp_extension.CppExtension
    torch_cuda = torch.version.cuda
    if torch_cuda:
        fix_cuda_home(cpp_extension)
    major = nvcc_major(cpp_extension) if torch_cuda else None
    if torch_cuda and major == int(torch_cuda.split(".")[0]):
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--fmad=false"]  # no fast math: denormals as torch keeps them
        extension = cpp_extension.CUDAExtension
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch derives the archs from the visible GPUs and fails where there are none
            # (build servers, Docker images): build for the GPUs these kernels target instead.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    elif torch_cuda:
        print(
            f"fusedopt: skipping the CUDA sources: nvcc major {major} does not match torch's CUDA "
            f"{torch_cuda}",
            file=sys.stderr,
        )
    module = extension(
        "fusedopt._C",
        sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [module], {"build_ext": optional_build_ext(cpp_extension.BuildExtension)}


def optional_build_ext(base):
    class BuildExt(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                if BUILD_EXT == "1":
                    raise
                print(f"fusedopt: the C++ extension failed to build ({error}); "
                      "installing without it", file=sys.stderr)
                # Rebound, not mutated (the build loop is iterating the old list): the copy into
                # the source tree (editable installs) and the wheel's outputs skip it.
                self.extensions = [other for other in self.extensions if other is not ext]

    return BuildExt


ext_modules, cmdclass = extension_modules()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
