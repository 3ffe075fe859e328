// CUDA kernels of the fused adaLN forward (_adaln_fwd; formula in csrc/ops.cpp).
//
// One thread block per row (grid-stride over rows), blockDim a multiple of 32 sized from C. Each thread
// owns chunks of VEC consecutive channels (chunk k covers channels [k * VEC, (k + 1) * VEC)); VEC is
// 16 bytes of x (4 floats, 8 halves) when every pointer and row stride allows 128-bit accesses, else 1.
//
// adaln_fwd_reg_kernel  keeps the row of r = x + gate * y in registers (16 values a thread, so
//                       rows up to 16384 channels, 8192 without 128-bit access); x, y, gate and the
//                       modulation are read once.
// adaln_fwd_stream_kernel  any C: recomputes r from global memory (L2) for each pass over the row.
//
// Statistics in fp32: a warp-shuffle + shared-memory block sum; layer norm takes the mean first and
// then sum((r - mean)^2) over the same values (two passes, no E[r^2] - mean^2 cancellation).
// Only light headers here (no torch): the bindings and checks live in adaln_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "adaln/adaln_params.h"

namespace i2v {
namespace adaln {
namespace {

constexpr int kMaxThreads = 1024;
// Chunks of VEC channels a thread of adaln_fwd_reg_kernel keeps in registers: 16 values for 128-bit
// chunks; 8 for scalar chunks, whose per-chunk addresses would otherwise spill under the 64-register
// cap of 1024-thread blocks.
template <int VEC>
constexpr int reg_iters() {
  return VEC == 1 ? 8 : 16 / VEC;
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one unit: one 128-bit access for 16 bytes; 32 bytes (8 floats of a
// float32 modulation next to 16-bit x) become two 128-bit accesses, since alignment stays 16.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* ptr, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* ptr, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = pk;
}

// Typed views of AdalnParams for one row: base pointers already offset to the row (null = absent).
template <typename scalar_t, typename mod_t>
struct Row {
  const scalar_t* x;
  const scalar_t* y;
  const mod_t* gate;
  const mod_t* shift;
  const mod_t* scale;
  scalar_t* out;
  scalar_t* residual;
};

template <typename scalar_t, typename mod_t>
__device__ __forceinline__ Row<scalar_t, mod_t> row_pointers(const AdalnParams& p, int64_t row) {
  int64_t off[kNumRowTensors];
  p.layout.offsets(row, off);
  Row<scalar_t, mod_t> r;
  r.x = static_cast<const scalar_t*>(p.x) + off[kX];
  r.y = p.y ? static_cast<const scalar_t*>(p.y) + off[kY] : nullptr;
  r.gate = p.gate ? static_cast<const mod_t*>(p.gate) + off[kGate] : nullptr;
  r.shift = p.shift ? static_cast<const mod_t*>(p.shift) + off[kShift] : nullptr;
  r.scale = p.scale ? static_cast<const mod_t*>(p.scale) + off[kScale] : nullptr;
  r.out = static_cast<scalar_t*>(p.out) + row * p.C;
  r.residual = p.residual ? static_cast<scalar_t*>(p.residual) + row * p.C : nullptr;
  return r;
}

// r = x + gate * y for channels [c, c + VEC).
template <typename scalar_t, typename mod_t, int VEC>
__device__ __forceinline__ void load_residual(const Row<scalar_t, mod_t>& rw, int64_t c, float (&r)[VEC]) {
  load_pack<scalar_t, VEC>(rw.x + c, r);
  if (rw.y != nullptr) {
    float yv[VEC];
    load_pack<scalar_t, VEC>(rw.y + c, yv);
    if (rw.gate != nullptr) {
      float g[VEC];
      load_pack<mod_t, VEC>(rw.gate + c, g);
#pragma unroll
      for (int i = 0; i < VEC; ++i) r[i] += g[i] * yv[i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) r[i] += yv[i];
    }
  }
}

// Stores residual (when produced) and, for norm == 0, out = r. Returns this chunk's contribution to
// the first statistic: sum(r) for layer norm, sum(r^2) for RMS norm.
template <typename scalar_t, typename mod_t, int VEC>
__device__ __forceinline__ float first_pass_chunk(const Row<scalar_t, mod_t>& rw, int norm, int64_t c,
                                                  const float (&r)[VEC]) {
  if (rw.residual != nullptr) store_pack<scalar_t, VEC>(rw.residual + c, r);
  float s = 0.f;
  if (norm == kNormNone) {
    store_pack<scalar_t, VEC>(rw.out + c, r);
  } else if (norm == kNormLayer) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += r[i];
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += r[i] * r[i];
  }
  return s;
}

template <int VEC>
__device__ __forceinline__ float sq_dev(const float (&r)[VEC], float mean) {
  float q = 0.f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float d = r[i] - mean;
    q += d * d;
  }
  return q;
}

// out = ((r - mean) * rstd * weight + bias) * (1 + scale) + shift for channels [c, c + VEC).
template <typename scalar_t, typename mod_t, int VEC>
__device__ __forceinline__ void store_out(const Row<scalar_t, mod_t>& rw, const mod_t* weight, const mod_t* bias,
                                          int64_t c, const float (&r)[VEC], float mean, float rstd) {
  float n[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) n[i] = (r[i] - mean) * rstd;
  float m[VEC];
  if (weight != nullptr) {
    load_pack<mod_t, VEC>(weight + c, m);
#pragma unroll
    for (int i = 0; i < VEC; ++i) n[i] *= m[i];
  }
  if (bias != nullptr) {
    load_pack<mod_t, VEC>(bias + c, m);
#pragma unroll
    for (int i = 0; i < VEC; ++i) n[i] += m[i];
  }
  if (rw.scale != nullptr) {
    load_pack<mod_t, VEC>(rw.scale + c, m);
#pragma unroll
    for (int i = 0; i < VEC; ++i) n[i] *= 1.f + m[i];
  }
  if (rw.shift != nullptr) {
    load_pack<mod_t, VEC>(rw.shift + c, m);
#pragma unroll
    for (int i = 0; i < VEC; ++i) n[i] += m[i];
  }
  store_pack<scalar_t, VEC>(rw.out + c, n);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread (all threads get bitwise the same value: the xor
// butterfly adds the same operands in every lane). blockDim.x must be a multiple of 32 and every
// thread of the block must call it. `red` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with `red`
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : 0.f;
  return warp_sum(v);
}

template <typename scalar_t, typename mod_t, int VEC, int ITERS>
__global__ void __launch_bounds__(kMaxThreads) adaln_fwd_reg_kernel(const AdalnParams p) {
  __shared__ float red[32];
  const int nchunks = static_cast<int>(p.C / VEC);  // <= kMaxThreads * ITERS (host check)
  const int norm = p.norm;
  const float inv_C = 1.f / static_cast<float>(p.C);
  const float eps = static_cast<float>(p.eps);
  const mod_t* weight = static_cast<const mod_t*>(p.weight);
  const mod_t* bias = static_cast<const mod_t*>(p.bias);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const Row<scalar_t, mod_t> rw = row_pointers<scalar_t, mod_t>(p, row);
    float r[ITERS][VEC];
    // All loads first: a store in between would keep the compiler from issuing the next chunk's loads
    // early (it cannot rule out aliasing).
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int k = threadIdx.x + it * blockDim.x;
      if (k < nchunks) load_residual<scalar_t, mod_t, VEC>(rw, static_cast<int64_t>(k) * VEC, r[it]);
    }
    float s = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int k = threadIdx.x + it * blockDim.x;
      if (k < nchunks) s += first_pass_chunk<scalar_t, mod_t, VEC>(rw, norm, static_cast<int64_t>(k) * VEC, r[it]);
    }
    if (norm == kNormNone) continue;  // uniform over the block

