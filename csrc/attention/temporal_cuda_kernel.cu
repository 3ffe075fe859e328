// Temporal attention for video DiTs: each spatial position attends across the T frames of the video.
//
// T is short (1..128) and the batch B*S*H is huge, so this is a bandwidth problem. One warp owns one
// (b, s, h) problem: it stages the problem's q, k, v rows (T x D, read once, coalesced along D) in
// shared memory, then for each query frame
//   * lane j scores keys j, j+32, ... (a dot product over D from shared memory; rows are padded by
//     4 bytes so the 32 lanes reading 32 different rows hit 32 different banks),
//   * softmax over the T scores with two warp reductions (fp32),
//   * every lane accumulates its slice of D of sum_j p_j v_j, p_j broadcast by shuffle,
// and writes the output row. Problems are spread over a flat 1-D grid with a grid-stride loop, so a
// batch above 65,535 (where SDPA's efficient kernel's grid overflows) is no special case.
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

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void temporal_attention_kernel(TemporalParams p, int64_t row_pitch, int64_t problems) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int64_t T = p.T, D = p.D;
  scalar_t* sq = reinterpret_cast<scalar_t*>(smem_raw) + static_cast<int64_t>(warp) * 3 * T * row_pitch;
  scalar_t* sk = sq + T * row_pitch;
  scalar_t* sv = sk + T * row_pitch;
  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  const scalar_t* k = static_cast<const scalar_t*>(p.k);
  const scalar_t* v = static_cast<const scalar_t*>(p.v);
  scalar_t* out = static_cast<scalar_t*>(p.out);

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

    // Stage the problem: T rows of D elements per tensor, consecutive lanes on consecutive elements.
    __syncwarp();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t d = lane; d < D; d += kWarp) {
        sq[t * row_pitch + d] = q[q0 + t * p.q_stride[1] + d];
        sk[t * row_pitch + d] = k[k0 + t * p.k_stride[1] + d];
        sv[t * row_pitch + d] = v[v0 + t * p.v_stride[1] + d];
      }
    }
    __syncwarp();

    for (int64_t t = 0; t < T; ++t) {
      const int64_t keys = p.causal ? t + 1 : T;
      float score[kKeysPerLane];
      float row_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const int64_t j = lane + static_cast<int64_t>(i) * kWarp;
        score[i] = -INFINITY;
        if (j < keys) {
          float acc = 0.f;
          const scalar_t* qrow = sq + t * row_pitch;
          const scalar_t* krow = sk + j * row_pitch;
          for (int64_t d = 0; d < D; ++d) acc += to_float(qrow[d]) * to_float(krow[d]);
          score[i] = acc * p.scale;
          row_max = fmaxf(row_max, score[i]);
        }
      }
      row_max = warp_max(row_max);  // key 0 is always visible, so this is finite
      float row_sum = 0.f;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const int64_t j = lane + static_cast<int64_t>(i) * kWarp;
        score[i] = j < keys ? __expf(score[i] - row_max) : 0.f;
        row_sum += score[i];
      }
      const float inv_sum = 1.f / warp_sum(row_sum);

      // out[t, d] = sum_j p_j v[j, d]; lane owns d = lane, lane + 32, ...
      for (int64_t d0 = 0; d0 < D; d0 += kWarp) {
        const int64_t d = d0 + lane;
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < kKeysPerLane; ++i) {  // constant index into score[]: stays in registers
          for (int src = 0; src < kWarp; ++src) {
            const int64_t j = static_cast<int64_t>(i) * kWarp + src;
            if (j >= keys) break;  // warp-uniform
            const float pj = __shfl_sync(0xffffffffu, score[i], src);
            if (d < D) acc += pj * to_float(sv[j * row_pitch + d]);
          }
        }
        if (d < D) out[o0 + t * p.o_stride[1] + d] = from_float<scalar_t>(acc * inv_sum);
      }
    }
  }
}

// Row pitch of the staged tiles in elements: D plus 4 bytes, so rows start in different banks.
int64_t row_pitch(int64_t D, int element_size) { return D + (element_size >= 4 ? 1 : 4 / element_size); }

template <typename scalar_t>
const char* launch(const TemporalParams& p, int64_t max_smem_per_block, cudaStream_t stream) {
  const int64_t pitch = row_pitch(p.D, sizeof(scalar_t));
  const int64_t per_warp = temporal_smem_per_warp(p.T, p.D, sizeof(scalar_t));
  if (per_warp > max_smem_per_block) return "temporal attention: T * D too large for one warp's shared memory";
  int warps = 4;
  while (warps > 1 && warps * per_warp > max_smem_per_block) warps /= 2;
  const size_t smem = static_cast<size_t>(warps * per_warp);
  auto kernel = temporal_attention_kernel<scalar_t>;
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
        cudaSuccess) {
      return cudaGetErrorString(cudaGetLastError());
    }
  }
  const int64_t problems = p.B * p.S * p.H;
  const int64_t blocks_needed = (problems + warps - 1) / warps;
  const unsigned int blocks = static_cast<unsigned int>(blocks_needed < (1 << 20) ? blocks_needed : (1 << 20));
  kernel<<<blocks, warps * kWarp, smem, stream>>>(p, pitch, problems);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int64_t temporal_smem_per_warp(int64_t T, int64_t D, int element_size) {
  return 3 * T * row_pitch(D, element_size) * element_size;
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
