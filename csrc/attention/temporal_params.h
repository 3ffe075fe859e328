// Arguments of the CUDA temporal-attention forward, as the kernel sees them.
//
// Plain C++ only (included by the .cu, which stays free of torch headers). q, k, v and out are
// [B, T, S, H, D] tensors addressed through element strides, unit stride on D; out is contiguous.
#pragma once

#include <cstdint>

namespace i2v {
namespace attention {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct TemporalParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t B = 0, T = 0, S = 0, H = 0, D = 0;
  // strides over (B, T, S, H) in elements, per tensor; D has stride 1
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t o_stride[4] = {0, 0, 0, 0};
  float scale = 1.0f;
  bool causal = false;
  DType dtype = DType::kHalf;
};

// Largest T the kernel takes (keys per lane are held in registers: 4 per lane, 32 lanes).
constexpr int64_t kTemporalMaxT = 128;

// Shared memory one problem (one warp) needs: the problem's q, k, v rows in the input dtype, each row
// padded to an odd number of 16-byte chunks (ceil(D * element_size / 16) rounded up to odd), plus T
// fp32 softmax weights rounded up to a multiple of 4:
//   3 * T * 16 * (ceil(D * element_size / 16) | 1) + 4 * 4 * ceil(T / 4)   bytes.
// i2v_kernels/ops/attention/__init__.py (_cuda_temporal_why_not) repeats this formula.
int64_t temporal_smem_per_warp(int64_t T, int64_t D, int element_size);

// Opt-in shared memory per block of CUDA device `device` (0 when it cannot be queried).
int64_t temporal_max_smem(int device);

// Launcher (temporal_cuda_kernel.cu). Returns nullptr on success, else a static error message.
const char* temporal_attention_cuda(const TemporalParams& p, int64_t max_smem_per_block, void* stream);

}  // namespace attention
}  // namespace i2v
