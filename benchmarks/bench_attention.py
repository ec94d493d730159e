"""Benchmark of fastlayers.attention at the ViT family's shapes (../shared/ANCHORS.md), bf16.

Baselines in the same run: SDPA with each backend (flash, efficient, cuDNN; the learnable-bias case passes the bias
as a float attn_mask, which flash cannot take), FlexAttention compiled with a score_mod that reads the bias, the
eager reference and torch.compile of the reference. Throughput: TFLOP/s of 4*B*H*N*M*D (fwd), 2.5x that (bwd).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R

from .common import Case, shapes_and_dtype

# (name, B, H, N, D, learnable bias [1, H, N, N])
GPU_SHAPES = [
    ("ViT-B/16", 128, 12, 197, 64, False),
    ("ViT-B/16 learnable bias", 128, 12, 197, 64, True),
    ("ViT-L/16@384", 32, 16, 577, 64, False),
    ("long", 4, 16, 4096, 128, False),
]
QUICK_GPU_SHAPES = [("ViT-B/16", 128, 12, 197, 64, False), ("ViT-B/16 learnable bias", 128, 12, 197, 64, True)]
CPU_SHAPES = [("small", 2, 4, 197, 32, True)]


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, bias=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return run


def _flex(with_bias: bool):
    """torch.compile'd FlexAttention (None when it does not import)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception:
        return None
    if not with_bias:
        return torch.compile(flex_attention, dynamic=False)

    def flex_bias(q, k, v, bias):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + bias[0, h, i, j])
    return torch.compile(flex_bias, dynamic=False)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    on_gpu = device.type == "cuda"
    shapes, dtype = shapes_and_dtype(device, quick, GPU_SHAPES, QUICK_GPU_SHAPES, CPU_SHAPES)
    out = []
    for name, B, H, N, D, with_bias in shapes:
        def make(B=B, H=H, N=N, D=D, with_bias=with_bias):
            s = {k: torch.randn(B, H, N, D, device=device, dtype=dtype).requires_grad_() for k in ("q", "k", "v")}
            if with_bias:
                s["bias"] = (0.5 * torch.randn(1, H, N, N, device=device, dtype=dtype)).requires_grad_()
            return s

        def ref(q, k, v, bias=None):
            return R.attention(q, k, v, bias)

        impls = {}
        if on_gpu:
            impls["fastlayers"] = lambda q, k, v, bias=None: fastlayers.attention(q, k, v, bias)
            for be in (("EFFICIENT_ATTENTION", "CUDNN_ATTENTION") if with_bias else
                       ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")):
                impls[f"sdpa-{be.split('_')[0].lower()}"] = _sdpa(be)
            if with_bias:
                impls["sdpa float mask"] = lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v, bias)
            flex = _flex(with_bias)
            if flex is not None:
                impls["flex_attention+compile"] = flex
        impls["reference"] = ref
        impls["reference+compile"] = torch.compile(ref, dynamic=False)
        fwd = 4.0 * B * H * N * N * D
        flops = {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}
        label = f"{name} B={B} H={H} N={N} D={D}" + (" bias[1,H,N,N] (grad)" if with_bias else "")
        out.append(Case(op="attention", name=label, dtype=dtype, make_inputs=make, impls=impls,
                        grad_inputs=("q", "k", "v") + (("bias",) if with_bias else ()), flops=flops.__getitem__,
                        params=dict(B=B, H=H, N=N, M=N, D=D, bias=with_bias)))
    return out
