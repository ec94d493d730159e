"""SparK's sparse normalisations in plain PyTorch: statistics over the active pixels only, zeros elsewhere.

Both gather the active pixels into rows [N_active, C], normalise those rows and scatter them back into zeros,
exactly as SparK's SparseBatchNorm2d (a BatchNorm1d on the rows) and SparseConvNeXtLayerNorm do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse_conv2d import _compute_dtype, upsample_mask


def _rows(x_bhwc: torch.Tensor, active: torch.Tensor):
    """x [B, H, W, C] -> (rows [N_active, C], scatter function back to [B, H, W, C] zeros)."""
    idx = active.nonzero(as_tuple=True)

    def scatter(rows: torch.Tensor) -> torch.Tensor:
        out = rows.new_zeros(x_bhwc.shape[:3] + rows.shape[1:])
        out[idx] = rows
        return out
    return x_bhwc[idx], scatter


def sparse_batch_norm2d(x, mask, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                        momentum=0.1, eps=1e-5):
    """BatchNorm over the active pixels of x [B, C, H, W] (SparK's SparseBatchNorm2d = BatchNorm1d on them).

    Batch statistics (training, or no running stats) are the mean and biased variance over the active pixels;
    running_mean/running_var ([C], updated in place like F.batch_norm: unbiased variance, factor `momentum`)
    are left unchanged when no pixel is active. Returns [B, C, H, W] in x.dtype, 0 at inactive pixels.
    """
    cdt = _compute_dtype(x.dtype)
    active = upsample_mask(mask, x.shape[2], x.shape[3])[:, 0]
    rows, scatter = _rows(x.permute(0, 2, 3, 1).to(cdt), active)
    rm = running_mean.to(cdt) if running_mean is not None else None
    rv = running_var.to(cdt) if running_var is not None else None
    w = weight.to(cdt) if weight is not None else None
    b = bias.to(cdt) if bias is not None else None
    y = F.batch_norm(rows, rm, rv, w, b, training or running_mean is None, momentum, eps)
    if training and running_mean is not None and rm is not running_mean and rows.shape[0] > 0:
        with torch.no_grad():  # the statistics were updated on fp32 copies
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return scatter(y).permute(0, 3, 1, 2).to(x.dtype)


def sparse_layer_norm2d(x, mask, weight=None, bias=None, eps=1e-6, channels_last=False):
    """LayerNorm over channels at each active pixel (SparK's SparseConvNeXtLayerNorm), 0 at inactive pixels.

    channels_last=False: x [B, C, H, W] (timm LayerNorm2d); True: x [B, H, W, C] (timm LayerNorm after the
    permute in a ConvNeXt block). Returns x's shape in x.dtype.
    """
    cdt = _compute_dtype(x.dtype)
    xb = x if channels_last else x.permute(0, 2, 3, 1)
    active = upsample_mask(mask, xb.shape[1], xb.shape[2])[:, 0]
    rows, scatter = _rows(xb.to(cdt), active)
    C = rows.shape[1]
    y = F.layer_norm(rows, (C,), weight.to(cdt) if weight is not None else None,
                     bias.to(cdt) if bias is not None else None, eps)
    out = scatter(y)
    return (out if channels_last else out.permute(0, 3, 1, 2)).to(x.dtype)
