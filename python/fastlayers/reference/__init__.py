"""Pure-PyTorch references (fp32 math): the test oracle, the benchmark baseline and the CPU fallback."""
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .selective_scan import selective_scan, selective_scan_step

__all__ = ["dilated_conv1d", "dilated_conv1d_step", "selective_scan", "selective_scan_step"]
