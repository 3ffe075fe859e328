// CPU binding of _causal_conv3d_fwd: the ATen path of conv3d_common.cpp (NCDHW oneDNN convolution for
// fp32, and for fp16/bf16 converted to fp32 as the reference does; ATen's native kernel for fp64).
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <torch/library.h>

#include "conv3d/conv3d_common.h"

namespace i2v {
namespace conv3d {
namespace {

at::Tensor causal_conv3d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& cache, const std::optional<at::Tensor>& residual,
                                 c10::IntArrayRef stride, c10::IntArrayRef dilation, int64_t time_pad) {
  return causal_conv3d_forward(x, weight, bias, cache, residual, stride, dilation, time_pad, c10::DeviceType::CPU);
}

}  // namespace
}  // namespace conv3d
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CPU, m) { m.impl("_causal_conv3d_fwd", &i2v::conv3d::causal_conv3d_fwd_cpu); }
