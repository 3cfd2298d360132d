"""Build logic only: the optional C++/CUDA extension fusedopt._C. Metadata lives in pyproject.toml.

FUSEDOPT_BUILD_EXT=auto (default): build the extension, warn and go on without it if that fails.
FUSEDOPT_BUILD_EXT=1: a failed build is fatal (CI).   FUSEDOPT_BUILD_EXT=0: pure-Python install.
FUSEDOPT_CPU_ARCH=native|avx2|generic: CPU code generation (default: avx2 where the build machine has it).
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


def cpu_flags() -> list[str]:
    """Without -DCPU_CAPABILITY_AVX2, at::vec::Vectorized silently falls back to scalar loops."""
    arch = os.environ.get("FUSEDOPT_CPU_ARCH", "avx2")
    if arch == "native":
        return ["-march=native", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if arch == "avx2":
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(re.findall(r"\w+", f.read()))
        except OSError:
            flags = set()
        if {"avx2", "fma", "f16c"} <= flags:
            return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def nvcc_major(torch_utils) -> int | None:
    nvcc = os.path.join(torch_utils.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


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
    cxx = ["-O3", "-std=c++17", "-fopenmp", *cpu_flags()]
    extra = {"cxx": cxx}
    extension = cpp_extension.CppExtension
    torch_cuda = torch.version.cuda
    major = nvcc_major(cpp_extension) if torch_cuda else None
    if torch_cuda and major == int(torch_cuda.split(".")[0]):
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math"]
        extension = cpp_extension.CUDAExtension
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

    return BuildExt


ext_modules, cmdclass = extension_modules()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
