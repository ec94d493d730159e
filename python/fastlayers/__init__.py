"""fastlayers: Triton and CUDA kernels behind nn.Module wrappers for vision and sequence backbones."""
from . import nn, ops, reference
from ._backend import use_backend
from .ops import (dilated_conv1d, dilated_conv1d_step, linear_attention, linear_attention_step, retention,
                  retention_step)
from .patch import AccelerateReport, accelerate

__version__ = "0.1.0"

__all__ = ["accelerate", "AccelerateReport", "dilated_conv1d", "dilated_conv1d_step", "linear_attention",
           "linear_attention_step", "nn", "ops", "reference", "retention", "retention_step", "use_backend", "__version__"]
