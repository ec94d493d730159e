"""Public functional API: one function per op (validate -> custom op -> backend)."""
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .linear_attention import linear_attention, linear_attention_step
from .retention import retention, retention_step

__all__ = ["dilated_conv1d", "dilated_conv1d_step", "linear_attention", "linear_attention_step", "retention",
           "retention_step"]
