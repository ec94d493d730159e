"""Comparing a kernel with its reference, shared by the tests and `fastlayers check`.

Tolerance ("twice PyTorch's own error"): with ref64 the reference on float64 inputs and ref_lp the reference at
the kernel's dtype, a tensor passes when
    err(kernel, ref64) <= 2 * err(ref_lp, ref64) + EPS[dtype]      (err: relative Frobenius norm)
and its relative RMS error is under RMS_CAP[dtype], and it is finite wherever ref64 is.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import torch

def check_dtypes(device) -> list:
    """The dtypes the kernels are checked in: fp32 and fp16 everywhere, bf16 on a GPU only (the Triton
    interpreter computes bf16 arithmetic wrongly; its loads, stores and casts are right)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.device(device).type == "cuda" else [])


EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
RMS_CAP = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (inf if a is not finite where ref is)."""
    a64, r64 = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    finite = torch.isfinite(r64)
    if not bool(torch.isfinite(a64[finite]).all()) or not bool((a64[~finite].isnan() == r64[~finite].isnan()).all()):
        return float("inf")
    a64, r64 = a64[finite], r64[finite]
    if r64.numel() == 0:
        return 0.0
    den = r64.norm().item()
    num = (a64 - r64).norm().item()
    return num / den if den > 0 else num


@dataclasses.dataclass
class Result:
    name: str
    err: float        # relative error of the kernel against float64
    ref_err: float    # relative error of the reference at the same dtype against float64
    bound: float
    max_abs: float
    ok: bool

    def __str__(self) -> str:
        return (f"{self.name}: rel err {self.err:.3g} vs bound {self.bound:.3g} (reference at this dtype "
                f"{self.ref_err:.3g}), max abs err {self.max_abs:.3g} -> {'ok' if self.ok else 'FAIL'}")


def compare_tensor(name: str, out: torch.Tensor, ref_lp: torch.Tensor, ref64: torch.Tensor,
                   dtype: torch.dtype) -> Result:
    if tuple(out.shape) != tuple(ref64.shape):
        return Result(name, float("inf"), 0.0, 0.0, float("inf"), False)
    err = rel_err(out, ref64)
    ref_err = rel_err(ref_lp, ref64)
    bound = 2 * ref_err + EPS[dtype]
    ok = err <= bound and err <= RMS_CAP[dtype]
    diff = (out.detach().double() - ref64.detach().double()).abs()
    max_abs = float(diff[torch.isfinite(diff)].max()) if diff.numel() and torch.isfinite(diff).any() else 0.0
    return Result(name, err, ref_err, bound, max_abs, ok)


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _cast(v, dtype):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().to(dtype).requires_grad_(v.requires_grad)
    return v


def compare(fn: Callable, ref: Callable, inputs: Mapping, kwargs: Mapping | None = None, *,
            out_names: Sequence[str] | None = None, grad: bool = True, seed: int = 0) -> list[Result]:
    """Run fn and ref on `inputs` (floating tensors in the kernel dtype; those with requires_grad get their
    gradients checked) and ref on float64 copies; compare every output and every gradient."""
    kwargs = dict(kwargs or {})
    floats = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    dtype = floats[0].dtype
    names_in = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    runs = {}
    for label, f, dt in (("kernel", fn, dtype), ("ref_lp", ref, dtype), ("ref64", ref, torch.float64)):
        ins = {k: _cast(v, dt) for k, v in inputs.items()}
        outs = _flat(f(**ins, **kwargs))
        runs[label] = (ins, outs)
    n_out = len(runs["ref64"][1])
    out_names = list(out_names) if out_names else [f"out{i}" if n_out > 1 else "out" for i in range(n_out)]
    results = []
    for i in range(n_out):
        results.append(compare_tensor(out_names[i], runs["kernel"][1][i], runs["ref_lp"][1][i],
                                      runs["ref64"][1][i], dtype))
    if grad and names_in:
        gen = torch.Generator().manual_seed(seed)
        douts64 = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
                   for o in runs["ref64"][1]]
        grads = {}
        for label, (ins, outs) in runs.items():
            diff = [(o, d.to(o.dtype)) for o, d in zip(outs, douts64) if o.requires_grad]
            leaves = [ins[k] for k in names_in]
            g = torch.autograd.grad([o for o, _ in diff], leaves, [d for _, d in diff], allow_unused=True)
            grads[label] = [x if x is not None else torch.zeros_like(l) for x, l in zip(g, leaves)]
        for j, k in enumerate(names_in):
            results.append(compare_tensor(f"d{k}", grads["kernel"][j], grads["ref_lp"][j], grads["ref64"][j],
                                          dtype))
    return results


def assert_results(results: Sequence[Result], context: str = "") -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        lines = "\n  ".join(str(r) for r in results)
        raise AssertionError(f"{context}: {len(bad)} tensor(s) out of tolerance:\n  {lines}")


@dataclasses.dataclass
class CheckCase:
    """One small comparison of an op's kernel backend with its reference, for `fastlayers check`."""
    label: str
    fn: Callable
    ref: Callable
    inputs: dict
    kwargs: dict = dataclasses.field(default_factory=dict)
    out_names: Sequence[str] | None = None

    def run(self) -> list[Result]:
        return compare(self.fn, self.ref, self.inputs, self.kwargs, out_names=self.out_names)