    float mean = 0.f;
    float rstd;
    if (norm == kNormLayer) {
      mean = block_sum(s, red) * inv_C;
      float q = 0.f;
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        if (static_cast<int>(threadIdx.x + it * blockDim.x) < nchunks) q += sq_dev<VEC>(r[it], mean);
      }
      rstd = rsqrtf(block_sum(q, red) * inv_C + eps);
    } else {
      const float ss = block_sum(s, red);
      rstd = rsqrtf(ss * inv_C + eps) + ss * 0.0f;  // + ss * 0: an infinity NaNs the row (docs/SEMANTICS.md)
    }

#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int k = threadIdx.x + it * blockDim.x;
      if (k < nchunks) {
        store_out<scalar_t, mod_t, VEC>(rw, weight, bias, static_cast<int64_t>(k) * VEC, r[it], mean, rstd);
      }
    }
  }
}

template <typename scalar_t, typename mod_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) adaln_fwd_stream_kernel(const AdalnParams p) {
  __shared__ float red[32];
  const int64_t nchunks = p.C / VEC;
  const int norm = p.norm;
  const float inv_C = 1.f / static_cast<float>(p.C);
  const float eps = static_cast<float>(p.eps);
  const mod_t* weight = static_cast<const mod_t*>(p.weight);
  const mod_t* bias = static_cast<const mod_t*>(p.bias);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const Row<scalar_t, mod_t> rw = row_pointers<scalar_t, mod_t>(p, row);
    float r[VEC];
    float s = 0.f;
    for (int64_t k = threadIdx.x; k < nchunks; k += blockDim.x) {
      load_residual<scalar_t, mod_t, VEC>(rw, k * VEC, r);
      s += first_pass_chunk<scalar_t, mod_t, VEC>(rw, norm, k * VEC, r);
    }
    if (norm == kNormNone) continue;  // uniform over the block

    float mean = 0.f;
    float rstd;
    if (norm == kNormLayer) {
      mean = block_sum(s, red) * inv_C;
      float q = 0.f;
      for (int64_t k = threadIdx.x; k < nchunks; k += blockDim.x) {
        load_residual<scalar_t, mod_t, VEC>(rw, k * VEC, r);
        q += sq_dev<VEC>(r, mean);
      }
      rstd = rsqrtf(block_sum(q, red) * inv_C + eps);
    } else {
      const float ss = block_sum(s, red);
      rstd = rsqrtf(ss * inv_C + eps) + ss * 0.0f;  // + ss * 0: an infinity NaNs the row (docs/SEMANTICS.md)
    }

    for (int64_t k = threadIdx.x; k < nchunks; k += blockDim.x) {
      load_residual<scalar_t, mod_t, VEC>(rw, k * VEC, r);
      store_out<scalar_t, mod_t, VEC>(rw, weight, bias, k * VEC, r, mean, rstd);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether 16-byte accesses are valid for every tensor at every row: C a multiple of VEC (so chunk
// offsets are multiples of 16 bytes in every tensor, x's and the modulation's element sizes alike),
// every base pointer 16-byte aligned and every coalesced row stride a multiple of 16 bytes.
bool can_vectorize(const AdalnParams& p, int vec, int x_size, int mod_size) {
  if (p.C % vec != 0) return false;
  const void* row_ptrs[kNumRowTensors] = {p.x, p.y, p.gate, p.shift, p.scale};
  const int sizes[kNumRowTensors] = {x_size, x_size, mod_size, mod_size, mod_size};
  for (int t = 0; t < kNumRowTensors; ++t) {
    if (row_ptrs[t] == nullptr) continue;
    if (!aligned16(row_ptrs[t])) return false;
    for (int d = 0; d < p.layout.ndim; ++d) {
      if ((p.layout.strides[t][d] * sizes[t]) % 16 != 0) return false;
    }
  }
  const void* flat_ptrs[] = {p.weight, p.bias, p.out, p.residual};
  for (const void* ptr : flat_ptrs) {
    if (ptr != nullptr && !aligned16(ptr)) return false;
  }
  return true;
}

template <typename scalar_t, typename mod_t, int VEC>
const char* launch(const AdalnParams& p, cudaStream_t stream) {
  constexpr int kIters = reg_iters<VEC>();
  const int64_t nchunks = p.C / VEC;
  const unsigned grid = static_cast<unsigned>(p.rows < INT_MAX ? p.rows : INT_MAX);
  if (nchunks <= static_cast<int64_t>(kMaxThreads) * kIters) {
    // Fewest warps that cover the row with kIters chunks a thread: more rows in flight per SM.
    const int64_t per_iter = (nchunks + kIters - 1) / kIters;
    const int threads = static_cast<int>((per_iter + 31) / 32 * 32);
    adaln_fwd_reg_kernel<scalar_t, mod_t, VEC, kIters><<<grid, threads, 0, stream>>>(p);
  } else {
    adaln_fwd_stream_kernel<scalar_t, mod_t, VEC><<<grid, kMaxThreads, 0, stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename scalar_t, typename mod_t>
const char* launch(const AdalnParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (can_vectorize(p, kVec, sizeof(scalar_t), sizeof(mod_t))) return launch<scalar_t, mod_t, kVec>(p, stream);
  return launch<scalar_t, mod_t, 1>(p, stream);
}

}  // namespace

const char* adaln_fwd_cuda(const AdalnParams& p, void* stream_ptr) {
  if (p.rows <= 0) return nullptr;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool mod_f32 = p.mod_dtype == DType::kFloat;
  switch (p.x_dtype) {
    case DType::kFloat: return launch<float, float>(p, stream);
    case DType::kHalf: return mod_f32 ? launch<__half, float>(p, stream) : launch<__half, __half>(p, stream);
    case DType::kBFloat16:
      return mod_f32 ? launch<__nv_bfloat16, float>(p, stream) : launch<__nv_bfloat16, __nv_bfloat16>(p, stream);
    default: return "_adaln_fwd: the CUDA kernel supports float32, float16 and bfloat16 inputs";
  }
}

}  // namespace adaln
}  // namespace i2v
