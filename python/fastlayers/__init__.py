"""fastlayers: Triton and CUDA kernels behind nn.Module wrappers for vision and sequence backbones."""
from . import nn, ops, reference
from ._backend import use_backend
from ._determinism import use_deterministic
from .ops import depthwise_conv2d, dilated_conv1d, dilated_conv1d_step
from .patch import AccelerateReport, accelerate

__version__ = "0.1.0"

__all__ = ["accelerate", "AccelerateReport", "depthwise_conv2d", "dilated_conv1d", "dilated_conv1d_step", "nn",
           "ops", "reference", "use_backend", "use_deterministic", "__version__"]
