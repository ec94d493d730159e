"""fastlayers: Triton and CUDA kernels behind nn.Module wrappers for vision and sequence backbones."""
from . import nn, ops, reference
from ._backend import use_backend
from ._determinism import use_deterministic
from .nn import densify, sparsify
from .ops import (SparseMask, attention, depthwise_conv2d, dilated_conv1d, dilated_conv1d_step, halo_attention,
                  linear_attention, linear_attention_step, retention, retention_step, selective_scan,
                  selective_scan_step, sparse_batch_norm2d, sparse_conv2d, sparse_layer_norm2d)
from .patch import AccelerateReport, accelerate

__version__ = "0.1.0"

__all__ = ["AccelerateReport", "SparseMask", "__version__", "accelerate", "attention", "densify",
            "depthwise_conv2d", "dilated_conv1d", "dilated_conv1d_step", "halo_attention", "linear_attention",
            "linear_attention_step", "nn", "ops", "reference", "retention", "retention_step", "selective_scan",
            "selective_scan_step", "sparse_batch_norm2d", "sparse_conv2d", "sparse_layer_norm2d", "sparsify",
            "use_backend", "use_deterministic"]
