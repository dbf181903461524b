"""Builds fastrnn._C: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA build of torch exist.

Switches: FASTRNN_SKIP_CUDA_BUILD=1 (CPU only), FASTRNN_CUDA_ARCHS (default "80;90"), MAX_JOBS.
Install: pip install -e . --no-build-isolation
"""

import importlib.util
import os
import time

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "fastrnn_buildcfg", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastrnn", "_buildcfg.py")
)
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)

# torch.utils.cpp_extension reads CUDA_HOME and MAX_JOBS when imported / when ninja starts
_cuda_home = cfg.find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home
os.environ["MAX_JOBS"] = str(cfg.max_jobs())

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _with_cuda():
    if os.environ.get("FASTRNN_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False, "FASTRNN_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if _cuda_home is None:
        return False, "no CUDA toolkit (nvcc) found"
    return True, ""


# fastrnn._C then loads even when imported before torch (libc10.so and friends live in torch/lib)
_LINK_ARGS = ["-fopenmp", "-Wl,-rpath," + os.path.join(os.path.dirname(torch.__file__), "lib")]


def _extension():
    with_cuda, why_not = _with_cuda()
    sources = list(cfg.CPP_SOURCES)
    cxx = list(cfg.CXX_FLAGS)
    include_dirs = [cfg.CSRC]
    if not with_cuda:
        print(f"fastrnn: building fastrnn._C for CPU only ({why_not}), MAX_JOBS={os.environ['MAX_JOBS']}")
        return CppExtension("fastrnn._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=_LINK_ARGS)
    archs = cfg.cuda_archs()
    ptx = cfg.ptx_arch(archs)
    # nvcc splits option values at commas, so the arch list (an initializer for build_info) goes to g++ only; 0: no PTX
    cxx += ["-DFASTRNN_WITH_CUDA", "-DFASTRNN_CUDA_ARCHS=" + ",".join(a.rstrip("af") for a in archs),
            f"-DFASTRNN_CUDA_PTX={ptx or 0}"]
    nvcc = cfg.NVCC_FLAGS + cfg.gencode_flags(archs) + ["-DFASTRNN_WITH_CUDA", f"--threads={min(len(archs), 2)}"]
    print(f"fastrnn: building fastrnn._C for CPU + CUDA (sm_{', sm_'.join(archs)}"
          f"{f' + compute_{ptx} PTX' if ptx else ''}) with {_cuda_home}, MAX_JOBS={os.environ['MAX_JOBS']}")
    return CUDAExtension("fastrnn._C", sources + cfg.CUDA_SOURCES,
                         include_dirs=include_dirs + cfg.cuda_include_dirs(),
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=_LINK_ARGS)


class TimedBuild(BuildExtension):
    def run(self):
        start = time.monotonic()
        super().run()
        print(f"fastrnn: fastrnn._C built in {time.monotonic() - start:.0f} s")


setup(ext_modules=[_extension()], cmdclass={"build_ext": TimedBuild})
