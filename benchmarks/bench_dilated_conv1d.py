"""Benchmark of fastlayers.dilated_conv1d at the papers' shapes (../shared/ANCHORS.md), bf16.

Baselines in the same run: torch's F.conv1d as Mamba and TCN code call it (pad, conv, truncate), the eager
reference, torch.compile of the reference, and causal-conv1d's CUDA kernel where it imports (K 2..4, d=1).
Throughput: GB/s of the minimal traffic (fwd: read x, write y; bwd: read x and dy, write dx).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import _ext
from fastlayers import reference as R

from .common import Case, optional_import, shapes_and_dtype

# (name, B, C, L, K, dilation, activation, channels_last)
GPU_SHAPES = [
    ("TCNCA", 4, 256, 131072, 3, 64, None, False),
    ("TCNCA", 8, 768, 16384, 3, 8, None, False),
    ("Mamba conv", 8, 1536, 2048, 4, 1, "silu", False),
    ("Mamba conv channels-last", 8, 1536, 2048, 4, 1, "silu", True),
]
QUICK_GPU_SHAPES = [("TCNCA", 4, 256, 16384, 3, 64, None, False), ("Mamba conv", 8, 1536, 2048, 4, 1, "silu", False)]
CPU_SHAPES = [("small", 2, 64, 4096, 3, 8, None, False)]


def _torch_conv1d(x, weight, bias, dilation, activation):
    """How model code calls torch: depthwise conv with (K-1)*d padding, then keep the first L outputs."""
    C, K = weight.shape
    L = x.shape[-1]
    y = F.conv1d(x, weight[:, None, :], bias, padding=(K - 1) * dilation, dilation=dilation, groups=C)[..., :L]
    return F.silu(y) if activation else y


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    on_gpu = device.type == "cuda"
    shapes, dtype = shapes_and_dtype(device, quick, GPU_SHAPES, QUICK_GPU_SHAPES, CPU_SHAPES)
    out = []
    for name, B, C, L, K, d, act, cl in shapes:
        def make(B=B, C=C, L=L, K=K, cl=cl):
            shape = (B, L, C) if cl else (B, C, L)
            x = torch.randn(shape, device=device, dtype=dtype)
            x = (x.transpose(1, 2) if cl else x).requires_grad_()
            w = (torch.randn(C, K, device=device, dtype=dtype) / K).requires_grad_()
            b = torch.randn(C, device=device, dtype=dtype).requires_grad_()
            return {"x": x, "weight": w, "bias": b}

        def ref(x, weight, bias, d=d, act=act):
            return R.dilated_conv1d(x, weight, bias, d, True, act)

        impls = {}
        if on_gpu:
            impls["fastlayers"] = lambda x, weight, bias, d=d, act=act: fastlayers.dilated_conv1d(
                x, weight, bias, d, True, act)
            impls["fastlayers-triton"] = lambda x, weight, bias, d=d, act=act: fastlayers.dilated_conv1d(
                x, weight, bias, d, True, act, backend="triton")
            if _ext.has_op("dilated_conv1d_fwd_cuda") and not cl:
                impls["fastlayers-cuda"] = lambda x, weight, bias, d=d, act=act: fastlayers.dilated_conv1d(
                    x, weight, bias, d, True, act, backend="cuda")
            impls["torch.conv1d"] = lambda x, weight, bias, d=d, act=act: _torch_conv1d(x, weight, bias, d, act)
        impls["reference"] = ref
        impls["reference+compile"] = torch.compile(ref, dynamic=False)
        ccf = optional_import("causal_conv1d", "causal_conv1d_fn") if on_gpu else None
        if ccf is not None and d == 1 and 2 <= K <= 4:
            impls["causal-conv1d"] = lambda x, weight, bias, act=act: ccf(x, weight, bias, activation=act)
        elt = torch.finfo(dtype).bits // 8
        n = B * C * L
        traffic = {"fwd": 2 * n * elt, "bwd": 3 * n * elt, "fwd+bwd": 5 * n * elt}
        out.append(Case(op="dilated_conv1d", name=f"{name} B={B} C={C} L={L} K={K} d={d}" + (f" {act}" if act else ""),
                        dtype=dtype, make_inputs=make, impls=impls, grad_inputs=("x", "weight", "bias"),
                        bytes=traffic.__getitem__,
                        params=dict(B=B, C=C, L=L, K=K, dilation=d, activation=act, channels_last=cl)))
    return out
