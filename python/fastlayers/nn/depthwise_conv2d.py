"""Modules over fastlayers.depthwise_conv2d: DepthwiseConv2d (a depthwise nn.Conv2d) and UniRepLKNet's
DilatedReparamBlock; `accelerate` rules for depthwise nn.Conv2d (kernel >= 5, e.g. timm ConvNeXt's conv_dw) and
for UniRepLKNet's own DilatedReparamBlock."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patch
from ..ops.depthwise_conv2d import MAX_K, depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d(C, C, K, groups=C, ...) computed by fastlayers.depthwise_conv2d. Same constructor, parameters
    (`weight` [C, 1, Kh, Kw], `bias` [C]) and state_dict as nn.Conv2d, and it is one (isinstance holds).

    groups defaults to in_channels; in_channels == out_channels == groups, padding_mode "zeros", kernel sizes up
    to 31. Channels-first and channels-last inputs are read as they are; the output keeps the layout.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, kernel_size=3, stride=1, padding=0,
                 dilation=1, groups: Optional[int] = None, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        out_channels = in_channels if out_channels is None else out_channels
        groups = in_channels if groups is None else groups
        if not (in_channels == out_channels == groups):
            raise ValueError(f"DepthwiseConv2d: must be depthwise (in_channels == out_channels == groups), got "
                             f"{in_channels}, {out_channels}, {groups}")
        if padding_mode != "zeros":
            raise ValueError(f"DepthwiseConv2d: only padding_mode='zeros' is supported, got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        if max(self.kernel_size) > MAX_K:
            raise ValueError(f"DepthwiseConv2d: kernel sizes up to {MAX_K} are supported, got {self.kernel_size}")

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation,
                                stride=self.stride)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A DepthwiseConv2d sharing (not copying) the parameters of a depthwise nn.Conv2d."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        m.weight, m.bias = conv.weight, conv.bias
        return m


# UniRepLKNet's default parallel branches per large kernel size: (kernel sizes, dilations)
_BRANCHES = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


def _fuse_bn(weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """conv then BN (eval statistics) as one conv: (weight [C, 1, k, k], bias [C])."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias + (b - bn.running_mean) * scale


