"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .attention import Attention, WindowAttention
from .depthwise_conv2d import DepthwiseConv2d, DilatedReparamBlock
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet
from .halo_attention import HaloAttention, RelPosEmbed
from .linear_attention import SimplifiedLinearAttention
from .retention import ManhattanSelfAttention, MultiScaleRetention
from .selective_scan import Mamba
from .sparse_conv2d import (SparseAvgPool2d, SparseConv2d, SparseMaxPool2d, SparsePixelwise, densify,
                            get_sparse_mask, set_sparse_mask, sparse_mask, sparsify)
from .sparse_norm2d import SparseBatchNorm2d, SparseLayerNorm2d

__all__ = ["Attention", "CausalConv1d", "DepthwiseConv2d", "DilatedConv1d", "DilatedReparamBlock",
            "HaloAttention", "Mamba", "ManhattanSelfAttention", "MultiScaleRetention", "RelPosEmbed",
            "SimplifiedLinearAttention", "SparseAvgPool2d", "SparseBatchNorm2d", "SparseConv2d",
            "SparseLayerNorm2d", "SparseMaxPool2d", "SparsePixelwise", "TemporalConvNet", "WindowAttention",
            "densify", "get_sparse_mask", "set_sparse_mask", "sparse_mask", "sparsify"]
