"""Benchmark of fastlayers.depthwise_conv2d at the papers' shapes (../shared/ANCHORS.md), bf16, "same" padding.

Baselines in the same run: cuDNN through F.conv2d(groups=C) in the case's memory layout (channels-first and
channels-last cases are separate), the eager reference (F.conv2d in fp32) and torch.compile of the reference.
Throughput: TFLOP/s of the direct convolution's useful multiply-adds (fwd: 2*B*C*OH*OW*Kh*Kw; bwd: twice that,
dx and dweight; fwd+bwd: three times).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R

from .common import Case, shapes_and_dtype

# (name, B, C, H, W, K)
GPU_SHAPES = [
    ("RepLKNet-31B stage 3", 64, 256, 28, 28, 31),
    ("UniRepLKNet stage 3", 64, 512, 14, 14, 13),
    ("ConvNeXt-T stage 1", 64, 96, 56, 56, 7),
]
QUICK_GPU_SHAPES = [GPU_SHAPES[0], GPU_SHAPES[2]]
CPU_SHAPES = [("small", 2, 32, 28, 28, 7)]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    on_gpu = device.type == "cuda"
    shapes, dtype = shapes_and_dtype(device, quick, GPU_SHAPES, QUICK_GPU_SHAPES, CPU_SHAPES)
    layouts = (False, True) if on_gpu else (False,)
    out = []
    for name, B, C, H, W, K in shapes:
        for cl in layouts:
            def make(B=B, C=C, H=H, W=W, K=K, cl=cl):
                x = torch.randn(B, C, H, W, device=device, dtype=dtype)
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                w = (torch.randn(C, 1, K, K, device=device, dtype=dtype) / K).requires_grad_()
                b = torch.randn(C, device=device, dtype=dtype).requires_grad_()
                return {"x": x.requires_grad_(), "weight": w, "bias": b}

            def ref(x, weight, bias):
                return R.depthwise_conv2d(x, weight, bias, padding="same")

            impls = {}
            if on_gpu:
                impls["fastlayers"] = lambda x, weight, bias: fastlayers.depthwise_conv2d(x, weight, bias)
                impls["cuDNN"] = lambda x, weight, bias, K=K, C=C: F.conv2d(x, weight, bias, padding=K // 2,
                                                                              groups=C)
            impls["reference"] = ref
            impls["reference+compile"] = torch.compile(ref, dynamic=False)
            macs = B * C * H * W * K * K
            flops = {"fwd": 2 * macs, "bwd": 4 * macs, "fwd+bwd": 6 * macs}
            lay = "channels-last" if cl else "channels-first"
            out.append(Case(op="depthwise_conv2d", name=f"{name} B={B} C={C} {H}x{W} K={K} {lay}", dtype=dtype,
                            make_inputs=make, impls=impls, grad_inputs=("x", "weight", "bias"),
                            flops=flops.__getitem__,
                            params=dict(B=B, C=C, H=H, W=W, K=K, channels_last=cl)))
    return out
