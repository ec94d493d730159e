"""Benchmark of fastlayers.selective_scan at Mamba's shapes (../shared/ANCHORS.md), bf16.

Mamba's call: u, delta, z [B, D, L] bf16, input-dependent B, C [B, N, L] bf16, A, D, delta_bias fp32, softplus.
Baselines in the same run: mamba_ssm's CUDA selective_scan_fn where it imports, the eager reference and
torch.compile of the reference. The reference is a Python loop over time (one set of kernel launches per step,
and torch.compile unrolls it), so it is timed on a separate short case (L = 64) against fastlayers at the same
shape, not at L = 2048; the long cases compare fastlayers' backends with mamba_ssm only.
Throughput: GB/s of the minimal traffic. fwd: read u, delta, z, B, C, write out; bwd: read u, delta, z, B, C,
dout, write du, ddelta, dz, dB, dC (the small A, D, delta_bias and their gradients are left out).
"""
from __future__ import annotations

import torch

import fastlayers
from fastlayers import _ext
from fastlayers import reference as R

from .common import Case, optional_import, shapes_and_dtype

# (name, B, D, L, N, with the reference baselines)
GPU_SHAPES = [
    ("Mamba", 8, 1536, 2048, 16, False),
    ("Mamba long", 8, 1536, 8192, 16, False),
    ("Mamba N=64", 8, 1536, 2048, 64, False),
    ("Mamba short (reference baselines)", 8, 1536, 64, 16, True),
]
QUICK_GPU_SHAPES = [GPU_SHAPES[0], GPU_SHAPES[3]]
CPU_SHAPES = [("small", 2, 64, 16, 16, True)]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    on_gpu = device.type == "cuda"
    shapes, dtype = shapes_and_dtype(device, quick, GPU_SHAPES, QUICK_GPU_SHAPES, CPU_SHAPES)
    out = []
    for name, B, D, L, N, with_ref in shapes:
        def make(B=B, D=D, L=L, N=N):
            def t(*shape, dt=dtype, scale=1.0):
                return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dt).requires_grad_()
            A = -torch.exp(torch.log(torch.arange(1, N + 1, device=device, dtype=torch.float32)).repeat(D, 1))
            return {"u": t(B, D, L), "delta": t(B, D, L, scale=0.5), "A": A.requires_grad_(),
                    "B": t(B, N, L), "C": t(B, N, L), "D": t(D, dt=torch.float32), "z": t(B, D, L),
                    "delta_bias": (torch.rand(D, device=device) * -4.0).requires_grad_()}

        def call(fn, **kw):
            return lambda u, delta, A, B, C, D, z, delta_bias: fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                                                                  delta_softplus=True, **kw)
        impls = {}
        if on_gpu:
            impls["fastlayers"] = call(fastlayers.selective_scan)
            impls["fastlayers-triton"] = call(fastlayers.selective_scan, backend="triton")
            if _ext.has_op("selective_scan_fwd_cuda"):
                impls["fastlayers-cuda"] = call(fastlayers.selective_scan, backend="cuda")
            peer = optional_import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
            if peer is not None:
                impls["mamba_ssm"] = call(peer)
        if with_ref:
            ref = call(R.selective_scan)
            impls["reference"] = ref
            impls["reference+compile"] = torch.compile(ref, dynamic=False)
        elt = torch.finfo(dtype).bits // 8
        bdl, bnl = B * D * L * elt, B * N * L * elt
        traffic = {"fwd": 4 * bdl + 2 * bnl, "bwd": 7 * bdl + 4 * bnl}
        traffic["fwd+bwd"] = traffic["fwd"] + traffic["bwd"]
        out.append(Case(op="selective_scan", name=f"{name} B={B} D={D} L={L} N={N} z D delta_bias softplus",
                        dtype=dtype, make_inputs=make, impls=impls,
                        grad_inputs=("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), bytes=traffic.__getitem__,
                        params=dict(B=B, D=D, L=L, N=N, z=True, D_skip=True, delta_bias=True, softplus=True)))
    return out