def _dilate_into(kernel: Tensor, small: Tensor, r: int) -> Tensor:
    """Add `small` [C, 1, k, k] with dilation r to the centre of `kernel` [C, 1, K, K]."""
    k, K = small.shape[-1], kernel.shape[-1]
    span = r * (k - 1) + 1
    dil = small.new_zeros(small.shape[0], 1, span, span)
    dil[:, :, ::r, ::r] = small
    off = (K - span) // 2
    return kernel + F.pad(dil, (off, off, off, off))


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet's Dilated Reparam Block: a depthwise KxK convolution plus parallel dilated small depthwise
    convolutions, each followed by BatchNorm, summed: origin_bn(lk_origin(x)) + sum_k dil_bn_k(dil_conv_k(x)).

    Same constructor and parameter names as UniRepLKNet's (`lk_origin`, `origin_bn`, `dil_conv_k{k}_{r}`,
    `dil_bn_k{k}_{r}`), so its checkpoints load unchanged; `branches` overrides the default (kernel, dilation)
    pairs for kernel_size (defaults exist for 5..17). x: [B, C, H, W] -> [B, C, H, W].

    In training mode every branch runs (BatchNorm needs each branch's batch statistics). In eval mode the
    branches are re-parameterised on the fly into one KxK kernel and one convolution runs. `merge()` does that
    permanently (deploy form: `lk_origin` with a bias, no BN, no branches), as UniRepLKNet's
    `merge_dilated_branches()`; outputs are equal before and after in eval mode.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False, use_sync_bn: bool = False,
                 attempt_use_lk_impl: bool = True, branches: Optional[Sequence[tuple[int, int]]] = None,
                 device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        if branches is None:
            if kernel_size not in _BRANCHES:
                raise ValueError(f"DilatedReparamBlock: no default branches for kernel_size={kernel_size} "
                                 f"(known: {sorted(_BRANCHES)}); pass branches=[(k, dilation), ...]")
            branches = list(zip(*_BRANCHES[kernel_size]))
        for k, r in branches:
            span = r * (k - 1) + 1
            if span > kernel_size or (kernel_size - span) % 2:
                raise ValueError(f"DilatedReparamBlock: branch kernel {k} with dilation {r} spans {span}, which "
                                 f"does not centre inside kernel_size={kernel_size}")
        self.kernel_sizes = [k for k, _ in branches]
        self.dilates = [r for _, r in branches]
        self.attempt_use_lk_impl = attempt_use_lk_impl
        self.lk_origin = DepthwiseConv2d(channels, channels, kernel_size, 1, kernel_size // 2, 1, channels,
                                         bias=deploy, **f)
        if not deploy:
            bn = nn.SyncBatchNorm if use_sync_bn else nn.BatchNorm2d
            self.origin_bn = bn(channels, **f)
            for k, r in branches:
                setattr(self, f"dil_conv_k{k}_{r}", DepthwiseConv2d(channels, channels, k, 1, (r * (k - 1) + 1) // 2,
                                                                    r, channels, bias=False, **f))
                setattr(self, f"dil_bn_k{k}_{r}", bn(channels, **f))

    def _branches(self):
        for k, r in zip(self.kernel_sizes, self.dilates):
            yield r, getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")

    def merged_kernel(self) -> tuple[Tensor, Tensor]:
        """The one KxK depthwise kernel [C, 1, K, K] and bias [C] equal to the block in eval mode
        (differentiable in the parameters)."""
        if not hasattr(self, "origin_bn"):
            return self.lk_origin.weight, self.lk_origin.bias
        w, b = _fuse_bn(self.lk_origin.weight, self.lk_origin.bias, self.origin_bn)
        for r, conv, bn in self._branches():
            bw, bb = _fuse_bn(conv.weight, conv.bias, bn)
            w = _dilate_into(w, bw, r)
            b = b + bb
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        if not hasattr(self, "origin_bn"):  # merged (deploy) form
            return self.lk_origin(x)
        if not self.training:
            w, b = self.merged_kernel()
            return depthwise_conv2d(x, w.to(x.dtype), b.to(x.dtype), padding=self.lk_origin.padding)
        out = self.origin_bn(self.lk_origin(x))
        for _, conv, bn in self._branches():
            out = out + bn(conv(x))
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Re-parameterise in place into the deploy form (uses the BN running statistics, as in eval mode)."""
        if not hasattr(self, "origin_bn"):
            return
        w, b = self.merged_kernel()
        lk = self.lk_origin
        merged = DepthwiseConv2d(lk.in_channels, lk.out_channels, lk.kernel_size, 1, lk.padding, 1, lk.groups,
                                 bias=True, device=w.device, dtype=w.dtype)
        merged.weight.copy_(w)
        merged.bias.copy_(b)
        self.lk_origin = merged
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")

    merge_dilated_branches = merge  # UniRepLKNet's name, called by its UniRepLKNetBlock.reparameterize()


# ---------------------------------------------------------------------------------------------------------------
# accelerate rules

def _is_depthwise_conv2d(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels) and m.groups > 1


def _convert_conv(m: nn.Conv2d):
    if max(m.kernel_size) < 5:
        return f"kernel {m.kernel_size} is smaller than 5x5 (cuDNN is fast there)"
    if max(m.kernel_size) > MAX_K:
        return f"kernel {m.kernel_size} is larger than {MAX_K}x{MAX_K}"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only zeros)"
    return DepthwiseConv2d.from_conv2d(m)


def _is_unireplknet_block(m: nn.Module) -> bool:
    return (type(m).__name__ == "DilatedReparamBlock" and not isinstance(m, DilatedReparamBlock)
            and isinstance(getattr(m, "lk_origin", None), nn.Conv2d) and hasattr(m, "kernel_sizes"))


def _convert_block(m: nn.Module):
    k = m.lk_origin.kernel_size[0]
    if m.lk_origin.kernel_size[0] != m.lk_origin.kernel_size[1] or k > MAX_K:
        return f"lk_origin kernel {m.lk_origin.kernel_size} is not square or larger than {MAX_K}"
    new = DilatedReparamBlock(m.lk_origin.in_channels, k, deploy=not hasattr(m, "origin_bn"),
                              branches=list(zip(m.kernel_sizes, m.dilates)), device="meta")
    for name, child in m.named_children():
        setattr(new, name, DepthwiseConv2d.from_conv2d(child) if type(child) is nn.Conv2d else child)
    return new


patch.register("depthwise_conv2d", _is_depthwise_conv2d, _convert_conv)
patch.register("unireplknet_dilated_reparam_block", _is_unireplknet_block, _convert_block)


def examples(device):
    """Tiny (label, module, args) examples for generic compile / checkpoint / DDP tests."""
    x = torch.randn(2, 8, 9, 11, device=device)
    return [
        ("DepthwiseConv2d 7x7", DepthwiseConv2d(8, 8, 7, padding=3, groups=8).to(device), (x,)),
        ("DepthwiseConv2d 4x6 same, channels-last", DepthwiseConv2d(8, 8, (4, 6), padding="same").to(device),
         (x.contiguous(memory_format=torch.channels_last),)),
        ("DilatedReparamBlock k=7", DilatedReparamBlock(8, 7).to(device), (x,)),
    ]
