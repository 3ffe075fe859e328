// CUDA kernel of _qk_norm_rope_fwd (formula and the shared row routine in qk_norm_rope_params.h).
//
// A group of G lanes (a power of two up to 32, within one warp) takes one row of q and the same row of
// k, which share the RoPE table row: loaded once, used twice. Each lane holds up to kLaneValues values
// of each tensor (ITERS units of VEC elements, one 16-byte access each when D, the strides and the
// pointers allow, else 8, 4 bytes or scalar), so G = the units of a row / ITERS; a warp covers 32 / G
// consecutive rows (consecutive heads of a token: the table row is read from L1/L2 after the first).
// The statistics are xor-shuffle sums over the group (every lane gets bitwise the same value).
//
// Grid: 1-D over row groups with a grid-stride loop (no 65,535 limit); int64 row offsets through the
// coalesced row layout of q, k and the table (common/rows.h). Only light headers here (no torch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qk_norm_rope/qk_norm_rope_params.h"

namespace i2v {
namespace qknr {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // then the blocks loop (grid-stride)

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

// N consecutive elements moved as one unit: one access up to 16 bytes; 32 bytes (8 floats of an fp32
// table next to 16-bit q) are two 16-byte accesses (alignment stays 16, access_width checks it).
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

struct WarpOps {
  template <typename X, int N>
  static __device__ __forceinline__ void load(const X* ptr, float (&out)[N]) {
    const Pack<X, N> pk = *reinterpret_cast<const Pack<X, N>*>(ptr);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
  }
  template <typename X, int N>
  static __device__ __forceinline__ void store(X* ptr, const float (&in)[N]) {
    Pack<X, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) pk.v[i] = from_float<X>(in[i]);
    *reinterpret_cast<Pack<X, N>*>(ptr) = pk;
  }
  static __device__ __forceinline__ float rsqrt(float v) { return rsqrtf(v); }
};

// The block is (G, kThreads / G): threadIdx.x is the lane in its row's group of G = blockDim.x lanes,
// threadIdx.y the row in the block; a warp holds 32 / G whole, aligned groups.
struct GroupOps : WarpOps {
  // xor butterfly within the group; every lane of the warp takes part
  static __device__ __forceinline__ float lanes_sum(float v) {
    for (int offset = static_cast<int>(blockDim.x) >> 1; offset > 0; offset >>= 1) {
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
  }
};

template <typename T, typename S, int VEC, bool HALF>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_kernel(const QkNormRopeParams p) {
  constexpr int kIters = Unit<VEC, HALF>::LANE_ITERS;
  const int64_t rows_per_block = blockDim.y;
  // the loop bound is uniform over the block: every lane runs the collective sums of every pass
  for (int64_t base = blockIdx.x * rows_per_block; base < p.rows; base += gridDim.x * rows_per_block) {
    const int64_t row = base + threadIdx.y;
    norm_rope_row<T, S, VEC, HALF, kIters, GroupOps>(p, row, row < p.rows, threadIdx.x, blockDim.x);
  }
}

template <typename T, typename S, int VEC, bool HALF>
const char* launch(const QkNormRopeParams& p, cudaStream_t stream) {
  using U = Unit<VEC, HALF>;
  const int units = U::count(p.D);
  const int per_lane = U::LANE_ITERS;
  int lanes = 1;
  while (lanes * per_lane < units) lanes *= 2;
  if (lanes > 32) return "_qk_norm_rope_fwd: the head dim is too wide for the CUDA kernel (D <= 256)";
  const dim3 block(lanes, kThreads / lanes);
  const int64_t blocks = (p.rows + block.y - 1) / block.y;
  const unsigned grid = static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
  qk_norm_rope_kernel<T, S, VEC, HALF><<<grid, block, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, typename S, bool HALF>
const char* launch_vec(const QkNormRopeParams& p, cudaStream_t stream) {
  switch (access_width(p, sizeof(T), sizeof(S))) {
    case 8:
      if constexpr (sizeof(T) == 2) return launch<T, S, 8, HALF>(p, stream);
      break;
    case 4: return launch<T, S, 4, HALF>(p, stream);
    case 2: return launch<T, S, 2, HALF>(p, stream);
    default: return launch<T, S, 1, HALF>(p, stream);
  }
  return "_qk_norm_rope_fwd: internal error: no access width";
}

template <typename T, typename S>
const char* launch_style(const QkNormRopeParams& p, cudaStream_t stream) {
  return p.half_style ? launch_vec<T, S, true>(p, stream) : launch_vec<T, S, false>(p, stream);
}

}  // namespace

const char* qk_norm_rope_fwd_cuda(const QkNormRopeParams& p, void* stream_ptr) {
  if (p.rows <= 0) return nullptr;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool side_f32 = p.side_dtype == DType::kFloat;
  switch (p.x_dtype) {
    case DType::kFloat: return launch_style<float, float>(p, stream);
    case DType::kHalf:
      return side_f32 ? launch_style<__half, float>(p, stream) : launch_style<__half, __half>(p, stream);
    case DType::kBFloat16:
      return side_f32 ? launch_style<__nv_bfloat16, float>(p, stream)
                      : launch_style<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  return "_qk_norm_rope_fwd: the CUDA kernel supports float32, float16 and bfloat16 inputs";
}

}  // namespace qknr
}  // namespace i2v
