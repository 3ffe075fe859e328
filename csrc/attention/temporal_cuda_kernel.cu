// Temporal attention for video DiTs: each spatial position attends across the T frames of the video.
//
// T is short (1..128) and the batch B*S*H is huge. One warp owns one (b, s, h) problem:
//   * staging: the problem's q, k, v rows (T x D each, read once) go to shared memory with 16-byte
//     cp.async copies when the rows are 16-byte aligned (else element by element). Rows are padded
//     with zeros to a whole number of 16-byte chunks, and the row pitch is an odd number of chunks,
//     so the 8 lanes of a quarter-warp reading 8 different rows at one column hit 8 different bank
//     groups;
//   * per query frame t:
//       - lane j scores keys j, j+32, j+64, j+96 (fp32 dot products over D from shared memory, 16 bytes
//         per read; the q chunk is a broadcast read shared by the lane's keys);
//       - softmax over the T scores with two warp reductions (fp32, exp2 with log2(e) folded into the
//         scale); the unnormalized weights go to a per-warp fp32 buffer in shared memory;
//       - each lane accumulates its pairs of D (d = 2 lane + 64 r) of sum_j p_j v_j, reading four
//         weights at a time as one broadcast float4, and writes the output row, scaled by 1 / sum.
// Problems are spread over a flat 1-D grid with a grid-stride loop, so a batch above 65,535 (where
// SDPA's efficient kernel's grid overflows) is no special case. Control flow around every warp
// collective (__shfl_xor_sync, __syncwarp) depends on warp-uniform values only (T, D, t, keys).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/temporal_params.h"

