// Mamba's selective scan, forward and backward; the CUDA twin of kernels/selective_scan.py (same arguments and
// results). Notation: u, delta, z, out: [B, D, L] contiguous; A: [D, N] fp32; B, C: fixed [D, N] fp32 or
// variable [B, G, N, L] in u's dtype; D, delta_bias: [D] fp32; states [B, D, N] fp32.
//
// The sequence is walked in chunks of kChunk = kThreads * kItems steps; thread i owns kItems consecutive steps
// of a chunk. For each state index n the recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t B_t
// u_t) is composed sequentially over a thread's items, then a block-wide scan of the (a, b) pairs (warp shuffles +
// one shared-memory step across warps) gives each thread the state before its first item; the carry between
// chunks is one float per n in shared memory. The forward stores the state at every chunk start ([B, D,
// n_chunks, N]); the backward walks the chunks in reverse, recomputes h inside a chunk from that state and runs
// the adjoint recurrence k_t = a_t (C_t dy_t + k_{t+1}) (k_t = dL/dh_{t-1}) as a reverse block scan.
// Backward blocks own a set of channels of one group and loop over them inside each chunk: sums over channels
// (variable dB, dC) go to the block's own partial slice, sums over time to per-(b, d) buffers, both summed in a
// fixed order afterwards: deterministic, no atomics. Padded steps (t >= L) get dt = 0 (a = 1, b = 0).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.cuh"

