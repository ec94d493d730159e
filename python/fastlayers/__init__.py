"""fastlayers: Triton and CUDA kernels behind nn.Module wrappers for vision and sequence backbones."""
from . import nn, ops, reference
from ._backend import use_backend
from .nn.sparse_conv2d import densify, sparsify
from .ops import (SparseMask, dilated_conv1d, dilated_conv1d_step, sparse_batch_norm2d, sparse_conv2d,
                  sparse_layer_norm2d)
from .patch import AccelerateReport, accelerate

__version__ = "0.1.0"

__all__ = ["accelerate", "AccelerateReport", "densify", "dilated_conv1d", "dilated_conv1d_step", "nn", "ops",
           "reference", "SparseMask", "sparse_batch_norm2d", "sparse_conv2d", "sparse_layer_norm2d", "sparsify",
           "use_backend", "__version__"]
