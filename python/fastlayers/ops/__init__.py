"""Public functional API: one function per op (validate -> custom op -> backend)."""
from .attention import attention
from .depthwise_conv2d import depthwise_conv2d
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .halo_attention import halo_attention
from .linear_attention import linear_attention, linear_attention_step
from .retention import retention, retention_step
from .selective_scan import selective_scan, selective_scan_step
from .sparse_conv2d import SparseMask, sparse_conv2d
from .sparse_norm2d import sparse_batch_norm2d, sparse_layer_norm2d

__all__ = ["SparseMask", "attention", "depthwise_conv2d", "dilated_conv1d", "dilated_conv1d_step",
            "halo_attention", "linear_attention", "linear_attention_step", "retention", "retention_step",
            "selective_scan", "selective_scan_step", "sparse_batch_norm2d", "sparse_conv2d", "sparse_layer_norm2d"]
