"""Benchmark of SparK's sparse masked convolution and normalisations (../shared/ANCHORS.md), bf16, B=64.

Densities (kept fraction of the 7x7 patch grid, SparK's random masking with a fixed count per image): 40 % (SparK's
60 % masking), 25 % and 75 %. Baselines in the same run:
  "SparK dense+mask"  what SparK runs: the dense cuDNN op then `x * mask` (norms: gather, normalise, scatter)
  "cuDNN dense"       the dense op alone (no mask): the cost SparK pays at any mask ratio
  "spconv SubMConv2d" spconv's submanifold sparse conv on the active pixels, when spconv imports (dense 3x3 only)
  "reference", "reference+compile"  fastlayers' PyTorch reference (fp32 math) eager and compiled
Throughput: dense-equivalent TFLOP/s for convs (2*B*Ho*Wo*C_out*C_in/G*K*K per pass; bwd counts 2 passes) and
GB/s of the dense tensors for the norms, so a sparse kernel's "throughput" above the dense peak is its saving.
All tensors channels-last (cuDNN's fastest bf16 layout). The whole-encoder case times one training step
(forward_features + backward to every parameter) of sparsify(resnet50) against SparK's dense-then-mask resnet50.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R

from .common import Case

B = 64
DENSITIES = (0.4, 0.25, 0.75)
# (name, C_in, C_out, H, kernel, stride, groups)
RESNET_STAGES = [("ResNet-50 stage1 3x3", 64, 64, 56, 3, 1, 1), ("ResNet-50 stage2 3x3", 128, 128, 28, 3, 1, 1),
                 ("ResNet-50 stage3 3x3", 256, 256, 14, 3, 1, 1), ("ResNet-50 stage4 3x3", 512, 512, 7, 3, 1, 1),
                 ("ResNet-50 stage2 3x3 s2", 128, 128, 56, 3, 2, 1), ("ResNet-50 stage1 1x1 expand", 64, 256, 56, 1, 1, 1)]
CONVNEXT_STAGES = [("ConvNeXt-T stage1", 96, 56), ("ConvNeXt-T stage2", 192, 28), ("ConvNeXt-T stage3", 384, 14),
                   ("ConvNeXt-T stage4", 768, 7)]


def spark_mask(batch: int, density: float, device, seed: int = 0, grid: int = 7) -> torch.Tensor:
    """SparK's random masking: exactly round(density * grid^2) visible patches per image; [B, 1, grid, grid]."""
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round(density * grid * grid))
    idx = torch.rand(batch, grid * grid, generator=g).argsort(dim=1)[:, :keep]
    m = torch.zeros(batch, grid * grid, dtype=torch.bool).scatter_(1, idx, True)
    return m.view(batch, 1, grid, grid).to(device)


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _spconv_impl(mask, C_in, C_out, H, k, pad):
    """spconv's SubMConv2d on the active pixels (gathered from x inside the timed function), or None."""
    try:
        import spconv.pytorch as spconv
    except Exception:
        return None
    m = R.upsample_mask(mask, H, H)[:, 0]
    coords = m.nonzero().int()  # [N, 3] (b, h, w)
    conv = spconv.SubMConv2d(C_in, C_out, k, padding=pad, bias=True, indice_key="subm").to(mask.device)

    def run(x, weight, bias):
        feats = x.permute(0, 2, 3, 1)[m]  # [N, C_in]
        del conv.weight, conv.bias
        conv.weight = weight.permute(0, 2, 3, 1).contiguous()  # spconv 2.x: [C_out, kh, kw, C_in]
        conv.bias = bias
        t = spconv.SparseConvTensor(feats, coords, [H, H], x.shape[0])
        return conv(t).features
    return run


