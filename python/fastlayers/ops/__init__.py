"""Public functional API: one function per op (validate -> custom op -> backend)."""
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .sparse_conv2d import SparseMask, sparse_conv2d
from .sparse_norm2d import sparse_batch_norm2d, sparse_layer_norm2d

__all__ = ["SparseMask", "dilated_conv1d", "dilated_conv1d_step", "sparse_batch_norm2d", "sparse_conv2d",
           "sparse_layer_norm2d"]
