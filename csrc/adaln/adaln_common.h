// Host-side argument checking shared by the CPU and CUDA bindings of _adaln_fwd.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "adaln/adaln_params.h"

namespace i2v {
namespace adaln {

// Validates the arguments of _adaln_fwd (every failure names the argument and what was expected),
// allocates (out, residual) and fills `p` (pointers, coalesced row layout, flags). `device_type` is
// the dispatch key's device: x must live there and every other tensor on x's device. When
// x.numel() == 0 the outputs are empty, p.rows == 0 and the caller must return without launching.
std::tuple<at::Tensor, at::Tensor> adaln_prepare(
    const at::Tensor& x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t norm,
    double eps, c10::DeviceType device_type, AdalnParams& p);

}  // namespace adaln
}  // namespace i2v
