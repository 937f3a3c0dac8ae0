"""The GPU code builds, without a GPU: every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90
without register spills, the torch-facing CUDA glue compiles to objects against torch's headers,
and every Triton kernel compiles ahead of time (tools/aot_compile_triton.py)."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
GLUE_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*_torch.cpp"))
TRITON_MODULES = sorted(
    f"wmkernels.triton.{p.stem}" for p in (ROOT / "wmkernels" / "triton").glob("*.py") if not p.stem.startswith("_")
)
NVCC = shutil.which("nvcc")
CUDA_INCLUDE = next((p for p in ("/usr/local/cuda/include",) if os.path.isdir(p)), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_compile_without_spills(source, tmp_path):
    args = [NVCC, "-c", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v", str(source),
            "-o", str(tmp_path / "k.o")]
    for arch in ("80", "90"):
        args.insert(2, f"-gencode=arch=compute_{arch},code=sm_{arch}")
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)]
    assert spills and not any(spills), "register spills:\n" + out.stderr[-4000:]


@pytest.mark.skipif(NVCC is None or CUDA_INCLUDE is None, reason="CUDA toolkit headers not installed")
@pytest.mark.parametrize("source", GLUE_SOURCES, ids=lambda p: p.name)
def test_cuda_glue_compiles_against_torch(source, tmp_path):
    from torch.utils import cpp_extension

    # The CPU wheel ships c10/cuda but not this generated header (a build-configuration macro).
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*cpp_extension.include_paths(), str(tmp_path), CUDA_INCLUDE, sysconfig.get_paths()["include"]]
    args = ["g++", "-c", "-std=c++20", "-O0", "-fPIC", "-DWMKERNELS_CUDA", *(f"-I{p}" for p in includes),
            str(source), "-o", str(tmp_path / "glue.o")]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.skipif(not TRITON_MODULES, reason="no Triton modules")
def test_triton_kernels_compile_ahead_of_time():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "aot_compile_triton.py"), *TRITON_MODULES],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for module in TRITON_MODULES:
        assert f"{module}:" in out.stdout
