// CUDA binding of _causal_conv3d_fwd: device guard, then the ATen path of conv3d_common.cpp on x's
// device and current stream (at::conv3d picks cuDNN for channels_last_3d fp16/bf16/fp32 and honors
// torch.backends.cudnn's enabled/benchmark/deterministic/allow_tf32 flags).
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "conv3d/conv3d_common.h"

namespace i2v {
namespace conv3d {
namespace {

at::Tensor causal_conv3d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cache,
                                  const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                                  c10::IntArrayRef dilation, int64_t time_pad) {
  TORCH_CHECK(x.is_cuda(), "_causal_conv3d_fwd: x must be a CUDA tensor for this kernel, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return causal_conv3d_forward(x, weight, bias, cache, residual, stride, dilation, time_pad, c10::DeviceType::CUDA);
}

}  // namespace
}  // namespace conv3d
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CUDA, m) { m.impl("_causal_conv3d_fwd", &i2v::conv3d::causal_conv3d_fwd_cuda); }
