"""SparK's sparse encoder as modules: the mask context, SparseConv2d, sparse pooling, and sparsify / densify.

The mask is set once per forward (as SparK's encoder does with its class-level `_cur_active`):

    with fastlayers.nn.sparse_mask(mask):          # mask: [B, 1, h, w] bool, True = visible patch
        feats = model.forward_features(images)    # every sparse layer reads the mask from the context

Each module also takes `forward(x, mask=...)` to override the context. The context holds one SparseMask, so the
active-pixel table of each resolution is built once and shared by all the layers at that resolution.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..ops.sparse_conv2d import MaskLike, SparseMask, as_sparse_mask, sparse_conv2d

_STATE: dict = {"mask": None}


def set_sparse_mask(mask: Optional[MaskLike]) -> Optional[SparseMask]:
    """Set (or clear, with None) the mask every sparse module uses when called without `mask=`."""
    _STATE["mask"] = None if mask is None else as_sparse_mask(mask, "set_sparse_mask")
    return _STATE["mask"]


def get_sparse_mask() -> Optional[SparseMask]:
    return _STATE["mask"]


@contextlib.contextmanager
def sparse_mask(mask: MaskLike):
    """Context manager: the sparse modules called inside use `mask` ([B, 1, h, w] bool or a SparseMask)."""
    prev = _STATE["mask"]
    sm = set_sparse_mask(mask)
    try:
        yield sm
    finally:
        _STATE["mask"] = prev


def resolve_mask(mask: Optional[MaskLike], who: str) -> SparseMask:
    if mask is not None:
        return as_sparse_mask(mask, who)
    if _STATE["mask"] is None:
        raise RuntimeError(f"{who}: no sparse mask is set; call it inside `with fastlayers.nn.sparse_mask(mask):` "
                           "or pass mask=...")
    return _STATE["mask"]


class SparseConv2d(nn.Conv2d):
    """nn.Conv2d on the active pixels only (SparK's SparseConv2d): conv2d(x * m_in) * m_out, computed by
    fastlayers.sparse_conv2d. Same constructor and parameters as nn.Conv2d (it is one); padding_mode 'zeros'."""

    def forward(self, x: Tensor, mask: Optional[MaskLike] = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise NotImplementedError(f"SparseConv2d: padding_mode={self.padding_mode!r} is not supported")
        return sparse_conv2d(x, resolve_mask(mask, "SparseConv2d"), self.weight, self.bias, self.stride,
                             self.padding, self.dilation, self.groups)


def _masked_in(x: Tensor, sm: SparseMask) -> Tensor:
    return torch.where(sm.dense(x.shape[2], x.shape[3]), x, 0.0)


def _masked_out(y: Tensor, sm: SparseMask) -> Tensor:
    return torch.where(sm.dense(y.shape[2], y.shape[3]), y, 0.0)


class SparseMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d with SparK's masking: pool(x * m_in) * m_out (PyTorch ops; pooling is cheap)."""

    def forward(self, x: Tensor, mask: Optional[MaskLike] = None) -> Tensor:
        if self.return_indices:
            raise NotImplementedError("SparseMaxPool2d: return_indices=True is not supported")
        sm = resolve_mask(mask, "SparseMaxPool2d")
        return _masked_out(super().forward(_masked_in(x, sm)), sm)


class SparseAvgPool2d(nn.AvgPool2d):
    """nn.AvgPool2d with SparK's masking: pool(x * m_in) * m_out (inactive pixels count as zeros, as in SparK)."""

    def forward(self, x: Tensor, mask: Optional[MaskLike] = None) -> Tensor:
        sm = resolve_mask(mask, "SparseAvgPool2d")
        return _masked_out(super().forward(_masked_in(x, sm)), sm)


class SparsePixelwise(nn.Module):
    """A per-pixel module on channels-last maps [B, H, W, C] (ConvNeXt's Mlp) evaluated on the active pixels
    only and 0 elsewhere: SparK's `x *= active` after the block's MLP, without computing the masked rows.
    Made by sparsify() by switching the class of the original module (its parameters and names stay)."""

    def forward(self, x: Tensor, mask: Optional[MaskLike] = None) -> Tensor:
        sm = resolve_mask(mask, "SparsePixelwise")
        dense_forward = self._fastlayers_dense_type.forward
        B, H, W, Cn = x.shape
        if torch.compiler.is_compiling():  # no data-dependent row count in a traced graph
            return torch.where(sm.dense(H, W).reshape(B, H, W, 1), dense_forward(self, x), 0.0)
        idx = sm.table(H, W).rows[:sm.count(H, W)].long()
        out = dense_forward(self, x.reshape(B * H * W, Cn).index_select(0, idx))
        full = out.new_zeros((B * H * W,) + out.shape[1:]).index_copy(0, idx, out)
        return full.reshape((B, H, W) + out.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# sparsify / densify

_HEAD_NAMES = ("head", "fc", "classifier", "global_pool", "head_drop")


def _timm_type(m: nn.Module, name: str) -> bool:
    t = type(m)
    return t.__name__ == name and t.__module__.startswith("timm.")


def _sparse_type(m: nn.Module, parent: Optional[nn.Module], name: str):
    """(sparse class, extra attributes) for a module SparK sparsifies, or None."""
    from .sparse_norm2d import SparseBatchNorm2d, SparseLayerNorm2d
    t = type(m)
    if t is nn.Conv2d:
        if m.padding_mode != "zeros":
            raise NotImplementedError(f"sparsify: {name}: padding_mode={m.padding_mode!r} is not supported")
        return SparseConv2d, {}
    if t is nn.BatchNorm2d:
        return SparseBatchNorm2d, {}
    if t is nn.MaxPool2d:
        return SparseMaxPool2d, {}
    if t is nn.AvgPool2d:
        return SparseAvgPool2d, {}
    if _timm_type(m, "LayerNorm2d"):
        return SparseLayerNorm2d, {"channels_last": False}
    if t is nn.LayerNorm or _timm_type(m, "LayerNorm"):
        return SparseLayerNorm2d, {"channels_last": True}
    if parent is not None and _timm_type(parent, "ConvNeXtBlock") and name.rsplit(".", 1)[-1] == "mlp" \
            and not getattr(parent, "use_conv_mlp", True):
        return SparsePixelwise, {}
    return None


def sparsify(model: nn.Module, *, exclude: Iterable[str] = _HEAD_NAMES, verbose: bool = False) -> nn.Module:
    """Turn a timm ResNet or ConvNeXt into its SparK sparse encoder, in place, and return it.

    Like SparK's SparseEncoder.dense_model_to_sparse: every nn.Conv2d (stem, blocks, downsampling, 1x1
    shortcuts), nn.BatchNorm2d, nn.MaxPool2d / nn.AvgPool2d, timm LayerNorm2d and (channels-last) LayerNorm
    becomes its sparse twin, and each ConvNeXt block's Mlp runs on the active pixels only (SparK masks the MLP
    branch before the residual add). The modules keep their identity, parameters, buffers and state_dict names
    (their class is switched; densify switches it back). Top-level children named in `exclude` (the classifier
    head, which sees pooled features) are left dense. Use with `with fastlayers.nn.sparse_mask(mask):` around
    `model.forward_features(x)`; the input needs no masking (the stem conv ignores inactive pixels).
    """
    exclude = set(exclude)
    converted = []

    def visit(parent: nn.Module, prefix: str):
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if (not prefix and name in exclude) or "_fastlayers_dense_type" in child.__dict__:
                continue  # the head, or already sparse (sparsify twice is a no-op)
            spec = _sparse_type(child, parent, path)
            if spec is not None:
                cls, extra = spec
                dense = type(child)
                child.__class__ = cls
                child._fastlayers_dense_type = dense
                child._fastlayers_extra = tuple(extra)
                for k, v in extra.items():
                    setattr(child, k, v)
                converted.append((path, dense.__name__, cls.__name__))
                if cls is SparsePixelwise:
                    continue
            visit(child, path)

    visit(model, "")
    if verbose:
        print("\n".join(f"sparsify: {p}: {a} -> {b}" for p, a, b in converted) or "sparsify: nothing converted")
    return model


def densify(model: nn.Module) -> nn.Module:
    """Undo sparsify in place (for fine-tuning): every sparse module gets its original class back."""
    for m in model.modules():
        dense = m.__dict__.get("_fastlayers_dense_type")
        if dense is None:
            continue
        for k in m._fastlayers_extra:
            delattr(m, k)
        del m._fastlayers_dense_type, m._fastlayers_extra
        m.__class__ = dense
    return model


def examples(device) -> list:
    """Tiny (label, module, args) examples for generic module tests (the mask is passed explicitly)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 3, 3, generator=g) < 0.6).to(device)
    x = torch.randn(2, 8, 12, 12, generator=g).to(device)
    return [
        ("SparseConv2d 3x3", SparseConv2d(8, 16, 3, padding=1).to(device), (x, mask)),
        ("SparseConv2d depthwise 7x7", SparseConv2d(8, 8, 7, padding=3, groups=8).to(device), (x, mask)),
        ("SparseConv2d 2x2 stride 2", SparseConv2d(8, 16, 2, stride=2).to(device),
         (torch.randn(2, 8, 6, 6, generator=g).to(device), mask)),
    ]
