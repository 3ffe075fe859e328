// CUDA binding of _adaln_fwd: argument checks (adaln_common.cpp), device guard, current stream, launch
// (adaln_cuda_kernel.cu) and launch check.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "adaln/adaln_common.h"
#include "adaln/adaln_params.h"

namespace i2v {
namespace adaln {
namespace {

std::tuple<at::Tensor, at::Tensor> adaln_fwd_cuda_op(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                                     const std::optional<at::Tensor>& gate,
                                                     const std::optional<at::Tensor>& shift,
                                                     const std::optional<at::Tensor>& scale,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias, int64_t norm,
                                                     double eps) {
  TORCH_CHECK(x.is_cuda(), "_adaln_fwd: x must be a CUDA tensor when any argument is, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "_adaln_fwd: the CUDA kernel supports float32, float16 and bfloat16 x, got float64 "
              "(float64 runs on CPU only)");
  const c10::cuda::CUDAGuard guard(x.device());
  AdalnParams p;
  auto outputs = adaln_prepare(x, y, gate, shift, scale, weight, bias, norm, eps, c10::DeviceType::CUDA, p);
  if (p.rows == 0) return outputs;
  const char* err = adaln_fwd_cuda(p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == nullptr, "_adaln_fwd: CUDA kernel launch failed: ", err);
  return outputs;
}

}  // namespace
}  // namespace adaln
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CUDA, m) { m.impl("_adaln_fwd", &i2v::adaln::adaln_fwd_cuda_op); }
