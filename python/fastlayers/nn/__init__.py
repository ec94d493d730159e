"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet
from .halo_attention import HaloAttention, RelPosEmbed

__all__ = ["CausalConv1d", "DilatedConv1d", "HaloAttention", "RelPosEmbed", "TemporalConvNet"]
