"""nn.Module wrappers: parameters named as in the modules they replace, so checkpoints load unchanged."""
from .attention import Attention, WindowAttention
from .depthwise_conv2d import DepthwiseConv2d, DilatedReparamBlock
from .dilated_conv1d import CausalConv1d, DilatedConv1d, TemporalConvNet
from .halo_attention import HaloAttention, RelPosEmbed
from .linear_attention import SimplifiedLinearAttention
from .retention import ManhattanSelfAttention, MultiScaleRetention
from .selective_scan import Mamba

__all__ = ["Attention", "CausalConv1d", "DepthwiseConv2d", "DilatedConv1d", "DilatedReparamBlock",
            "HaloAttention", "Mamba", "ManhattanSelfAttention", "MultiScaleRetention", "RelPosEmbed",
            "SimplifiedLinearAttention", "TemporalConvNet", "WindowAttention"]
