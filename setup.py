"""Builds the optional CUDA extension fastlayers._C from csrc/.

FASTLAYERS_BUILD_CUDA=1   build it and fail the install if the build fails (CI and gpu_check.sh)
FASTLAYERS_BUILD_CUDA=0   never build it
unset / "auto"            build it when nvcc and a CUDA build of torch are present; otherwise print one line
                          saying why it was skipped (the Triton and reference paths still work)
TORCH_CUDA_ARCH_LIST      target GPUs (default here: 9.0, the H100); MAX_JOBS: parallel compile jobs.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"fastlayers setup: {msg}", file=sys.stderr)


def _cuda_extension():
    mode = os.environ.get("FASTLAYERS_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        _say("skipping the CUDA extension (FASTLAYERS_BUILD_CUDA=0)")
        return [], {}
    required = mode in ("1", "true", "yes", "on")
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a dependency
        if required:
            raise RuntimeError(f"FASTLAYERS_BUILD_CUDA=1 but torch does not import: {e}")
        _say(f"skipping the CUDA extension: torch does not import ({e})")
        return [], {}
    nvcc = shutil.which("nvcc")
    if torch.version.cuda is None or nvcc is None:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc is not on PATH"
        if required:
            raise RuntimeError(f"FASTLAYERS_BUILD_CUDA=1 but {why}")
        _say(f"skipping the CUDA extension: {why}")
        return [], {}
    if not os.environ.get("CUDA_HOME"):
        # The nvcc on PATH may be a wrapper script; torch must see the real toolkit folder.
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for tok in head.split():
                if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                    real = tok
                    break
        except OSError:
            pass
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(real))
    # cpp_extension reads CUDA_HOME when it is imported: import it only now
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="fastlayers._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF_CONVERSIONS__"],
        },
    )

    class Build(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:
                if required:
                    raise
                _say(f"the CUDA extension failed to build and is skipped ({type(e).__name__}: {e}); "
                     "set FASTLAYERS_BUILD_CUDA=1 to make this an error")
                self.extensions = []

    _say(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"with {os.environ['CUDA_HOME']}")
    return [ext], {"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
