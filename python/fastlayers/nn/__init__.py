"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .attention import Attention, WindowAttention
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet

__all__ = ["Attention", "CausalConv1d", "DilatedConv1d", "TemporalConvNet", "WindowAttention"]
