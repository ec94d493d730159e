// Shared helpers for fastlayers CUDA kernels: checks, dtype conversion, block reductions.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

namespace fastlayers {

#define FL_CHECK(cond, ...) TORCH_CHECK(cond, "fastlayers: ", __VA_ARGS__)

inline void check_cuda(const at::Tensor& t, const char* name) {
  FL_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

template <typename T> __device__ __forceinline__ float to_f32(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v) { return static_cast<T>(v); }

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// AT_DISPATCH over fp32, fp16 and bf16 only (no fp64 instantiation: fewer kernels to compile).
#define FL_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)           \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)                   \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace fastlayers
