// Causal 3D convolution forward on ATen ops, shared by the CPU and CUDA bindings of _causal_conv3d_fwd
// (formula in csrc/ops.cpp; the Python reference is i2v_kernels/ops/conv3d/reference.py).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

namespace i2v {
namespace conv3d {

// time_pad codes of the op: the index in i2v_kernels.ops.conv3d.reference.TIME_PADS.
constexpr int64_t kTimePadReplicate = 0;
constexpr int64_t kTimePadZeros = 1;

// Validates the arguments (every failure names the argument and what was expected; x must live on
// `device_type`, every other tensor on x's device), then
//   * builds the temporally padded input [B, Cin, P + T, H, W] once: one preallocated buffer that x
//     is copied into (converted to fp32 on CPU for fp16/bf16) and whose first P frames are the cache,
//     copies of x's first frame, or zeros; channels_last_3d on CUDA, NCDHW on CPU (oneDNN's faster
//     layout there, and the reference's); no buffer at all when P == 0 (x goes in as it is on CPU, as
//     one channels_last_3d copy on CUDA unless it already is);
//   * convolves it with at::conv3d (spatial zero padding as the convolution's own padding, bias fused
//     by ATen: cuDNN on CUDA, oneDNN or the native kernel on CPU) and adds `residual` in place;
//   * returns [B, Cout, T_out, H_out, W_out] in x's dtype with the strides of
//     torch.empty(..., memory_format=torch.channels_last_3d) (the Python op's fake), copying only when
//     the convolution's output differs from that (a dtype change, or degenerate sizes).
at::Tensor causal_conv3d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& cache, const std::optional<at::Tensor>& residual,
                                 c10::IntArrayRef stride, c10::IntArrayRef dilation, int64_t time_pad,
                                 c10::DeviceType device_type);

}  // namespace conv3d
}  // namespace i2v