def _conv_cases(device, dtype, quick):
    out = []
    stages = RESNET_STAGES[:1] + RESNET_STAGES[3:4] if quick else RESNET_STAGES
    for name, C_in, C_out, H, k, s, g in stages:
        for density in ((0.4,) if quick else DENSITIES):
            mask = spark_mask(B, density, device)
            pad = k // 2
            Ho = (H + 2 * pad - k) // s + 1
            m_out = R.upsample_mask(mask, Ho, Ho)
            sm = fastlayers.SparseMask(mask)  # tables built once, as in an encoder

            def make(C_in=C_in, C_out=C_out, H=H, k=k, g=g, mask=mask):
                # zero at inactive pixels, as every layer input inside SparK's encoder: all impls agree
                x = _cl(R.masked(torch.randn(B, C_in, H, H, device=device, dtype=dtype), mask)).requires_grad_()
                w = _cl(torch.randn(C_out, C_in // g, k, k, device=device, dtype=dtype) * (k * k * C_in) ** -0.5)
                return {"x": x, "weight": w.requires_grad_(),
                        "bias": torch.randn(C_out, device=device, dtype=dtype).requires_grad_()}

            impls = {}
            if device.type == "cuda":
                impls["fastlayers"] = lambda x, weight, bias, s=s, pad=pad, g=g, sm=sm: fastlayers.sparse_conv2d(
                    x, sm, weight, bias, s, pad, 1, g)
                impls["SparK dense+mask"] = lambda x, weight, bias, s=s, pad=pad, g=g, m=m_out: F.conv2d(
                    x, weight, bias, s, pad, 1, g) * m
                impls["cuDNN dense"] = lambda x, weight, bias, s=s, pad=pad, g=g: F.conv2d(x, weight, bias, s, pad, 1, g)
                sp = _spconv_impl(mask, C_in, C_out, H, k, pad) if (s == 1 and g == 1) else None
                if sp is not None:
                    impls["spconv SubMConv2d"] = sp

            def ref(x, weight, bias, s=s, pad=pad, g=g, mask=mask):
                return R.sparse_conv2d(x, mask, weight, bias, s, pad, 1, g)
            impls["reference"] = ref
            impls["reference+compile"] = torch.compile(ref, dynamic=False)
            flops = 2.0 * B * Ho * Ho * C_out * (C_in // g) * k * k
            out.append(Case(op="sparse_conv2d", name=f"{name} C={C_in}->{C_out} {H}x{H} density={density:.0%}",
                            dtype=dtype, make_inputs=make, impls=impls, grad_inputs=("x", "weight", "bias"),
                            flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops}.__getitem__,
                            params=dict(B=B, C_in=C_in, C_out=C_out, H=H, k=k, stride=s, groups=g, density=density)))
    return out


def _spark_layer_norm_cl(x, mask, weight, bias, eps=1e-6):
    """SparK's SparseConvNeXtLayerNorm (channels-last): gather the active rows, LayerNorm, scatter into zeros."""
    idx = R.upsample_mask(mask, x.shape[1], x.shape[2])[:, 0].nonzero(as_tuple=True)
    out = torch.zeros_like(x)
    out[idx] = F.layer_norm(x[idx], (x.shape[-1],), weight, bias, eps)
    return out


def _convnext_cases(device, dtype, quick):
    """ConvNeXt-T block front: depthwise 7x7 conv, permute, LayerNorm over channels (channels-last)."""
    out = []
    for name, C, H in (CONVNEXT_STAGES[:1] if quick else CONVNEXT_STAGES):
        for density in ((0.4,) if quick else DENSITIES):
            mask = spark_mask(B, density, device)
            m = R.upsample_mask(mask, H, H)
            sm = fastlayers.SparseMask(mask)

            def make(C=C, H=H, mask=mask):
                x = _cl(R.masked(torch.randn(B, C, H, H, device=device, dtype=dtype), mask)).requires_grad_()
                w = (torch.randn(C, 1, 7, 7, device=device, dtype=dtype) / 7).requires_grad_()
                return {"x": x, "weight": w, "bias": torch.randn(C, device=device, dtype=dtype).requires_grad_(),
                        "ln_weight": torch.randn(C, device=device, dtype=dtype).requires_grad_(),
                        "ln_bias": torch.randn(C, device=device, dtype=dtype).requires_grad_()}

            def fl(x, weight, bias, ln_weight, ln_bias, C=C, sm=sm):
                y = fastlayers.sparse_conv2d(x, sm, weight, bias, 1, 3, 1, C)
                return fastlayers.sparse_layer_norm2d(y.permute(0, 2, 3, 1), sm, ln_weight, ln_bias, 1e-6, True)

            def spark(x, weight, bias, ln_weight, ln_bias, C=C, m=m, mask=mask):
                y = F.conv2d(x, weight, bias, 1, 3, 1, C) * m
                return _spark_layer_norm_cl(y.permute(0, 2, 3, 1), mask, ln_weight, ln_bias)

            def dense(x, weight, bias, ln_weight, ln_bias, C=C):
                y = F.conv2d(x, weight, bias, 1, 3, 1, C)
                return F.layer_norm(y.permute(0, 2, 3, 1), (C,), ln_weight, ln_bias, 1e-6)

            def ref(x, weight, bias, ln_weight, ln_bias, C=C, mask=mask):
                y = R.sparse_conv2d(x, mask, weight, bias, 1, 3, 1, C)
                return R.sparse_layer_norm2d(y.permute(0, 2, 3, 1), mask, ln_weight, ln_bias, 1e-6, True)

            impls = {"fastlayers": fl, "SparK dense+mask": spark, "cuDNN dense": dense} if device.type == "cuda" else {}
            impls["reference"] = ref
            impls["reference+compile"] = torch.compile(ref, dynamic=False)
            elt = torch.finfo(dtype).bits // 8
            n = B * C * H * H * elt  # one dense tensor
            out.append(Case(op="sparse_conv2d", name=f"{name} dw7x7+LayerNorm C={C} {H}x{H} density={density:.0%}",
                            dtype=dtype, make_inputs=make, impls=impls,
                            grad_inputs=("x", "weight", "bias", "ln_weight", "ln_bias"),
                            bytes={"fwd": 3 * n, "bwd": 6 * n, "fwd+bwd": 9 * n}.__getitem__,
                            params=dict(B=B, C=C, H=H, k=7, density=density)))
    return out


def _batch_norm_cases(device, dtype, quick):
    out = []
    for C, H in ((64, 56), (256, 56)) if not quick else ((64, 56),):
        density = 0.4
        mask = spark_mask(B, density, device)
        sm = fastlayers.SparseMask(mask)
        idx = R.upsample_mask(mask, H, H)[:, 0].nonzero(as_tuple=True)

        def make(C=C, H=H):
            return {"x": _cl(torch.randn(B, C, H, H, device=device, dtype=dtype)).requires_grad_(),
                    "weight": torch.randn(C, device=device, dtype=dtype).requires_grad_(),
                    "bias": torch.randn(C, device=device, dtype=dtype).requires_grad_()}

        def fl(x, weight, bias, sm=sm):
            return fastlayers.sparse_batch_norm2d(x, sm, None, None, weight, bias, True)

        def spark(x, weight, bias, idx=idx):  # SparK's SparseBatchNorm2d: BatchNorm1d on the gathered pixels
            bhwc = x.permute(0, 2, 3, 1)
            rows = F.batch_norm(bhwc[idx], None, None, weight, bias, True)
            y = torch.zeros_like(bhwc)
            y[idx] = rows
            return y.permute(0, 3, 1, 2)

        def ref(x, weight, bias, mask=mask):
            return R.sparse_batch_norm2d(x, mask, None, None, weight, bias, True)

        impls = {"fastlayers": fl, "SparK dense+mask": spark,
                 "cuDNN dense": lambda x, weight, bias: F.batch_norm(x, None, None, weight, bias, True)} \
            if device.type == "cuda" else {}
        impls["reference"] = ref
        impls["reference+compile"] = torch.compile(ref, dynamic=False)
        n = B * C * H * H * (torch.finfo(dtype).bits // 8)
        out.append(Case(op="sparse_conv2d", name=f"BatchNorm C={C} {H}x{H} density={density:.0%}", dtype=dtype,
                        make_inputs=make, impls=impls, grad_inputs=("x", "weight", "bias"),
                        bytes={"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n}.__getitem__,
                        params=dict(B=B, C=C, H=H, density=density)))
    return out


def _encoder_case(device, dtype, batch):
    """One training step of the whole encoder: forward_features + backward to every parameter. The fastlayers
    step builds a new SparseMask (its tables) every step, as training with a fresh mask per batch would."""
    import contextlib
    import copy

    import timm
    from torch.func import functional_call

    mask = spark_mask(batch, 0.4, device)
    dense = timm.create_model("resnet50", pretrained=False).to(device=device, dtype=dtype).train()
    dense = dense.to(memory_format=torch.channels_last)
    spark = R.spark_dense_then_mask(dense, mask)
    sparse = fastlayers.sparsify(copy.deepcopy(dense))
    names = [n for n, _ in dense.named_parameters() if not n.startswith("fc.")]

    def make():
        x = _cl(torch.randn(batch, 3, 224, 224, device=device, dtype=dtype))
        params = dict(dense.named_parameters())
        return {"x": x, **{n: params[n].detach().clone().requires_grad_() for n in names}}

    def step(model, sparse_ctx: bool):
        view = _FeatureView(model)

        def run(x, **params):
            ctx = fastlayers.nn.sparse_mask(fastlayers.SparseMask(mask)) if sparse_ctx else contextlib.nullcontext()
            with ctx:
                return functional_call(view, {f"model.{k}": v for k, v in params.items()}, (x,), strict=False)
        return run

    impls = {"fastlayers": step(sparse, True), "SparK dense+mask": step(spark, False), "cuDNN dense": step(dense, False)}
    return Case(op="sparse_conv2d", name=f"sparsify(resnet50) encoder step B={batch} density=40%", dtype=dtype,
                make_inputs=make, impls=impls, grad_inputs=tuple(names), modes=("fwd", "fwd+bwd"),
                params=dict(B=batch, model="resnet50", density=0.4))


class _FeatureView(torch.nn.Module):
    """model.forward_features as a module's forward (so functional_call can swap in the timed parameters)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    on_gpu = device.type == "cuda"
    if not on_gpu:  # one tiny case: the reference eager vs torch.compile
        mask = spark_mask(2, 0.4, device, grid=4)

        def make():
            return {"x": torch.randn(2, 16, 16, 16, requires_grad=True),
                    "weight": (torch.randn(16, 16, 3, 3) / 12).requires_grad_(),
                    "bias": torch.randn(16, requires_grad=True)}

        def ref(x, weight, bias):
            return R.sparse_conv2d(x, mask, weight, bias, 1, 1)
        return [Case(op="sparse_conv2d", name="small 3x3 C=16 16x16 density=40%", dtype=torch.float32,
                     make_inputs=make, impls={"reference": ref, "reference+compile": torch.compile(ref, dynamic=False)},
                     grad_inputs=("x", "weight", "bias"), params=dict(B=2, C=16, H=16, density=0.4))]
    dtype = torch.bfloat16
    out = _conv_cases(device, dtype, quick) + _convnext_cases(device, dtype, quick) + \
        _batch_norm_cases(device, dtype, quick)
    out.append(_encoder_case(device, dtype, 16 if quick else 64))
    return out
