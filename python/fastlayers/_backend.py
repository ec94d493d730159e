"""Backend choice: "cuda" (the extension), "triton", or "reference" (pure PyTorch).

Order of precedence: the `backend=` argument of an op, then `fastlayers.use_backend(...)`, then the environment
variable FASTLAYERS_BACKEND, then automatic choice. Automatic: the CUDA extension if built and it supports the
case and the op prefers it, else Triton on a CUDA device, else the reference (CPU tensors, fp64, or no triton).
With TRITON_INTERPRET=1, an explicit "triton" runs the Triton kernels on CPU tensors (how CI tests them).
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "reference")
# process-wide (not thread-local: torch.compile traces a plain global without a graph break)
_forced: dict = {"name": None}


def _normalize(name, where: str) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{where}: expected a backend name (str) or None, got {type(name).__name__}")
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{where}: expected one of {BACKENDS} or 'auto', got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager forcing a backend for every op called inside it (None/'auto' = automatic).
    Process-wide: it applies to every thread while the `with` block runs."""
    name = _normalize(name, "use_backend")
    prev = _forced["name"]
    _forced["name"] = name
    try:
        yield
    finally:
        _forced["name"] = prev


def requested(backend: str | None = None) -> str | None:
    """The backend asked for by argument, context or environment (None means automatic)."""
    b = _normalize(backend, "backend")
    if b is not None:
        return b
    if _forced["name"] is not None:
        return _forced["name"]
    return _normalize(os.environ.get("FASTLAYERS_BACKEND"), "FASTLAYERS_BACKEND")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (cached in sys.modules after the first call)
        return True
    except Exception:
        return False


def choose(op: str, device: torch.device, *, backend: str | None = None, dtype: torch.dtype | None = None,
           cuda_op: str | None = None, cuda_ok: bool | str = True, triton_ok: bool | str = True,
           prefer: tuple[str, ...] = ("triton", "cuda")) -> str:
    """Resolve the backend for one call of `op`.

    cuda_op: the name of the op's CUDA entry point in torch.ops.fastlayers (None: the op has no CUDA kernel).
    cuda_ok / triton_ok: True, or a string saying why that kernel does not support this case.
    prefer: the order in which automatic choice tries the kernels on a GPU (set per op from benchmarks).
    """
    want = requested(backend)
    if dtype == torch.float64:
        if want not in (None, "reference"):
            raise ValueError(f"{op}: float64 runs only on the reference backend, got backend={want!r}")
        return "reference"
    if want == "reference":
        return "reference"
    if want == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        if cuda_op is None:
            raise NotImplementedError(f"{op}: there is no CUDA kernel for this op; use backend='triton'")
        if not _ext.has_op(cuda_op):
            raise RuntimeError(f"{op}: backend='cuda' requested but torch.ops.fastlayers.{cuda_op} is missing: "
                               f"{_ext.BUILD_HINT} (load error: {_ext.error()})")
        if cuda_ok is not True:
            raise NotImplementedError(f"{op}: the CUDA kernel does not support this case ({cuda_ok}); "
                                      "use backend='triton' or 'auto'")
        return "cuda"
    if want == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but triton does not import")
        if device.type != "cuda" and not triton_interpret():
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to interpret the "
                             f"kernels on the CPU), got tensors on {device}")
        if triton_ok is not True:
            raise NotImplementedError(f"{op}: the Triton kernel does not support this case ({triton_ok})")
        return "triton"
    # automatic
    if device.type != "cuda":
        return "reference"
    for b in prefer:
        if b == "cuda" and cuda_op is not None and cuda_ok is True and _ext.has_op(cuda_op):
            return "cuda"
        if b == "triton" and triton_ok is True and triton_available():
            return "triton"
    return "reference"