namespace i2v {
namespace attention {
namespace {

constexpr int kWarp = 32;
constexpr int kKeysPerLane = static_cast<int>(kTemporalMaxT / kWarp);
constexpr int kChunk = 16;         // bytes per staged chunk (one 16-byte shared-memory read)
constexpr int kMaxWarps = 4;       // warps (problems) per block, fewer when shared memory is short
constexpr int kPairRounds = 4;     // pairs of D per lane per pass over the keys: 256 elements a pass
constexpr int kMaxBlocks = 1 << 20;

// Shared-memory layout of one warp's problem (host-computed, identical for every problem).
struct Layout {
  int chunks = 0;      // 16-byte chunks of D per row (the rest of the last chunk is zero padding)
  int pitch = 0;       // row pitch in elements: an odd number of chunks
  int warp_bytes = 0;  // shared memory per warp: q, k, v rows and the T softmax weights
  bool vec_q = false, vec_k = false, vec_v = false;  // rows copy as 16-byte chunks (aligned)
  bool pair_out = false;                             // output pairs (d, d+1) store as one 2-element write
};

int64_t chunks_of(int64_t D, int element_size) { return (D * element_size + kChunk - 1) / kChunk; }

// ---- element conversions --------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Pair = float2;
  static __device__ __forceinline__ float2 pair_to_float2(Pair v) { return v; }
  static __device__ __forceinline__ Pair float2_to_pair(float a, float b) { return make_float2(a, b); }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Elem<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float2 pair_to_float2(Pair v) { return __half22float2(v); }
  static __device__ __forceinline__ Pair float2_to_pair(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float2 pair_to_float2(Pair v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ Pair float2_to_pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// One 16-byte chunk of shared memory as fp32 values (16 / sizeof(T) of them).
template <typename T>
__device__ __forceinline__ void load_chunk(const T* src, float (&f)[kChunk / sizeof(T)]) {
  using Pair = typename Elem<T>::Pair;
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const Pair* pairs = reinterpret_cast<const Pair*>(&raw);
#pragma unroll
  for (int i = 0; i < static_cast<int>(kChunk / sizeof(Pair)); ++i) {
    const float2 v = Elem<T>::pair_to_float2(pairs[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

// ---- staging ---------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Copies T rows of D elements (row stride `stride_t` elements) to dst rows of `pitch` elements,
// zero-filling each row up to its whole chunks. `vec`: src rows are 16-byte aligned and D fills
// whole chunks, so rows copy as 16-byte cp.async chunks (completed by cp_async_wait_all()).
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, const T* __restrict__ src, int64_t stride_t, int rows, int D,
                                           const Layout& L, bool vec, int lane) {
  constexpr int V = kChunk / sizeof(T);
  if (vec) {
    const int n = rows * L.chunks;
    for (int i = lane; i < n; i += kWarp) {
      const int t = i / L.chunks;
      const int c = i - t * L.chunks;
      cp_async_16(dst + t * L.pitch + c * V, src + t * stride_t + c * V);
    }
  } else {
    const int width = L.chunks * V;
    const int n = rows * width;
#pragma unroll 4
    for (int i = lane; i < n; i += kWarp) {
      const int t = i / width;
      const int d = i - t * width;
      dst[t * L.pitch + d] = d < D ? src[t * stride_t + d] : Elem<T>::from_float(0.f);
    }
  }
}

// ---- warp reductions -------------------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- kernel ----------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * kWarp)
    temporal_attention_kernel(TemporalParams p, Layout L, int64_t problems) {
  using Pair = typename Elem<T>::Pair;
  constexpr int V = kChunk / sizeof(T);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int n_t = static_cast<int>(p.T);
  const int D = static_cast<int>(p.D);
  T* sq = reinterpret_cast<T*>(smem_raw + static_cast<int64_t>(warp) * L.warp_bytes);
  T* sk = sq + n_t * L.pitch;
  T* sv = sk + n_t * L.pitch;
  float* sp = reinterpret_cast<float*>(sv + n_t * L.pitch);  // 16-byte aligned: pitch is whole chunks
  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  T* __restrict__ out = static_cast<T*>(p.out);
  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x * scale) = exp2(x * scale * log2(e))

  for (int64_t problem = static_cast<int64_t>(blockIdx.x) * warps + warp; problem < problems;
       problem += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t h = problem % p.H;
    const int64_t rest = problem / p.H;
    const int64_t s = rest % p.S;
    const int64_t b = rest / p.S;
    const int64_t q0 = b * p.q_stride[0] + s * p.q_stride[2] + h * p.q_stride[3];
    const int64_t k0 = b * p.k_stride[0] + s * p.k_stride[2] + h * p.k_stride[3];
    const int64_t v0 = b * p.v_stride[0] + s * p.v_stride[2] + h * p.v_stride[3];
    const int64_t o0 = b * p.o_stride[0] + s * p.o_stride[2] + h * p.o_stride[3];

    __syncwarp();  // every lane is done reading the previous problem's rows
    stage_rows(sq, q + q0, p.q_stride[1], n_t, D, L, L.vec_q, lane);
    stage_rows(sk, k + k0, p.k_stride[1], n_t, D, L, L.vec_k, lane);
    stage_rows(sv, v + v0, p.v_stride[1], n_t, D, L, L.vec_v, lane);
    cp_async_wait_all();
    __syncwarp();

    for (int t = 0; t < n_t; ++t) {
      const int keys = p.causal ? t + 1 : n_t;  // warp-uniform
      // Scores of this lane's keys j = lane + 32 i.
      float score[kKeysPerLane];
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) score[i] = 0.f;
      const T* qrow = sq + t * L.pitch;
      for (int c = 0; c < L.chunks; ++c) {
        float qf[V];
        load_chunk(qrow + c * V, qf);
#pragma unroll
        for (int i = 0; i < kKeysPerLane; ++i) {
          const int j = lane + i * kWarp;
          if (j < keys) {
            float kf[V];
            load_chunk(sk + j * L.pitch + c * V, kf);
#pragma unroll
            for (int e = 0; e < V; ++e) score[i] = fmaf(qf[e], kf[e], score[i]);
          }
        }
      }
      float row_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        // A NaN/inf in q or k makes the dot product NaN or +-inf; + score * 0 turns +-inf into NaN,
        // so a non-finite query or visible key NaNs the whole output row (docs/SEMANTICS.md) instead
        // of a -inf score silently dropping the key.
        score[i] += score[i] * 0.f;
        score[i] *= scale_log2;
        if (lane + i * kWarp < keys) row_max = fmaxf(row_max, score[i]);
      }
      row_max = warp_max(row_max);  // key 0 is always visible, so this is finite for finite inputs

      __syncwarp();  // every lane is done reading the previous query's weights
      float row_sum = 0.f;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const int j = lane + i * kWarp;
        if (j < keys) {
          const float e = exp2f(score[i] - row_max);
          sp[j] = e;
          row_sum += e;
        }
      }
      const float inv_sum = 1.f / warp_sum(row_sum);
      __syncwarp();  // the weights are visible to every lane

      // out[t, d] = inv_sum * sum_j p_j v[j, d]; lane owns pairs d = d0 + 2 lane + 64 r.
      T* orow = out + o0 + static_cast<int64_t>(t) * p.o_stride[1];
      for (int d0 = 0; d0 < D; d0 += 2 * kWarp * kPairRounds) {
        float2 acc[kPairRounds];
#pragma unroll
        for (int r = 0; r < kPairRounds; ++r) acc[r] = make_float2(0.f, 0.f);
        // A pair (d, d+1) with d < D lies inside the zero-padded row: the padded width is even.
        auto accumulate = [&](float pj, int j) {
          const T* vrow = sv + j * L.pitch + d0 + 2 * lane;
#pragma unroll
          for (int r = 0; r < kPairRounds; ++r) {
            if (d0 + 2 * lane + 2 * kWarp * r < D) {
              const float2 vf = Elem<T>::pair_to_float2(*reinterpret_cast<const Pair*>(vrow + 2 * kWarp * r));
              acc[r].x = fmaf(pj, vf.x, acc[r].x);
              acc[r].y = fmaf(pj, vf.y, acc[r].y);
            }
          }
        };
        int j = 0;
        for (; j + 4 <= keys; j += 4) {
          const float4 p4 = *reinterpret_cast<const float4*>(sp + j);
          accumulate(p4.x, j);
          accumulate(p4.y, j + 1);
          accumulate(p4.z, j + 2);
          accumulate(p4.w, j + 3);
        }
        for (; j < keys; ++j) accumulate(sp[j], j);
#pragma unroll
        for (int r = 0; r < kPairRounds; ++r) {
          const int d = d0 + 2 * lane + 2 * kWarp * r;
          if (d < D) {
            const float a = acc[r].x * inv_sum;
            const float c = acc[r].y * inv_sum;
            if (L.pair_out) {
              *reinterpret_cast<Pair*>(orow + d) = Elem<T>::float2_to_pair(a, c);
            } else {
              orow[d] = Elem<T>::from_float(a);
              if (d + 1 < D) orow[d + 1] = Elem<T>::from_float(c);
            }
          }
        }
      }
    }
  }
}

// ---- launch ----------------------------------------------------------------------------------------

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kChunk == 0; }

// Rows of `ptr` start 16-byte aligned for every (b, t, s, h) (dims of size 1 are never stepped over).
bool rows_aligned16(const void* ptr, const int64_t (&stride)[4], const TemporalParams& p, int element_size) {
  const int64_t sizes[4] = {p.B, p.T, p.S, p.H};
  if (!aligned16(ptr) || (p.D * element_size) % kChunk != 0) return false;
  for (int i = 0; i < 4; ++i)
    if (sizes[i] > 1 && (stride[i] * element_size) % kChunk != 0) return false;
  return true;
}

template <typename T>
const char* launch(const TemporalParams& p, int64_t max_smem_per_block, cudaStream_t stream) {
  const int es = static_cast<int>(sizeof(T));
  const int64_t per_warp = temporal_smem_per_warp(p.T, p.D, es);
  if (per_warp > max_smem_per_block) return "temporal attention: T * D too large for one warp's shared memory";
  Layout L;
  L.chunks = static_cast<int>(chunks_of(p.D, es));
  L.pitch = (L.chunks | 1) * (kChunk / es);
  L.warp_bytes = static_cast<int>(per_warp);
  L.vec_q = rows_aligned16(p.q, p.q_stride, p, es);
  L.vec_k = rows_aligned16(p.k, p.k_stride, p, es);
  L.vec_v = rows_aligned16(p.v, p.v_stride, p, es);
  const int64_t pair_bytes = 2 * es;
  L.pair_out = p.D % 2 == 0 && reinterpret_cast<uintptr_t>(p.out) % pair_bytes == 0;
  for (int i = 0; i < 4; ++i) L.pair_out = L.pair_out && p.o_stride[i] % 2 == 0;

  int warps = kMaxWarps;
  while (warps > 1 && warps * per_warp > max_smem_per_block) warps /= 2;
  const int64_t smem = warps * per_warp;
  auto kernel = temporal_attention_kernel<T>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear it, so the caller's next launch check does not see it
      return cudaGetErrorString(err);
    }
  }
  const int64_t problems = p.B * p.S * p.H;
  const int64_t blocks_needed = (problems + warps - 1) / warps;
  const unsigned int blocks = static_cast<unsigned int>(blocks_needed < kMaxBlocks ? blocks_needed : kMaxBlocks);
  kernel<<<blocks, warps * kWarp, static_cast<size_t>(smem), stream>>>(p, L, problems);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int64_t temporal_smem_per_warp(int64_t T, int64_t D, int element_size) {
  const int64_t row_bytes = (chunks_of(D, element_size) | 1) * kChunk;
  return 3 * T * row_bytes + 4 * ((T + 3) / 4 * 4);
}

int64_t temporal_max_smem(int device) {
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // consume the error so a later launch check does not report it
    return 0;
  }
  return bytes;
}

const char* temporal_attention_cuda(const TemporalParams& p, int64_t max_smem_per_block, void* stream) {
  if (p.T > kTemporalMaxT) return "temporal attention: T exceeds the CUDA kernel's limit of 128 frames";
  if (p.B * p.T * p.S * p.H * p.D == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat:
      return launch<float>(p, max_smem_per_block, s);
    case DType::kHalf:
      return launch<__half>(p, max_smem_per_block, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(p, max_smem_per_block, s);
  }
  return "temporal attention: unsupported dtype";
}

}  // namespace attention
}  // namespace i2v
