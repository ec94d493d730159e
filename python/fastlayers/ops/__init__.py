"""Public functional API: one function per op (validate -> custom op -> backend)."""
from .attention import attention
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step

__all__ = ["attention", "dilated_conv1d", "dilated_conv1d_step"]