namespace fastlayers {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 8;
constexpr int kChunk = kThreads * kItems;  // 1024: CUDA_SEGMENT in python/fastlayers/ops/selective_scan.py
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

struct ScanArgs {
  int64_t B, D, L, N, G, H;  // H = D / G channels per group (G = 1 unless B or C is grouped)
  int n_chunks, kc;          // kc: channels per backward block
  bool var_b, var_c, softplus, has_z, vec;  // vec: 16-byte vector loads of the [.., L] rows are aligned
};

template <typename T>
struct Ptrs {
  const T *u, *delta, *z, *dout;
  const void *Bm, *Cm;  // T (variable) or float (fixed)
  const float *A, *D, *bias, *init, *chk;
  T *out, *du, *ddelta, *dz;
  float *last, *chk_out, *dinit, *dA, *dBf, *dCf, *dB_part, *dC_part, *dD, *dbias;
};

__device__ __forceinline__ float softplus_f(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

// kItems values of a row at times t0.., fp32, 0 at t >= L.
template <typename T>
__device__ __forceinline__ void load_items(const T* __restrict__ row, int64_t t0, int64_t L, bool vec,
                                           float (&v)[kItems]) {
  if (vec && t0 + kItems <= L) {
    alignas(16) T tmp[kItems];
    constexpr int kVecs = kItems * sizeof(T) / 16;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) reinterpret_cast<uint4*>(tmp)[j] = reinterpret_cast<const uint4*>(row + t0)[j];
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = to_f32(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = t0 + i < L ? to_f32(row[t0 + i]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_items(T* row, int64_t t0, int64_t L, bool vec, const float (&v)[kItems]) {
  if (vec && t0 + kItems <= L) {
    alignas(16) T tmp[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) tmp[i] = from_f32<T>(v[i]);
    constexpr int kVecs = kItems * sizeof(T) / 16;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) reinterpret_cast<uint4*>(row + t0)[j] = reinterpret_cast<const uint4*>(tmp)[j];
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (t0 + i < L) row[t0 + i] = from_f32<T>(v[i]);
  }
}

// B or C for state n at the thread's times: variable rows of [B, G, N, L], or the fixed value M[d, n].
template <typename T>
__device__ __forceinline__ void load_bc(const void* M, bool variable, int64_t bc_row, int64_t dn, int64_t t0,
                                        const ScanArgs& a, float (&v)[kItems]) {
  if (variable) {
    load_items(static_cast<const T*>(M) + bc_row, t0, a.L, a.vec, v);
  } else {
    const float f = static_cast<const float*>(M)[dn];
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = f;
  }
}

// Exclusive block scan of affine maps x -> a x + b in thread order: returns the composition of all earlier
// threads' maps (the first applied first). `buf` holds kWarps float2; callers alternate two buffers.
__device__ __forceinline__ float2 block_prefix(float a, float b, float2* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float ap = __shfl_up_sync(kFull, a, o), bp = __shfl_up_sync(kFull, b, o);
    if (lane >= o) {  // (ap, bp) first, then (a, b)
      b = a * bp + b;
      a = a * ap;
    }
  }
  if (lane == 31) buf[warp] = make_float2(a, b);
  float ea = __shfl_up_sync(kFull, a, 1), eb = __shfl_up_sync(kFull, b, 1);
  if (lane == 0) ea = 1.f, eb = 0.f;
  __syncthreads();
  float wa = 1.f, wb = 0.f;
  for (int w = 0; w < warp; ++w) {
    const float2 t = buf[w];
    wb = t.x * wb + t.y;
    wa = t.x * wa;
  }
  return make_float2(ea * wa, ea * wb + eb);
}

// Exclusive reverse block scan: the composition of all later threads' maps k -> a k + b, where a thread's map
// acts on the value coming from later times (the last thread's map applied first).
__device__ __forceinline__ float2 block_suffix(float a, float b, float2* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float an = __shfl_down_sync(kFull, a, o), bn = __shfl_down_sync(kFull, b, o);
    if (lane + o < 32) {  // (an, bn) first, then (a, b)
      b = a * bn + b;
      a = a * an;
    }
  }
  if (lane == 0) buf[warp] = make_float2(a, b);
  float ea = __shfl_down_sync(kFull, a, 1), eb = __shfl_down_sync(kFull, b, 1);
  if (lane == 31) ea = 1.f, eb = 0.f;
  __syncthreads();
  float sa = 1.f, sb = 0.f;
  for (int w = kWarps - 1; w > warp; --w) {
    const float2 t = buf[w];
    sb = t.x * sb + t.y;
    sa = t.x * sa;
  }
  return make_float2(ea * sa, ea * sb + eb);
}

// Sums of NV values over the block, in a fixed order (deterministic); every thread gets them. scratch: NV*kWarps.
template <int NV>
__device__ __forceinline__ void block_sums(float (&v)[NV], float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(kFull, v[k], o);
    if (lane == 0) scratch[k * kWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += scratch[k * kWarps + w];
    v[k] = s;
  }
  __syncthreads();  // scratch is free again
}

// ---------------------------------------------------------------------------------------------------------------
// forward: block (d, b)

template <typename T>
__global__ void __launch_bounds__(kThreads) selective_scan_fwd_kernel(Ptrs<T> p, ScanArgs a) {
  __shared__ float2 scan_buf[2][kWarps];
  extern __shared__ float carry[];  // [2][N]: the state at the current / next chunk start
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int64_t bd = b * a.D + d;
  const int64_t g = d / a.H;
  const T* u = p.u + bd * a.L;
  const T* delta = p.delta + bd * a.L;
  const float* A = p.A + d * a.N;
  const int64_t bc_row = (b * a.G + g) * a.N * a.L;
  for (int n = threadIdx.x; n < a.N; n += kThreads) carry[n] = p.init[bd * a.N + n];
  const float Dv = p.D[d], bias = p.bias[d];
  int par = 0;
  for (int c = 0; c < a.n_chunks; ++c) {
    const float* cin = carry + (c & 1) * a.N;
    float* cout = carry + ((c + 1) & 1) * a.N;
    __syncthreads();  // the previous chunk's carry is written
    for (int n = threadIdx.x; n < a.N; n += kThreads) p.chk_out[(bd * a.n_chunks + c) * a.N + n] = cin[n];
    const int64_t t0 = static_cast<int64_t>(c) * kChunk + threadIdx.x * kItems;
    float uv[kItems], dt[kItems], y[kItems];
    load_items(u, t0, a.L, a.vec, uv);
    load_items(delta, t0, a.L, a.vec, dt);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float x = dt[i] + bias;
      dt[i] = t0 + i < a.L ? (a.softplus ? softplus_f(x) : x) : 0.f;
      y[i] = Dv * uv[i];
    }
    for (int n = 0; n < a.N; ++n) {
      const float An = A[n];
      float Bv[kItems], Cv[kItems], ea[kItems], eb[kItems];
      load_bc<T>(p.Bm, a.var_b, bc_row + n * a.L, d * a.N + n, t0, a, Bv);
      load_bc<T>(p.Cm, a.var_c, bc_row + n * a.L, d * a.N + n, t0, a, Cv);
      float pa = 1.f, pb = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        ea[i] = __expf(dt[i] * An);
        eb[i] = dt[i] * uv[i] * Bv[i];
        pb = ea[i] * pb + eb[i];
        pa = ea[i] * pa;
      }
      const float2 pre = block_prefix(pa, pb, scan_buf[par]);
      par ^= 1;
      float h = pre.x * cin[n] + pre.y;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h = ea[i] * h + eb[i];
        y[i] += Cv[i] * h;
      }
      if (threadIdx.x == kThreads - 1) cout[n] = h;  // padded steps keep h: this is the state at the chunk end
    }
    if (a.has_z) {
      float zv[kItems];
      load_items(p.z + bd * a.L, t0, a.L, a.vec, zv);
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] *= zv[i] * sigmoid_f(zv[i]);
    }
    store_items(p.out + bd * a.L, t0, a.L, a.vec, y);
  }
  __syncthreads();
  const float* cfin = carry + (a.n_chunks & 1) * a.N;
  for (int n = threadIdx.x; n < a.N; n += kThreads) p.last[bd * a.N + n] = cfin[n];
}

