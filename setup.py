"""Build script for moelora.

The Python package ``moelora`` is assembled from two folders: ``moelora/`` and
``triton_kernels/``, the latter installed as ``moelora.triton_kernels`` so that it can
never collide with the unrelated PyPI project that owns the top-level name
``triton_kernels``.

Native extension (``moelora._C``): see ``_native_extensions`` below.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch
that is already installed.
"""

import os

from setuptools import setup


def _native_extensions():
    """The C++/CUDA extension, or nothing when MOELORA_NO_EXT=1 or no sources exist yet."""
    if os.environ.get("MOELORA_NO_EXT", "0") == "1":
        return [], {}
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")
    ) if os.path.isdir("csrc") else []
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "moelora._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()

setup(
    name="moelora",
    version="0.1.0",
    description="Fused mixture-of-experts LoRA kernels (Triton + CUDA) for PyTorch",
    packages=["moelora", "moelora.triton_kernels"],
    package_dir={"moelora": "moelora", "moelora.triton_kernels": "triton_kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
