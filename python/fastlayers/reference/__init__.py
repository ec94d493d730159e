"""Pure-PyTorch references (fp32 math): the test oracle, the benchmark baseline and the CPU fallback."""
from .attention import attention, decay_bias
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step

__all__ = ["attention", "decay_bias", "dilated_conv1d", "dilated_conv1d_step"]