// ---------------------------------------------------------------------------------------------------------------
// backward: block (channel block cb, group g, b) owns channels g*H + cb*kc + j, j < kc

template <typename T>
__global__ void __launch_bounds__(kThreads) selective_scan_bwd_kernel(Ptrs<T> p, ScanArgs a) {
  __shared__ float2 scan_buf[2][kWarps];
  __shared__ float red[3 * kWarps];
  const int64_t cb = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t j0 = cb * a.kc, j1 = j0 + a.kc < a.H ? j0 + a.kc : a.H;
  const int64_t bc_row = (b * a.G + g) * a.N * a.L;
  const int64_t part_row = ((cb * a.B + b) * a.G + g) * a.N * a.L;  // the block's slice of the partial sums
  int par = 0;
  for (int c = a.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = static_cast<int64_t>(c) * kChunk + threadIdx.x * kItems;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t d = g * a.H + j;
      const int64_t bd = b * a.D + d;
      const float Dv = p.D[d], bias = p.bias[d];
      float uv[kItems], dt[kItems], raw[kItems], dy[kItems], y[kItems], du[kItems], ddt[kItems];
      load_items(p.u + bd * a.L, t0, a.L, a.vec, uv);
      load_items(p.delta + bd * a.L, t0, a.L, a.vec, raw);
      load_items(p.dout + bd * a.L, t0, a.L, a.vec, dy);  // dout for now
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        raw[i] += bias;
        dt[i] = t0 + i < a.L ? (a.softplus ? softplus_f(raw[i]) : raw[i]) : 0.f;
        y[i] = Dv * uv[i];
        ddt[i] = 0.f;
      }
      float zv[kItems];
      if (a.has_z) {
        load_items(p.z + bd * a.L, t0, a.L, a.vec, zv);
#pragma unroll
        for (int i = 0; i < kItems; ++i) dy[i] *= zv[i] * sigmoid_f(zv[i]);  // dL/dy = dout * silu(z)
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) du[i] = Dv * dy[i];
      const float* A = p.A + d * a.N;
      for (int n = 0; n < a.N; ++n) {
        const float An = A[n];
        const int64_t dn = d * a.N + n, bdn = bd * a.N + n;
        float Bv[kItems], Cv[kItems], ea[kItems], hp[kItems];
        load_bc<T>(p.Bm, a.var_b, bc_row + n * a.L, dn, t0, a, Bv);
        load_bc<T>(p.Cm, a.var_c, bc_row + n * a.L, dn, t0, a, Cv);
        const float h_in = p.chk[(bd * a.n_chunks + c) * a.N + n];
        const float K = p.dinit[bdn];  // adjoint flowing into the chunk's end state (read before any rewrite)
        // recompute h inside the chunk
        float pa = 1.f, pb = 0.f;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          ea[i] = __expf(dt[i] * An);
          pb = ea[i] * pb + dt[i] * uv[i] * Bv[i];
          pa = ea[i] * pa;
        }
        const float2 pre = block_prefix(pa, pb, scan_buf[par]);
        par ^= 1;
        float h = pre.x * h_in + pre.y;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          hp[i] = h;  // h_{t-1}
          h = ea[i] * h + dt[i] * uv[i] * Bv[i];
          y[i] += Cv[i] * h;
        }
        // adjoint: k_t = a_t (C_t dy_t + k_{t+1}), composed over the thread's items from the last
        float ra = 1.f, rb = 0.f;
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          rb = ea[i] * (rb + Cv[i] * dy[i]);
          ra = ea[i] * ra;
        }
        const float2 suf = block_suffix(ra, rb, scan_buf[par]);
        par ^= 1;
        float knext = suf.x * K + suf.y;  // k after the thread's last item
        float sums[3] = {0.f, 0.f, 0.f};  // dA, fixed dB, fixed dC
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          const float gt = Cv[i] * dy[i] + knext;  // dL/dh_t
          const float k = ea[i] * gt;              // dL/dh_{t-1} through step t
          const float h_t = ea[i] * hp[i] + dt[i] * uv[i] * Bv[i];
          sums[0] += k * hp[i] * dt[i];
          ddt[i] += An * k * hp[i] + gt * Bv[i] * uv[i];
          du[i] += gt * dt[i] * Bv[i];
          const float dBt = gt * dt[i] * uv[i], dCt = dy[i] * h_t;
          const int64_t t = t0 + i;
          if (a.var_b) {
            if (t < a.L) {
              float* q = p.dB_part + part_row + n * a.L + t;
              *q = j == j0 ? dBt : *q + dBt;
            }
          } else {
            sums[1] += dBt;
          }
          if (a.var_c) {
            if (t < a.L) {
              float* q = p.dC_part + part_row + n * a.L + t;
              *q = j == j0 ? dCt : *q + dCt;
            }
          } else {
            sums[2] += dCt;
          }
          knext = k;
        }
        if (threadIdx.x == 0) p.dinit[bdn] = knext;  // into the state before the chunk
        block_sums(sums, red);
        if (threadIdx.x == 0) {
          p.dA[bdn] += sums[0];
          if (!a.var_b) p.dBf[bdn] += sums[1];
          if (!a.var_c) p.dCf[bdn] += sums[2];
        }
      }
      float sums[2] = {0.f, 0.f};  // D, delta_bias
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool ok = t0 + i < a.L;
        sums[0] += dy[i] * uv[i];
        if (a.softplus) ddt[i] *= sigmoid_f(raw[i]);
        ddt[i] = ok ? ddt[i] : 0.f;
        sums[1] += ddt[i];
      }
      store_items(p.du + bd * a.L, t0, a.L, a.vec, du);
      store_items(p.ddelta + bd * a.L, t0, a.L, a.vec, ddt);
      if (a.has_z) {
        float dz[kItems], dout[kItems];
        load_items(p.dout + bd * a.L, t0, a.L, a.vec, dout);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const float s = sigmoid_f(zv[i]);
          dz[i] = dout[i] * y[i] * (s + zv[i] * s * (1.f - s));
        }
        store_items(p.dz + bd * a.L, t0, a.L, a.vec, dz);
      }
      block_sums(sums, red);
      if (threadIdx.x == 0) {
        p.dD[bd] += sums[0];
        p.dbias[bd] += sums[1];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// host

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
                  const at::Tensor& Cm, const at::Tensor& D, const std::optional<at::Tensor>& z,
                  const at::Tensor& bias) {
  for (auto* t : {&u, &delta, &A, &Bm, &Cm, &D, &bias}) {
    check_cuda(*t, "every tensor");
    FL_CHECK(t->is_contiguous(), "every tensor must be contiguous");
  }
  FL_CHECK(u.dim() == 3 && delta.sizes() == u.sizes() && delta.scalar_type() == u.scalar_type(),
           "u and delta must be [B, D, L] of one dtype");
  FL_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.scalar_type() == at::kFloat, "A must be [D, N] fp32");
  FL_CHECK(D.dim() == 1 && D.size(0) == u.size(1) && D.scalar_type() == at::kFloat, "D must be [D] fp32");
  FL_CHECK(bias.dim() == 1 && bias.size(0) == u.size(1) && bias.scalar_type() == at::kFloat,
           "delta_bias must be [D] fp32");
  int64_t G = 0;
  for (auto* M : {&Bm, &Cm}) {
    if (M->dim() == 2) {
      FL_CHECK(M->size(0) == u.size(1) && M->size(1) == A.size(1) && M->scalar_type() == at::kFloat,
               "fixed B/C must be [D, N] fp32");
    } else {
      FL_CHECK(M->dim() == 4 && M->size(0) == u.size(0) && M->size(2) == A.size(1) && M->size(3) == u.size(2) &&
                   M->scalar_type() == u.scalar_type(), "variable B/C must be [B, G, N, L] of u's dtype");
      FL_CHECK(G == 0 || G == M->size(1), "variable B and C must have one group count");
      G = M->size(1);
      FL_CHECK(G >= 1 && u.size(1) % G == 0, "the group count must divide D");
    }
  }
  if (z.has_value()) {
    check_cuda(*z, "z");
    FL_CHECK(z->is_contiguous() && z->sizes() == u.sizes() && z->scalar_type() == u.scalar_type(),
             "z must be contiguous and shaped and typed like u");
  }
  FL_CHECK(u.size(0) <= 65535, "B must be <= 65535");
}

