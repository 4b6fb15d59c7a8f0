"""The CUDA sources compile with nvcc for sm_80 and sm_90 (this CPU-only machine cannot build
the CUDAExtension), the kernel headers stay torch-free and the CPU sources need no CUDA."""

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
# The flags torch's CUDAExtension passes to nvcc, so this check sees what the real build sees.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def test_kernel_headers_are_torch_free_and_cpu_sources_cuda_free():
    headers = sorted((CSRC / "kernels").glob("*.cuh"))
    assert headers, "no csrc/kernels/*.cuh found"
    for h in headers:
        includes = [line for line in h.read_text().splitlines() if line.startswith("#include")]
        assert not any(w in line for line in includes for w in ("torch/", "ATen/", "c10/")), (h, includes)
    for src in list(CSRC.glob("*.cpp")) + list(CSRC.glob("cpu/*.cpp")) + list(CSRC.glob("*.h")):
        text = src.read_text()
        assert "cuda" not in "".join(line for line in text.splitlines() if line.startswith("#include")).lower(), src


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cu_files_compile_for_sm80_and_sm90():
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import include_paths

    # The standard torch's build helper adds (setup.py passes none): C++20 from the torch
    # versions whose helper defaults to it, else C++17.
    std = "c++20" if "-std=c++20" in pathlib.Path(cpp_extension.__file__).read_text() else "c++17"
    sources = sorted(str(p) for p in CSRC.rglob("*.cu"))
    assert sources, "no .cu files under csrc/"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, f"-std={std}", "-O0", "-Xcompiler", "-fPIC", "--threads", "2",
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DMOELORA_WITH_CUDA=1", *TORCH_NVCC_FLAGS,
               "-diag-suppress", "3306", "-Xcompiler", "-Wno-c++20-extensions",
               *[f"-I{p}" for p in include_paths()],
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-c", *sources, "-odir", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-6000:]
        for src in sources:
            obj = pathlib.Path(tmp) / (pathlib.Path(src).stem + ".o")
            assert obj.exists() and obj.stat().st_size > 0, obj


def _default_cuda_archs(setup_py: pathlib.Path) -> str:
    """setup.py's DEFAULT_CUDA_ARCHS, read without running setup.py."""
    import ast

    for node in ast.parse(setup_py.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCHS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCHS")


def test_default_cuda_archs_carry_ptx_for_newer_gpus(monkeypatch):
    """The default build runs on GPUs newer than its binaries (sm_100, sm_120): torch's build helper
    turns the default arch list into nvcc flags with PTX of the newest arch, which the driver compiles
    at load. Without it (the default was "8.0;9.0"), every CUDA op of moelora._C on such a GPU fails
    with 'no kernel image is available for execution on the device'."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", _default_cuda_archs(ROOT / "setup.py"))
    flags = _get_cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags, flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags, flags
