"""Sparse masked 2-D convolution as SparK defines it, in plain PyTorch: the oracle, the baseline and the CPU path.

mask: [B, 1, h, w] bool at the coarsest resolution (True = visible patch). At a feature map [.., H, W] it is
repeated block-wise (SparK's repeat_interleave by H // h and W // w); a pixel is active iff its patch is visible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math for fp16/bf16/fp32, fp64 stays fp64


def _mask_tensor(mask) -> torch.Tensor:
    return getattr(mask, "mask", mask)  # a fastlayers SparseMask or the bool tensor itself


def upsample_mask(mask, H: int, W: int) -> torch.Tensor:
    """mask [B, 1, h, w] bool -> [B, 1, H, W] bool by nearest block repeat (H % h == 0 and W % w == 0)."""
    m = _mask_tensor(mask)
    h, w = m.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"a feature map of {H}x{W} is not a whole number of {h}x{w} mask patches")
    return m.repeat_interleave(H // h, dim=2).repeat_interleave(W // w, dim=3)


def sparse_conv2d(x, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(x * m_in, weight, bias) * m_out, with m_in / m_out the mask at the input / output resolution.

    x: [B, C_in, H, W]; weight: [C_out, C_in/groups, KH, KW]; bias: [C_out] or None; mask: [B, 1, h, w] bool.
    Inactive inputs contribute nothing (even NaN: they are selected away, not multiplied by 0) and inactive
    outputs are exactly 0. Returns [B, C_out, Ho, Wo] in x.dtype.
    """
    cdt = _compute_dtype(x.dtype)
    m_in = upsample_mask(mask, x.shape[2], x.shape[3])
    xm = torch.where(m_in, x.to(cdt), 0.0)
    y = F.conv2d(xm, weight.to(cdt), bias.to(cdt) if bias is not None else None, stride, padding, dilation, groups)
    m_out = upsample_mask(mask, y.shape[2], y.shape[3])
    return torch.where(m_out, y, 0.0).to(x.dtype)


def masked(x, mask) -> torch.Tensor:
    """x [B, C, H, W] with its inactive pixels set to exactly 0 (SparK's `x *= active`)."""
    return torch.where(upsample_mask(mask, x.shape[2], x.shape[3]), x, 0.0)


def spark_dense_then_mask(model, mask, exclude=("head", "fc", "classifier", "global_pool", "head_drop")):
    """A copy of a dense timm ResNet / ConvNeXt running SparK's own formulation of its sparse encoder, for a fixed
    mask: every conv and pooling layer runs densely and its output is multiplied by the mask; BatchNorm is a
    BatchNorm1d on the gathered active pixels and LayerNorm normalises the gathered active pixels (both scattered
    back into zeros); each ConvNeXt block's MLP branch is multiplied by the mask before the residual add; the
    input image is masked in forward_features. This is what SparK computes (at full dense cost); it is the
    baseline of the benchmarks and the oracle of fastlayers.sparsify. Top-level children in `exclude` stay dense.
    """
    import copy
    import functools
    import types

    model = copy.deepcopy(model)

    def active(H, W):
        return upsample_mask(mask, H, W)

    def conv_or_pool(self, x):
        y = type(self).forward(self, x)
        return y * active(y.shape[2], y.shape[3])

    def batch_norm(self, x):  # BatchNorm1d's forward on the active rows
        idx = active(x.shape[2], x.shape[3])[:, 0].nonzero(as_tuple=True)
        bhwc = x.permute(0, 2, 3, 1)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        rows = F.batch_norm(bhwc[idx], self.running_mean, self.running_var, self.weight, self.bias, use_batch,
                            factor, self.eps)
        out = torch.zeros_like(bhwc)
        out[idx] = rows
        return out.permute(0, 3, 1, 2)

    def layer_norm(self, x, channels_last):
        bhwc = x if channels_last else x.permute(0, 2, 3, 1)
        idx = active(bhwc.shape[1], bhwc.shape[2])[:, 0].nonzero(as_tuple=True)
        out = torch.zeros_like(bhwc)
        out[idx] = F.layer_norm(bhwc[idx], self.normalized_shape, self.weight, self.bias, self.eps)
        return out if channels_last else out.permute(0, 3, 1, 2)

    def convnext_block(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = x * active(x.shape[2], x.shape[3])
        return self.drop_path(x) + self.shortcut(shortcut)

    for name, m in model.named_modules():
        if not name or name.split(".")[0] in exclude:
            continue
        t = type(m)
        timm = t.__module__.startswith("timm.")
        if t in (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d):
            m.forward = types.MethodType(conv_or_pool, m)
        elif t is torch.nn.BatchNorm2d:
            m.forward = types.MethodType(batch_norm, m)
        elif timm and t.__name__ == "LayerNorm2d":
            m.forward = types.MethodType(functools.partial(layer_norm, channels_last=False), m)
        elif t is torch.nn.LayerNorm or (timm and t.__name__ == "LayerNorm"):
            m.forward = types.MethodType(functools.partial(layer_norm, channels_last=True), m)
        elif timm and t.__name__ == "ConvNeXtBlock":
            m.forward = types.MethodType(convnext_block, m)
    features = model.forward_features
    model.forward_features = lambda x: features(x * active(x.shape[2], x.shape[3]))
    return model
