// Depthwise dilated 1-D convolution, channels-first [B, C, L], fp32 accumulation; the CUDA twin of
// kernels/dilated_conv1d.py (same arguments and results). Output time t reads input time t + k*dil - pad;
// negative times read init [B, C, S] (S = (K-1)*dil) when given, else zeros.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.cuh"

namespace fastlayers {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;                      // outputs per thread, strided by kThreads (coalesced)
constexpr int kTile = kThreads * kItems;
constexpr int kMaxK = 32;

struct Conv1dArgs {
  int64_t C, L, S;
  int K, dil, pad;
};

// x sequence value at time t of row (b, c): x for 0 <= t < L, init for -S <= t < 0, else 0.
template <typename T>
__device__ __forceinline__ float seq_at(const T* __restrict__ xrow, const T* __restrict__ irow, int64_t t,
                                        const Conv1dArgs& a) {
  if (t >= 0 && t < a.L) return to_f32(xrow[t]);
  if (irow != nullptr && t < 0 && t >= -a.S) return to_f32(irow[a.S + t]);
  return 0.f;
}

// grid: (B*C, tiles). silu: apply SiLU. dy != nullptr: write dy * silu'(pre) as fp32 to out_f32 instead of y.
template <typename T>
__global__ void __launch_bounds__(kThreads) dilated_conv1d_fwd_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, const T* __restrict__ init,
    const T* __restrict__ dy, T* __restrict__ y, float* __restrict__ out_f32, Conv1dArgs a, bool silu) {
  __shared__ float ws[kMaxK];
  const int64_t row = blockIdx.x;  // b * C + c
  const int64_t c = row % a.C;
  if (threadIdx.x < a.K) ws[threadIdx.x] = to_f32(w[c * a.K + threadIdx.x]);
  __syncthreads();
  const float b0 = bias != nullptr ? to_f32(bias[c]) : 0.f;
  const T* xrow = x + row * a.L;
  const T* irow = init != nullptr ? init + row * a.S : nullptr;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t t = t0 + j * kThreads;
    if (t >= a.L) break;
    float acc = b0;
    for (int k = 0; k < a.K; ++k) acc += ws[k] * seq_at(xrow, irow, t + k * a.dil - a.pad, a);
    if (silu) {
      const float s = 1.f / (1.f + __expf(-acc));
      if (dy != nullptr) {
        out_f32[row * a.L + t] = to_f32(dy[row * a.L + t]) * (s + acc * s * (1.f - s));
        continue;
      }
      acc *= s;
    }
    y[row * a.L + t] = from_f32<T>(acc);
  }
}

// grid: (B*C, tiles + init_tiles). Tiles < n_tiles: dx over their times and partial dw [B*C, n_tiles, K],
// db [B*C, n_tiles]; later tiles: d(init). g is dL/d(pre-activation), fp32 or T.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) dilated_conv1d_bwd_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ init, const G* __restrict__ g,
    T* __restrict__ dx, T* __restrict__ dinit, float* __restrict__ dw_part, float* __restrict__ db_part,
    Conv1dArgs a, int n_tiles) {
  __shared__ float ws[kMaxK];
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t c = row % a.C;
  if (threadIdx.x < a.K) ws[threadIdx.x] = to_f32(w[c * a.K + threadIdx.x]);
  __syncthreads();
  const T* xrow = x + row * a.L;
  const T* irow = init != nullptr ? init + row * a.S : nullptr;
  const G* grow = g + row * a.L;
  auto dseq = [&](int64_t s) {  // d(sequence)[s] = sum_k w[k] g[s - k*dil + pad]
    float acc = 0.f;
    for (int k = 0; k < a.K; ++k) {
      const int64_t t = s - k * a.dil + a.pad;
      if (t >= 0 && t < a.L) acc += ws[k] * to_f32(grow[t]);
    }
    return acc;
  };
  const int tile = blockIdx.y;
  if (tile >= n_tiles) {  // d(init): times -S .. -1
    const int64_t j0 = static_cast<int64_t>(tile - n_tiles) * kTile + threadIdx.x;
    for (int j = 0; j < kItems; ++j) {
      const int64_t idx = j0 + j * kThreads;
      if (idx < a.S) dinit[row * a.S + idx] = from_f32<T>(dseq(idx - a.S));
    }
    return;
  }
  const int64_t t0 = static_cast<int64_t>(tile) * kTile + threadIdx.x;
  float gv[kItems];
  float db = 0.f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t t = t0 + j * kThreads;
    gv[j] = t < a.L ? to_f32(grow[t]) : 0.f;
    db += gv[j];
    if (t < a.L) dx[row * a.L + t] = from_f32<T>(dseq(t));
  }
  const int64_t part = row * n_tiles + tile;
  db = block_sum(db, scratch);
  if (threadIdx.x == 0) db_part[part] = db;
  for (int k = 0; k < a.K; ++k) {
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = t0 + j * kThreads;
      if (t < a.L) acc += gv[j] * seq_at(xrow, irow, t + k * a.dil - a.pad, a);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) dw_part[part * a.K + k] = acc;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& init,
                  int64_t dilation) {
  check_cuda(x, "x");
  check_cuda(weight, "weight");
  FL_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be a contiguous [B, C, L] tensor");
  FL_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.is_contiguous(),
           "weight must be a contiguous [C, K] tensor");
  FL_CHECK(weight.size(1) >= 1 && weight.size(1) <= kMaxK, "K must be in [1, 32]");
  FL_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype");
  FL_CHECK(dilation >= 1, "dilation must be >= 1");
  if (init.has_value()) {
    const int64_t S = (weight.size(1) - 1) * dilation;
    FL_CHECK(init->is_contiguous() && init->dim() == 3 && init->size(0) == x.size(0) &&
                 init->size(1) == x.size(1) && init->size(2) == S && init->scalar_type() == x.scalar_type(),
             "initial_state must be a contiguous [B, C, (K-1)*dilation] tensor of x's dtype");
  }
  FL_CHECK(x.size(0) * x.size(1) <= INT32_MAX, "B*C too large");
}

