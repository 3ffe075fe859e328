// CUDA binding of _qk_norm_rope_fwd: argument checks (qk_norm_rope_common.cpp), device guard, current
// stream, launch (qk_norm_rope_cuda_kernel.cu) and launch check.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "qk_norm_rope/qk_norm_rope_common.h"
#include "qk_norm_rope/qk_norm_rope_params.h"

namespace i2v {
namespace qknr {
namespace {

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_fwd_cuda_op(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_weight,
    const std::optional<at::Tensor>& k_bias, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, int64_t norm, double eps, bool half_style) {
  TORCH_CHECK(q.is_cuda(), "_qk_norm_rope_fwd: q must be a CUDA tensor when any argument is, got one on ",
              q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  QkNormRopeParams p;
  auto outputs = qk_norm_rope_prepare(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, norm, eps, half_style,
                                      c10::DeviceType::CUDA, p);
  if (p.rows == 0) return outputs;
  const char* err = qk_norm_rope_fwd_cuda(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(err == nullptr, "_qk_norm_rope_fwd: CUDA kernel launch failed: ", err);
  return outputs;
}

}  // namespace
}  // namespace qknr
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CUDA, m) { m.impl("_qk_norm_rope_fwd", &i2v::qknr::qk_norm_rope_fwd_cuda_op); }
