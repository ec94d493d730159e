"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet
from .sparse_conv2d import (SparseAvgPool2d, SparseConv2d, SparseMaxPool2d, SparsePixelwise, densify,
                            get_sparse_mask, set_sparse_mask, sparse_mask, sparsify)
from .sparse_norm2d import SparseBatchNorm2d, SparseLayerNorm2d

__all__ = ["CausalConv1d", "DilatedConv1d", "SparseAvgPool2d", "SparseBatchNorm2d", "SparseConv2d",
           "SparseLayerNorm2d", "SparseMaxPool2d", "SparsePixelwise", "TemporalConvNet", "densify",
           "get_sparse_mask", "set_sparse_mask", "sparse_mask", "sparsify"]
