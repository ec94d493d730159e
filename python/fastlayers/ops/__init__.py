"""Public functional API: one function per op (validate -> custom op -> backend)."""
from .attention import attention
from .depthwise_conv2d import depthwise_conv2d
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .halo_attention import halo_attention
from .selective_scan import selective_scan, selective_scan_step

__all__ = ["attention", "depthwise_conv2d", "dilated_conv1d", "dilated_conv1d_step", "halo_attention",
            "selective_scan", "selective_scan_step"]
