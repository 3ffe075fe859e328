// CPU kernel of _qk_norm_rope_fwd (formula in qk_norm_rope_params.h): the CUDA kernel's row routine,
// run by one "lane" per row.
//
// Rows are split across threads with at::parallel_for. Each row goes through norm_rope_row with the
// same access width VEC (access_width) and the same unit layout as on the GPU; every access checks
// the alignment the GPU's vector loads would need, so a wrong width choice fails here, on the CPU,
// instead of faulting on a GPU.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>

#include "qk_norm_rope/qk_norm_rope_common.h"
#include "qk_norm_rope/qk_norm_rope_params.h"

namespace i2v {
namespace qknr {
namespace {

template <typename X, int N>
void check_aligned(const X* ptr) {
  constexpr uintptr_t align = sizeof(X) * N < 16 ? sizeof(X) * N : 16;
  TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % align == 0, "_qk_norm_rope_fwd: internal error: an access of ", N,
              " elements at ", static_cast<const void*>(ptr), " is not ", align,
              "-byte aligned (the CUDA kernel's vector access would fault)");
}

struct CpuOps {
  template <typename X, int N>
  static inline void load(const X* ptr, float (&out)[N]) {
    check_aligned<X, N>(ptr);
    for (int i = 0; i < N; ++i) out[i] = static_cast<float>(ptr[i]);
  }
  template <typename X, int N>
  static inline void store(X* ptr, const float (&in)[N]) {
    check_aligned<X, N>(ptr);
    for (int i = 0; i < N; ++i) ptr[i] = static_cast<X>(in[i]);
  }
  static inline float lanes_sum(float v) { return v; }
  static inline float rsqrt(float v) { return 1.f / std::sqrt(v); }
};

template <typename T, typename S, int VEC, bool HALF, int ITERS>
void rows_cpu(const QkNormRopeParams& p) {
  // About 16K elements of q (and as many of k) per task so that threading pays off.
  const int64_t grain = std::max<int64_t>(1, 16384 / p.D);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) norm_rope_row<T, S, VEC, HALF, ITERS, CpuOps>(p, row, true, 0, 1);
  });
}

// The single "lane" holds the whole row: ITERS units, the fewest of three sizes that covers D (the
// row routine's loops run over all ITERS units, so a short row in a kMaxD-wide frame would cost 16x).
template <typename T, typename S, int VEC, bool HALF>
void rows_cpu(const QkNormRopeParams& p) {
  constexpr int kFull = Unit<VEC, HALF>::ROW_ITERS;
  constexpr int kQuarter = kFull / 4 > 1 ? kFull / 4 : 1;
  constexpr int kSixteenth = kFull / 16 > 1 ? kFull / 16 : 1;
  const int units = Unit<VEC, HALF>::count(p.D);
  if (units <= kSixteenth) {
    rows_cpu<T, S, VEC, HALF, kSixteenth>(p);
  } else if (units <= kQuarter) {
    rows_cpu<T, S, VEC, HALF, kQuarter>(p);
  } else {
    rows_cpu<T, S, VEC, HALF, kFull>(p);
  }
}

template <typename T, typename S, bool HALF>
void dispatch_vec(const QkNormRopeParams& p) {
  switch (access_width(p, sizeof(T), sizeof(S))) {
    case 8: if constexpr (sizeof(T) == 2) { rows_cpu<T, S, 8, HALF>(p); return; } break;
    case 4: rows_cpu<T, S, 4, HALF>(p); return;
    case 2: rows_cpu<T, S, 2, HALF>(p); return;
    default: rows_cpu<T, S, 1, HALF>(p); return;
  }
  TORCH_CHECK(false, "_qk_norm_rope_fwd: internal error: no access width");
}

template <typename T, typename S>
void dispatch_style(const QkNormRopeParams& p) {
  p.half_style ? dispatch_vec<T, S, true>(p) : dispatch_vec<T, S, false>(p);
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_weight,
    const std::optional<at::Tensor>& k_bias, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, int64_t norm, double eps, bool half_style) {
  QkNormRopeParams p;
  auto outputs = qk_norm_rope_prepare(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, norm, eps, half_style,
                                      c10::DeviceType::CPU, p);
  if (p.rows == 0) return outputs;
  const bool side_f32 = p.side_dtype == DType::kFloat;
  switch (p.x_dtype) {
    case DType::kFloat: dispatch_style<float, float>(p); break;
    case DType::kHalf:
      side_f32 ? dispatch_style<c10::Half, float>(p) : dispatch_style<c10::Half, c10::Half>(p);
      break;
    case DType::kBFloat16:
      side_f32 ? dispatch_style<c10::BFloat16, float>(p) : dispatch_style<c10::BFloat16, c10::BFloat16>(p);
      break;
  }
  return outputs;
}

}  // namespace
}  // namespace qknr
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CPU, m) { m.impl("_qk_norm_rope_fwd", &i2v::qknr::qk_norm_rope_fwd_cpu); }
