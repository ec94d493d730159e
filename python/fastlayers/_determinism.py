"""fastlayers.use_deterministic: bit-reproducible backward passes.

Every fastlayers kernel's backward is deterministic by construction (reductions are per-program partial sums
combined in a fixed order; no floating-point atomics), so the kernel paths need no switch. The switch matters
for the PyTorch paths (the reference, and any op that falls back to torch ops): it turns on
torch.use_deterministic_algorithms, and ops with a faster non-deterministic option consult `enabled()`.
"""
from __future__ import annotations


import torch

_state = {"on": False}


def enabled() -> bool:
    """True under fastlayers.use_deterministic(True) or torch.use_deterministic_algorithms(True)."""
    return _state["on"] or torch.are_deterministic_algorithms_enabled()


class use_deterministic:
    """fastlayers.use_deterministic(True) switches deterministic mode on (as a call, or as a context manager that
    restores the previous setting on exit). It also sets torch.use_deterministic_algorithms."""

    def __init__(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise TypeError(f"use_deterministic: `mode` must be a bool, got {type(mode).__name__}")
        self.prev = (_state["on"], torch.are_deterministic_algorithms_enabled())
        self.mode = mode
        self._apply(mode, mode)

    @staticmethod
    def _apply(ours: bool, torchs: bool) -> None:
        _state["on"] = ours
        torch.use_deterministic_algorithms(torchs, warn_only=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._apply(*self.prev)
        return False
