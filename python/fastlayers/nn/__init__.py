"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet
from .selective_scan import Mamba

__all__ = ["CausalConv1d", "DilatedConv1d", "Mamba", "TemporalConvNet"]
