"""Builds `wmkernels._C`: a CppExtension (-O3, OpenMP), or a CUDAExtension when torch has CUDA
and nvcc is found. A failed build warns and installs the pure-Python package, which then falls
back to a JIT build or to the reference backend. Set WMKERNELS_BUILD_EXT=0 to skip the build."""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

CPU_FLAGS = ["-O3", "-fopenmp", "-g0"]  # no debug info: a 51 MB library otherwise
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"] + [
    f"-gencode=arch=compute_{a},code=sm_{a}" for a in os.environ.get("WMKERNELS_CUDA_ARCHS", "80,90").split(",")
]


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (wmkernels/csrc): an installed package whose `_C` is missing
    (build skipped or failed) or no longer loads (torch upgraded) can then build it just in time."""

    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install builds from the checkout's csrc/
            self.copy_tree("csrc", os.path.join(self.build_lib, "wmkernels", "csrc"))


def extensions():
    if os.environ.get("WMKERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    class OptionalBuild(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # the package still works without the extension
                print(f"wmkernels: WARNING: compiled extension not built ({exc}); "
                      "falling back to JIT build or the reference backend", file=sys.stderr)

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/binding.cpp"]
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = cpp_extension.CUDAExtension(
            "wmkernels._C", sources,
            extra_compile_args={"cxx": CPU_FLAGS + ["-DWMKERNELS_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "wmkernels._C", sources, extra_compile_args={"cxx": CPU_FLAGS}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": OptionalBuild}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
