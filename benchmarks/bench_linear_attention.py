"""Benchmark of fastlayers.linear_attention and fastlayers.retention at the papers' shapes
(../shared/ANCHORS.md), bf16 on a GPU.

Baselines in the same run: the eager reference and torch.compile of it, SDPA softmax attention of the same size,
and flash-linear-attention's chunk kernels (chunk_retention, chunk_linear_attn) where `fla` imports.
Causal cases take q, k, v laid out [B, L, H, D] (what a model's projection gives; fla's native layout) viewed as
[B, H, L, D]: fastlayers copies them to [B, H, L, D] inside the timed call, fla and SDPA read them as they are.
Throughput: GB/s of the minimal traffic (fwd: read q, k, v, write o; bwd: also read do, write dq, dk, dv).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R

from .common import Case, shapes_and_dtype

# (label, B, H, L, D, kind); kind: "noncausal" (SLAB), "causal" (linear attention), "retention", "two-sided"
GPU_SHAPES = [
    ("SLAB vision", 64, 8, 3136, 32, "noncausal"),
    ("non-causal", 8, 16, 4096, 64, "noncausal"),
    ("RetNet", 8, 16, 4096, 64, "retention"),
    ("RetNet", 8, 16, 16384, 64, "retention"),
    ("causal linear", 8, 16, 4096, 64, "causal"),
    ("causal linear", 8, 16, 16384, 64, "causal"),
    ("RMT decomposed axis (56x56, 4 heads)", 64 * 56, 4, 56, 16, "two-sided"),
]
QUICK_GPU_SHAPES = [GPU_SHAPES[0], GPU_SHAPES[1], GPU_SHAPES[2]]
CPU_SHAPES = [("small", 2, 4, 512, 32, "noncausal"), ("small", 2, 4, 512, 32, "retention")]


def _fla():
    """fla's chunk kernels, called on [B, L, H, D] tensors (None when fla does not import)."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.retention import chunk_retention
    except Exception:
        return None

    def call(fn):
        params = inspect.signature(fn).parameters
        extra = {"head_first": False} if "head_first" in params else {}
        if "normalize" in params:  # fla's linear attention normaliser differs from ours: time the plain form
            extra["normalize"] = False

        def run(q, k, v, **kw):  # q, k, v: [B, H, L, D] views of [B, L, H, D] storage
            o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0, **extra, **kw)
            return o[0] if isinstance(o, tuple) else o
        return run
    return {"retention": call(chunk_retention), "causal": call(chunk_linear_attn)}


def _gamma(H, device):
    return 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32, device=device))


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    on_gpu = device.type == "cuda"
    shapes, dtype = shapes_and_dtype(device, quick, GPU_SHAPES, QUICK_GPU_SHAPES, CPU_SHAPES)
    fla = _fla() if on_gpu else None
    out = []
    for label, B, H, L, D, kind in shapes:
        blhd = kind in ("causal", "retention")

        def make(B=B, H=H, L=L, D=D, blhd=blhd):
            def t(scale=1.0):
                x = torch.randn((B, L, H, D) if blhd else (B, H, L, D), device=device, dtype=dtype) * scale
                return (x.transpose(1, 2) if blhd else x).requires_grad_()
            return {"q": t(), "k": t(D ** -0.5), "v": t()}

        gamma = _gamma(H, device)
        if kind == "noncausal":
            def fl(q, k, v, **kw):
                return fastlayers.linear_attention(q, k, v, **kw)

            def ref(q, k, v):
                return R.linear_attention(q, k, v)
        elif kind == "causal":
            def fl(q, k, v, **kw):
                return fastlayers.linear_attention(q, k, v, causal=True, feature_map=None, normalize=False, **kw)

            def ref(q, k, v):
                return R.linear_attention(q, k, v, True, None, False)
        else:
            causal = kind == "retention"

            def fl(q, k, v, gamma=gamma, causal=causal, **kw):
                return fastlayers.retention(q, k, v, gamma, causal=causal, **kw)

            def ref(q, k, v, gamma=gamma, causal=causal):
                return R.retention(q, k, v, gamma, causal)
        impls = {}
        if on_gpu:
            impls["fastlayers"] = fl
        impls["reference"] = ref
        impls["reference+compile"] = torch.compile(ref, dynamic=False)
        if on_gpu:
            is_causal = kind in ("causal", "retention")
            impls["sdpa (softmax attention)"] = lambda q, k, v, c=is_causal: F.scaled_dot_product_attention(
                q, k, v, is_causal=c)
            if fla is not None and kind in fla:
                impls["fla chunk"] = fla[kind]
        elt = torch.finfo(dtype).bits // 8
        n = B * H * L * D
        traffic = {"fwd": 4 * n * elt, "bwd": 8 * n * elt, "fwd+bwd": 12 * n * elt}
        out.append(Case(op="linear_attention" if kind in ("noncausal", "causal") else "retention",
                        name=f"{label} {kind} B={B} H={H} L={L} D={D}", dtype=dtype, make_inputs=make, impls=impls,
                        grad_inputs=("q", "k", "v"), bytes=traffic.__getitem__,
                        params=dict(B=B, H=H, L=L, D=D, kind=kind)))
    return out
