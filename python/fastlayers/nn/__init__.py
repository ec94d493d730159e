"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .depthwise_conv2d import DepthwiseConv2d, DilatedReparamBlock
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet

__all__ = ["CausalConv1d", "DepthwiseConv2d", "DilatedConv1d", "DilatedReparamBlock", "TemporalConvNet"]