Conv1dArgs make_args(const at::Tensor& x, const at::Tensor& weight, int64_t dilation, int64_t pad) {
  Conv1dArgs a;
  a.C = x.size(1);
  a.L = x.size(2);
  a.K = static_cast<int>(weight.size(1));
  a.dil = static_cast<int>(dilation);
  a.pad = static_cast<int>(pad);
  a.S = static_cast<int64_t>(a.K - 1) * dilation;
  return a;
}

at::Tensor dilated_conv1d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& init,
                                   int64_t dilation, int64_t pad, bool silu, const std::optional<at::Tensor>& dy) {
  check_inputs(x, weight, init, dilation);
  const bool grad = dy.has_value();
  FL_CHECK(!grad || silu, "dy is only used with silu");
  if (grad) FL_CHECK(dy->is_contiguous() && dy->sizes() == x.sizes(), "dy must be contiguous and x-shaped");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = grad ? at::empty(x.sizes(), x.options().dtype(at::kFloat)) : at::empty_like(x);
  if (x.numel() == 0) return out;
  const Conv1dArgs a = make_args(x, weight, dilation, pad);
  const bool has_init = init.has_value() && a.S > 0;
  FL_CHECK((a.L + kTile - 1) / kTile <= 65535, "L too long for the CUDA kernel's grid (use backend='triton')");
  const dim3 grid(static_cast<unsigned>(x.size(0) * x.size(1)), static_cast<unsigned>((a.L + kTile - 1) / kTile));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dilated_conv1d_fwd_cuda", [&] {
    dilated_conv1d_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
        has_init ? init->data_ptr<scalar_t>() : nullptr, grad ? dy->data_ptr<scalar_t>() : nullptr,
        grad ? nullptr : out.data_ptr<scalar_t>(), grad ? out.data_ptr<float>() : nullptr, a, silu);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dilated_conv1d_bwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& init, const at::Tensor& g,
    int64_t dilation, int64_t pad) {
  check_inputs(x, weight, init, dilation);
  FL_CHECK(g.is_contiguous() && g.sizes() == x.sizes(), "g must be contiguous and x-shaped");
  FL_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == x.scalar_type(), "g must be fp32 or x's dtype");
  c10::cuda::CUDAGuard guard(x.device());
  const Conv1dArgs a = make_args(x, weight, dilation, pad);
  const bool has_init = init.has_value() && a.S > 0;
  const int64_t B = x.size(0), C = x.size(1);
  auto dx = at::empty_like(x);
  auto dinit = has_init ? at::empty_like(*init) : at::empty({0}, x.options());
  FL_CHECK((a.L + kTile - 1) / kTile + (a.S + kTile - 1) / kTile <= 65535,
           "L too long for the CUDA kernel's grid (use backend='triton')");
  const int n_tiles = static_cast<int>((a.L + kTile - 1) / kTile);
  const int n_init = has_init ? static_cast<int>((a.S + kTile - 1) / kTile) : 0;
  auto fopts = x.options().dtype(at::kFloat);
  if (B * C == 0 || n_tiles + n_init == 0) {
    if (has_init) dinit.zero_();
    return {dx, at::zeros({C, a.K}, fopts), at::zeros({C}, fopts), dinit};
  }
  auto dw_part = at::empty({B, C, n_tiles, a.K}, fopts);
  auto db_part = at::empty({B, C, n_tiles}, fopts);
  const dim3 grid(static_cast<unsigned>(B * C), static_cast<unsigned>(n_tiles + n_init));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dilated_conv1d_bwd_cuda", [&] {
    auto launch = [&](auto* gptr) {
      using G = std::remove_const_t<std::remove_pointer_t<decltype(gptr)>>;
      dilated_conv1d_bwd_kernel<scalar_t, G><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), has_init ? init->data_ptr<scalar_t>() : nullptr,
          gptr, dx.data_ptr<scalar_t>(), has_init ? dinit.data_ptr<scalar_t>() : nullptr,
          dw_part.data_ptr<float>(), db_part.data_ptr<float>(), a, n_tiles);
    };
    if (g.scalar_type() == at::kFloat) launch(g.data_ptr<float>());
    else launch(g.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // fixed-order reductions: bit-reproducible gradients
  return {dx, at::sum(dw_part, {0, 2}), at::sum(db_part, {0, 2}), dinit};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlayers, m) {
  m.def("dilated_conv1d_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, int dilation, "
        "int pad, bool silu, Tensor? dy) -> Tensor");
  m.def("dilated_conv1d_bwd_cuda(Tensor x, Tensor weight, Tensor? initial_state, Tensor g, int dilation, "
        "int pad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("dilated_conv1d_fwd_cuda", &dilated_conv1d_fwd_cuda);
  m.impl("dilated_conv1d_bwd_cuda", &dilated_conv1d_bwd_cuda);
}

}  // namespace fastlayers
