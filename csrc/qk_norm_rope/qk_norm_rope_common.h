// Host-side argument checking shared by the CPU and CUDA bindings of _qk_norm_rope_fwd.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "qk_norm_rope/qk_norm_rope_params.h"

namespace i2v {
namespace qknr {

// Validates the arguments of _qk_norm_rope_fwd (every failure names the argument and what was
// expected), allocates (q_out, k_out) and fills `p`. `device_type` is the dispatch key's device: q must
// live there and every other tensor on q's device. When q.numel() == 0 the outputs are empty,
// p.rows == 0 and the caller must return without launching.
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_prepare(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_weight,
    const std::optional<at::Tensor>& k_bias, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, int64_t norm, double eps, bool half_style, c10::DeviceType device_type,
    QkNormRopeParams& p);

}  // namespace qknr
}  // namespace i2v
