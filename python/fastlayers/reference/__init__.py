"""Pure-PyTorch references (fp32 math): the test oracle, the benchmark baseline and the CPU fallback."""
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .halo_attention import halo_attention

__all__ = ["dilated_conv1d", "dilated_conv1d_step", "halo_attention"]
