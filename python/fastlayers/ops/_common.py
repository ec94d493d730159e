"""Argument checks shared by every op: each failure names the argument, what was expected and what came."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(t, name: str, op: str, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES, optional: bool = False) -> None:
    """Type, rank and dtype of one tensor argument."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ndims:
            want = " or ".join(str(n) for n in ndims)
            raise ValueError(f"{op}: `{name}` must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: `{name}` must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")


def check_shape(t, name: str, op: str, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every tensor in `others` (None skipped) has ref's dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                             "all tensors must be on one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has {ref.dtype}; "
                            "they must match")


def check_int(v, name: str, op: str, *, min: int | None = None, max: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: `{name}` must be an int, got {type(v).__name__}")
    if min is not None and v < min:
        raise ValueError(f"{op}: `{name}` must be >= {min}, got {v}")
    if max is not None and v > max:
        raise ValueError(f"{op}: `{name}` must be <= {max}, got {v}")
    return v


def check_bool(v, name: str, op: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: `{name}` must be a bool, got {type(v).__name__}")
    return v


def check_choice(v, name: str, op: str, choices: Sequence) -> None:
    if v not in choices:
        raise ValueError(f"{op}: `{name}` must be one of {tuple(choices)}, got {v!r}")


def is_channels_last_1d(x: torch.Tensor) -> bool:
    """x: [B, C, L] laid out as a transposed contiguous [B, L, C] (C innermost), and not plainly contiguous."""
    B, C, L = x.shape
    return (not x.is_contiguous()) and x.stride(1) == 1 and (L == 1 or x.stride(2) == C) \
        and (B == 1 or x.stride(0) == C * L)


def as_layout_1d(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t: [B, C, L] in the requested memory layout (a copy only when needed)."""
    if channels_last:
        return t if is_channels_last_1d(t) else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def autocast_inputs(policy: str, *tensors):
    """Cast inputs as the native layer an op replaces is cast under torch.autocast (a no-op outside autocast).

    policy "lower": to the autocast dtype (convolutions, matmuls, attention); "fp32": to float32 (norms,
    reductions). Only fp16/bf16/fp32 tensors are cast (float64 and integer tensors are left alone, as autocast
    does). Returns the tensors; callers run their PyTorch path with autocast disabled so the reference keeps
    its fp32 math.
    """
    ref = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if ref is None or not torch.is_autocast_enabled(ref.device.type):
        return tensors
    dt = torch.get_autocast_dtype(ref.device.type) if policy == "lower" else torch.float32
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.dtype in KERNEL_DTYPES else t for t in tensors)
