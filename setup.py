"""Builds finepurify_ext._C with torch.utils.cpp_extension.

CUDA sources (csrc/cuda/) are compiled only when the installed torch has CUDA and nvcc is found, or
when FINEPURIFY_CUDA=1 forces it (FINEPURIFY_CUDA=0 forces a CPU-only build). The choice is printed.
Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.

On Linux the library links the shared libstdc++ (the one torch uses) whatever the toolchain's
default, and the build fails, naming the fix, if the linked library still carries a copy of its own
(finepurify_ext/buildcheck.py says why that matters).
"""
import glob
import importlib.util
import os
import shutil
import sys

import torch
from setuptools import find_packages, setup
from setuptools.errors import LinkError
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_buildcheck():
    """finepurify_ext/buildcheck.py by path: importing the package would load the missing _C."""
    spec = importlib.util.spec_from_file_location("finepurify_buildcheck",
                                                  os.path.join(ROOT, "finepurify_ext", "buildcheck.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


buildcheck = load_buildcheck()


class BuildOneLibstdcxx(BuildExtension):
    """torch's BuildExtension, refusing a library that would run with a second libstdc++."""

    def build_extension(self, ext):
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        problem = buildcheck.libstdcxx_problem(path)
        if problem:
            os.remove(path)
            raise LinkError(f"finepurify_ext: the C++ toolchain (CXX={os.environ.get('CXX', 'c++')}) linked "
                            f"{os.path.basename(path)} so that "
                            f"{problem}; torch uses the shared libstdc++ and a second copy crashes on the "
                            f"first error message. Removed it; build with {buildcheck.FIX}.")


def cuda_choice():
    forced = os.environ.get("FINEPURIFY_CUDA")
    if forced in ("0", "1"):
        return forced == "1", f"FINEPURIFY_CUDA={forced}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda} and nvcc found"


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


with_cuda, reason = cuda_choice()
cuda_sources = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
with_cuda = with_cuda and bool(cuda_sources)
print(f"finepurify_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels ({reason})")

cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
link_flags = ["-fopenmp"] + (buildcheck.LIBSTDCXX_LINK_ARGS if sys.platform.startswith("linux") else [])
ext_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
if with_cuda:
    ext = CUDAExtension(
        "finepurify_ext._C",
        ext_sources + cuda_sources,
        extra_compile_args={
            "cxx": cxx_flags + ["-DFINEPURIFY_WITH_CUDA"],
            # FINEPURIFY_NVCC_FLAGS: extra flags for experiments (e.g. -DFP_PACKS_PER_STEP=2).
            "nvcc": ["-O3", "-fmad=false", "-DFINEPURIFY_WITH_CUDA"] + os.environ.get("FINEPURIFY_NVCC_FLAGS", "").split(),
        },
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "finepurify_ext._C",
        ext_sources,
        extra_compile_args={"cxx": cxx_flags},
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=link_flags,
    )

setup(
    packages=find_packages(include=["finepurify_ext", "finepurify_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildOneLibstdcxx},
)
