"""Build: the pure-Python package, plus the C++ CPU extension ``equiproj._C`` from ``csrc/``
when torch is importable at build time (use ``pip install --no-build-isolation -e .``).
Set ``EQUIPROJ_NO_EXT=1`` to skip the extension; the library then falls back to pure torch."""

import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources and os.environ.get("EQUIPROJ_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # isolated build without torch: pure-Python install
        pass
    else:
        ext_modules = [
            CppExtension(
                "equiproj._C",
                sources,
                depends=sorted(glob.glob("csrc/*.h")),
                # -ffp-contract=off: multiply-adds are fused only where the kernels say so (V4 fmadd),
                # so a result never depends on how the compiler versioned a loop; -fopenmp:
                # at::parallel_for's OpenMP region in the extension (serial without it)
                extra_compile_args=["-O3", "-g0", "-fopenmp", "-std=c++20", "-ffp-contract=off"],
                extra_link_args=["-fopenmp"],
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(
    name="equiproj",
    version="0.1.0",
    description="Exact projection-based equivariance regularisation for PyTorch",
    python_requires=">=3.11",
    packages=find_packages(include=["equiproj", "equiproj.*"]) + ["equiproj.kernels"],
    package_dir={"equiproj.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "scipy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton"],
        "triton": ["triton"],
        "e3nn": ["e3nn"],
        # escnn pins numpy < 2, and its dependency py3nj builds from source with a Fortran compiler
        "escnn": ["escnn"],
        "plot": ["matplotlib"],
        # the experiments on outside data (equiproj demo --only digits / phiflow); imported only there
        "experiments": ["phiflow>=3.4", "scikit-learn>=1.3", "matplotlib"],
    },
    entry_points={"console_scripts": ["equiproj = equiproj.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
