"""Loading the optional CUDA extension fastlayers._C (ops registered as torch.ops.fastlayers.*_cuda)."""
from __future__ import annotations

import importlib.util
import threading

import torch

BUILD_HINT = (
    "the CUDA extension fastlayers._C is not built. Build it with nvcc and a CUDA build of torch: "
    "`FASTLAYERS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .` "
    "(or `make install` on a machine with nvcc); meanwhile use backend='triton' or 'reference'"
)

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None}


def load() -> bool:
    """Load fastlayers._C once; True when its ops are registered."""
    with _lock:
        if _state["loaded"] is None:
            try:
                spec = importlib.util.find_spec("fastlayers._C")
                if spec is None or spec.origin is None:
                    raise ImportError("fastlayers._C was not built")
                torch.ops.load_library(spec.origin)
                _state["loaded"] = True
            except Exception as e:  # missing file, ABI mismatch, missing CUDA libraries ...
                _state["loaded"] = False
                _state["error"] = f"{type(e).__name__}: {e}"
        return _state["loaded"]


def error() -> str | None:
    """Why the extension did not load (None when it loaded or was not tried)."""
    load()
    return _state["error"]


def has_op(name: str) -> bool:
    """True when torch.ops.fastlayers.<name> exists (from the extension)."""
    if not load():
        return False
    return hasattr(torch.ops.fastlayers, name)


def op(name: str):
    if not has_op(name):
        raise RuntimeError(f"fastlayers: torch.ops.fastlayers.{name} is unavailable: {BUILD_HINT}"
                           + (f" (load error: {_state['error']})" if _state["error"] else ""))
    return getattr(torch.ops.fastlayers, name)
