"""Builds fastvq and its C++ extension fastvq._C.

The CPU kernels in csrc/*.cpp are always built. CUDA sources (csrc/*.cu), when there are any, are
compiled only where torch was built with CUDA and nvcc is present; FASTVQ_CUDA=0 turns that off.
FASTVQ_NATIVE=0 drops -march=native (for wheels meant to run on other CPUs).

Install with the torch that will run it: `pip install --no-build-isolation -e .`
"""
import glob
import os
import shlex
import subprocess
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _flag(name, default="1"):
    return os.environ.get(name, default) not in ("0", "", "false", "False")


def _compiler_is_clang():
    # the compiler torch.utils.cpp_extension builds with: $CXX, else c++
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(shlex.split(cxx) + ["--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return False
    return "clang" in out


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-funroll-loops"]
    if _flag("FASTVQ_NATIVE"):
        cxx.append("-march=native")
    # at::parallel_for's OpenMP backend is inline in the ATen headers: without -fopenmp here it
    # compiles to a serial loop. Linking libgomp by soname reuses the copy torch already loaded,
    # so torch.set_num_threads governs our kernels too. clang's -fopenmp would bring LLVM's libomp
    # instead, a second runtime with its own spinning threads: clang builds use csrc/parallel.h's
    # std::thread path.
    link = []
    if sys.platform.startswith("linux") and not _compiler_is_clang():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    with_cuda = bool(cuda_sources) and _flag("FASTVQ_CUDA") and torch.version.cuda is not None and CUDA_HOME
    if with_cuda:
        return CUDAExtension(
            "fastvq._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DFASTVQ_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=link,
        )
    return CppExtension("fastvq._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="fastvq",
    version="0.1.0",
    description="Fused kernels for VQGAN-style discrete image models: codebook search, windowed attention, cached sampling",
    packages=["fastvq", "fastvq.ops", "fastvq.nn", "fastvq.models", "fastvq.pipeline", "fastvq.kernels"],
    package_dir={"fastvq.kernels": "kernels"},
    package_data={"fastvq": ["assets/*.png"]},  # layouts shipped for `fastvq sample --cond` and the demo
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        # the reference VQGAN + GPT pipeline (fastvq train-vqgan / train-gpt / sample / demo); lpips only
        # for its linear-head weights file, so install it with --no-deps (it would pull torchvision)
        "pipeline": ["scikit-image", "matplotlib", "pyyaml", "tqdm", "pillow"],
    },
    entry_points={"console_scripts": ["fastvq=fastvq.cli:main"]},
)