template <typename T>
Ptrs<T> make_ptrs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
                  const at::Tensor& Cm, const at::Tensor& D, const std::optional<at::Tensor>& z,
                  const at::Tensor& bias) {
  Ptrs<T> p{};
  p.u = u.data_ptr<T>();
  p.delta = delta.data_ptr<T>();
  p.z = z.has_value() ? z->data_ptr<T>() : nullptr;
  p.Bm = Bm.data_ptr();
  p.Cm = Cm.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = D.data_ptr<float>();
  p.bias = bias.data_ptr<float>();
  return p;
}

ScanArgs make_args(const at::Tensor& u, const at::Tensor& A, const at::Tensor& Bm, const at::Tensor& Cm,
                   const std::optional<at::Tensor>& z, bool softplus) {
  ScanArgs a{};
  a.B = u.size(0);
  a.D = u.size(1);
  a.L = u.size(2);
  a.N = A.size(1);
  a.var_b = Bm.dim() == 4;
  a.var_c = Cm.dim() == 4;
  a.G = a.var_b ? Bm.size(1) : a.var_c ? Cm.size(1) : 1;
  a.H = a.D / a.G;
  a.n_chunks = static_cast<int>(std::max<int64_t>(1, (a.L + kChunk - 1) / kChunk));
  a.softplus = softplus;
  a.has_z = z.has_value();
  // rows start 16-byte aligned when L is a multiple of 16 elements and every [.., L] tensor is aligned
  a.vec = a.L % 16 == 0 && aligned16(u.data_ptr()) && (!a.has_z || aligned16(z->data_ptr())) &&
          (!a.var_b || aligned16(Bm.data_ptr())) && (!a.var_c || aligned16(Cm.data_ptr()));
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm, const at::Tensor& Cm,
    const at::Tensor& D, const std::optional<at::Tensor>& z, const at::Tensor& delta_bias,
    const at::Tensor& initial_state, bool delta_softplus) {
  check_inputs(u, delta, A, Bm, Cm, D, z, delta_bias);
  c10::cuda::CUDAGuard guard(u.device());
  ScanArgs a = make_args(u, A, Bm, Cm, z, delta_softplus);
  a.vec = a.vec && aligned16(delta.data_ptr());
  FL_CHECK(initial_state.is_contiguous() && initial_state.scalar_type() == at::kFloat && initial_state.dim() == 3 &&
               initial_state.size(0) == a.B && initial_state.size(1) == a.D && initial_state.size(2) == a.N,
           "initial_state must be a contiguous [B, D, N] fp32 tensor");
  auto f32 = u.options().dtype(at::kFloat);
  auto out = at::empty(u.sizes(), u.options());
  auto last = at::empty({a.B, a.D, a.N}, f32);
  auto chk = at::empty({a.B, a.D, a.n_chunks, a.N}, f32);
  if (a.B * a.D == 0) return {out, last, chk};
  const dim3 grid(static_cast<unsigned>(a.D), static_cast<unsigned>(a.B));
  const size_t smem = 2 * a.N * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FL_DISPATCH_FLOAT_HALF_BF16(u.scalar_type(), "selective_scan_fwd_cuda", [&] {
    Ptrs<scalar_t> p = make_ptrs<scalar_t>(u, delta, A, Bm, Cm, D, z, delta_bias);
    p.init = initial_state.data_ptr<float>();
    p.out = out.data_ptr<scalar_t>();
    p.last = last.data_ptr<float>();
    p.chk_out = chk.data_ptr<float>();
    selective_scan_fwd_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(p, a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, last, chk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
                        const at::Tensor& Cm, const at::Tensor& D, const std::optional<at::Tensor>& z,
                        const at::Tensor& delta_bias, const at::Tensor& chk, const at::Tensor& dout,
                        const at::Tensor& dlast, bool delta_softplus) {
  check_inputs(u, delta, A, Bm, Cm, D, z, delta_bias);
  c10::cuda::CUDAGuard guard(u.device());
  ScanArgs a = make_args(u, A, Bm, Cm, z, delta_softplus);
  FL_CHECK(dout.is_contiguous() && dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(),
           "dout must be contiguous and shaped and typed like u");
  FL_CHECK(chk.is_contiguous() && chk.scalar_type() == at::kFloat && chk.dim() == 4 && chk.size(0) == a.B &&
               chk.size(1) == a.D && chk.size(2) == a.n_chunks && chk.size(3) == a.N,
           "the stored states must be [B, D, ceil(L / ", kChunk, "), N] fp32 from selective_scan_fwd_cuda");
  FL_CHECK(dlast.is_contiguous() && dlast.scalar_type() == at::kFloat && dlast.dim() == 3 && dlast.size(0) == a.B &&
               dlast.size(1) == a.D && dlast.size(2) == a.N, "dlast must be a contiguous [B, D, N] fp32 tensor");
  a.vec = a.vec && aligned16(delta.data_ptr()) && aligned16(dout.data_ptr());
  auto f32 = u.options().dtype(at::kFloat);
  auto du = at::empty(u.sizes(), u.options());
  auto ddelta = at::empty(u.sizes(), u.options());
  auto dz = z.has_value() ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  auto dinit = dlast.clone();  // the kernel walks the adjoint carry back through time in place
  auto dA = at::zeros({a.B, a.D, a.N}, f32);
  auto dBf = at::zeros({a.var_b ? 0 : a.B, a.D, a.N}, f32);
  auto dCf = at::zeros({a.var_c ? 0 : a.B, a.D, a.N}, f32);
  auto dD = at::zeros({a.B, a.D}, f32);
  auto dbias = at::zeros({a.B, a.D}, f32);
  // channels per block: about 8 blocks per SM, but at most 128 partial slices of variable dB/dC (and 1 GiB)
  int dev = u.get_device(), sms = 132;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t bg = std::max<int64_t>(1, a.B * a.G);
  int64_t n_cblk = std::min<int64_t>(std::max<int64_t>(1, a.H), (8 * sms + bg - 1) / bg);
  if (a.var_b || a.var_c) {
    const int64_t slice = std::max<int64_t>(1, bg * a.N * a.L * 4 * ((a.var_b ? 1 : 0) + (a.var_c ? 1 : 0)));
    n_cblk = std::max<int64_t>(1, std::min<int64_t>({n_cblk, 128, (int64_t{1} << 30) / slice}));
  }
  a.kc = static_cast<int>((std::max<int64_t>(1, a.H) + n_cblk - 1) / n_cblk);
  n_cblk = (a.H + a.kc - 1) / a.kc;
  auto dB_part = at::empty({a.var_b ? n_cblk : 0, a.B, a.G, a.N, a.L}, f32);
  auto dC_part = at::empty({a.var_c ? n_cblk : 0, a.B, a.G, a.N, a.L}, f32);
  if (a.B * a.D > 0) {
    FL_CHECK(a.G <= 65535, "G must be <= 65535");
    const dim3 grid(static_cast<unsigned>(n_cblk), static_cast<unsigned>(a.G), static_cast<unsigned>(a.B));
    auto stream = c10::cuda::getCurrentCUDAStream();
    FL_DISPATCH_FLOAT_HALF_BF16(u.scalar_type(), "selective_scan_bwd_cuda", [&] {
      Ptrs<scalar_t> p = make_ptrs<scalar_t>(u, delta, A, Bm, Cm, D, z, delta_bias);
      p.dout = dout.data_ptr<scalar_t>();
      p.chk = chk.data_ptr<float>();
      p.du = du.data_ptr<scalar_t>();
      p.ddelta = ddelta.data_ptr<scalar_t>();
      p.dz = z.has_value() ? dz.data_ptr<scalar_t>() : nullptr;
      p.dinit = dinit.data_ptr<float>();
      p.dA = dA.data_ptr<float>();
      p.dBf = dBf.data_ptr<float>();
      p.dCf = dCf.data_ptr<float>();
      p.dB_part = dB_part.data_ptr<float>();
      p.dC_part = dC_part.data_ptr<float>();
      p.dD = dD.data_ptr<float>();
      p.dbias = dbias.data_ptr<float>();
      selective_scan_bwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p, a);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // fixed-order reductions over batch / partial slices: bit-reproducible
  auto dB = a.var_b ? at::sum(dB_part, {0}) : at::sum(dBf, {0});
  auto dC = a.var_c ? at::sum(dC_part, {0}) : at::sum(dCf, {0});
  return {du, ddelta, dz, at::sum(dA, {0}), dB, dC, at::sum(dD, {0}), at::sum(dbias, {0}), dinit};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlayers, m) {
  m.def("selective_scan_fwd_cuda(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor? z, "
        "Tensor delta_bias, Tensor initial_state, bool delta_softplus) -> (Tensor, Tensor, Tensor)");
  m.def("selective_scan_bwd_cuda(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor? z, "
        "Tensor delta_bias, Tensor chk, Tensor dout, Tensor dlast, bool delta_softplus) -> (Tensor, Tensor, "
        "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("selective_scan_fwd_cuda", &selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd_cuda", &selective_scan_bwd_cuda);
}

}  // namespace fastlayers
