"""Pure-PyTorch references (fp32 math): the test oracle, the benchmark baseline and the CPU fallback."""
from .dilated_conv1d import dilated_conv1d, dilated_conv1d_step
from .sparse_conv2d import masked, spark_dense_then_mask, sparse_conv2d, upsample_mask
from .sparse_norm2d import sparse_batch_norm2d, sparse_layer_norm2d

__all__ = ["dilated_conv1d", "dilated_conv1d_step", "masked", "sparse_batch_norm2d", "sparse_conv2d",
           "sparse_layer_norm2d", "spark_dense_then_mask", "upsample_mask"]
