"""SparK's sparse normalisation modules: SparseBatchNorm2d and SparseLayerNorm2d (mask from the context)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.sparse_conv2d import MaskLike
from ..ops.sparse_norm2d import sparse_batch_norm2d, sparse_layer_norm2d
from .sparse_conv2d import resolve_mask


class SparseBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the active pixels (SparK's SparseBatchNorm2d, a BatchNorm1d on the gathered pixels).
    Same constructor, parameters and buffers as nn.BatchNorm2d (it is one); running statistics follow
    nn.BatchNorm's rules (momentum, or a cumulative average with momentum=None). forward(x [B, C, H, W], mask=None)."""

    def forward(self, x: Tensor, mask: Optional[MaskLike] = None) -> Tensor:
        sm = resolve_mask(mask, "SparseBatchNorm2d")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return sparse_batch_norm2d(x, sm, self.running_mean if use_running else None,
                                   self.running_var if use_running else None, self.weight, self.bias,
                                   batch_stats, factor, self.eps)


class SparseLayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at the active pixels, 0 elsewhere (SparK's SparseConvNeXtLayerNorm).

    channels_last=False: x [B, C, H, W], like timm's LayerNorm2d; True: x [B, H, W, C], like timm's LayerNorm
    inside a ConvNeXt block. Constructor as timm's LayerNorm2d (num_channels, eps, affine); parameters `weight`,
    `bias` as nn.LayerNorm. forward(x, mask=None).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, channels_last: bool = False,
                 device=None, dtype=None):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)
        self.channels_last = channels_last

    def forward(self, x: Tensor, mask: Optional[MaskLike] = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SparseLayerNorm2d: expects a 4-D feature map, got shape {tuple(x.shape)} (SparK's "
                             "sparse LayerNorm is only defined on feature maps)")
        sm = resolve_mask(mask, "SparseLayerNorm2d")
        return sparse_layer_norm2d(x, sm, self.weight, self.bias, self.eps, self.channels_last)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", channels_last={self.channels_last}"


def examples(device) -> list:
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 3, 3, generator=g) < 0.6).to(device)
    return [
        ("SparseBatchNorm2d", SparseBatchNorm2d(8).to(device), (torch.randn(2, 8, 12, 12, generator=g).to(device), mask)),
        ("SparseLayerNorm2d", SparseLayerNorm2d(8).to(device), (torch.randn(2, 8, 12, 12, generator=g).to(device), mask)),
        ("SparseLayerNorm2d channels-last", SparseLayerNorm2d(8, channels_last=True).to(device),
         (torch.randn(2, 12, 12, 8, generator=g).to(device), mask)),
    ]
