"""Public functional API: one function per op (validate -> custom op -> backend)."""
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .selective_scan import selective_scan, selective_scan_step

__all__ = ["dilated_conv1d", "dilated_conv1d_step", "selective_scan", "selective_scan_step"]
