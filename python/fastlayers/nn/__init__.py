"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet
from .linear_attention import SimplifiedLinearAttention
from .retention import ManhattanSelfAttention, MultiScaleRetention

__all__ = ["CausalConv1d", "DilatedConv1d", "ManhattanSelfAttention", "MultiScaleRetention",
           "SimplifiedLinearAttention", "TemporalConvNet"]
