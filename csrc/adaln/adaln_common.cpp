// Argument checks and parameter packing for _adaln_fwd, shared by the CPU and CUDA bindings.
#include "adaln/adaln_common.h"

#include <cmath>
#include <string>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace i2v {
namespace adaln {
namespace {

constexpr const char* kOp = "_adaln_fwd";

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
  return DType::kFloat;  // unreachable
}

// Last-dim contiguity; a single channel may have any stride since only its first element is read.
bool last_dim_contiguous(const at::Tensor& t) { return t.size(-1) == 1 || t.stride(-1) == 1; }

void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " must be on x's device ", x.device(),
              ", got ", t.device());
}

// y, gate, shift, scale: x's shape (broadcast modulation comes as an expand()ed, stride-0 view).
void check_row_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_device(name, t, x);
  TORCH_CHECK(t.sizes() == x.sizes(), kOp, ": ", name, " must have x's shape ", x.sizes(),
              " (pass a broadcast modulation as m.expand(x.shape), a stride-0 view), got ", t.sizes());
  TORCH_CHECK(last_dim_contiguous(t), kOp, ": ", name, " must have stride 1 in its last dim, got strides ",
              t.strides());
}

// weight, bias: [C], contiguous.
void check_channel_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_device(name, t, x);
  const int64_t C = x.size(-1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, kOp, ": ", name, " must have shape [", C,
              "] (x.size(-1)), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous, got strides ", t.strides());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adaln_prepare(
    const at::Tensor& x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t norm,
    double eps, c10::DeviceType device_type, AdalnParams& p) {
  p = AdalnParams();
  TORCH_CHECK(x.device().type() == device_type, kOp, ": x must be a ", c10::DeviceTypeName(device_type),
              " tensor for this kernel, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have shape [..., C] (at least 1 dim), got a 0-dim tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kHalf || xt == at::kBFloat16, kOp,
              ": x must be float32, float64, float16 or bfloat16, got ", xt);
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0, kOp, ": x must have at least one channel (x.size(-1) > 0), got shape ", x.sizes());
  TORCH_CHECK(last_dim_contiguous(x), kOp, ": x must have stride 1 in its last dim, got strides ",
              x.strides());
  TORCH_CHECK(norm == kNormNone || norm == kNormLayer || norm == kNormRms, kOp,
              ": norm must be 0 (none), 1 (layer norm) or 2 (RMS norm), got ", norm);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, kOp, ": eps must be finite and > 0, got ", eps);

  if (y.has_value()) {
    check_row_tensor("y", *y, x);
    TORCH_CHECK(y->scalar_type() == xt, kOp, ": y must have x's dtype ", xt, ", got ", y->scalar_type());
  } else {
    TORCH_CHECK(!gate.has_value(), kOp, ": gate is given without y (r = x + gate * y needs y)");
  }
  if (norm == kNormNone) {
    TORCH_CHECK(!weight.has_value() && !bias.has_value() && !shift.has_value() && !scale.has_value(), kOp,
                ": norm=0 (gated residual only) takes no weight, bias, shift or scale");
  }

  // Modulation tensors: one shared dtype, x's or float32.
  struct Mod {
    const char* name;
    const std::optional<at::Tensor>* t;
    bool per_row;
  };
  const Mod mods[] = {{"gate", &gate, true},     {"shift", &shift, true}, {"scale", &scale, true},
                      {"weight", &weight, false}, {"bias", &bias, false}};
  const char* mod_name = nullptr;
  at::ScalarType mod_type = xt;
  for (const Mod& m : mods) {
    if (!m.t->has_value()) continue;
    const at::Tensor& t = **m.t;
    if (m.per_row) {
      check_row_tensor(m.name, t, x);
    } else {
      check_channel_tensor(m.name, t, x);
    }
    const auto tt = t.scalar_type();
    if (mod_name == nullptr) {
      TORCH_CHECK(tt == xt || tt == at::kFloat, kOp, ": ", m.name, " must have x's dtype ", xt,
                  " or float32, got ", tt);
      mod_name = m.name;
      mod_type = tt;
    } else {
      TORCH_CHECK(tt == mod_type, kOp, ": gate, shift, scale, weight and bias must share one dtype, but ",
                  mod_name, " is ", mod_type, " and ", m.name, " is ", tt);
    }
  }

  const bool with_residual = y.has_value() && norm != kNormNone;
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor residual = with_residual
                            ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                            : at::empty({0}, x.options());

  p.C = C;
  p.norm = static_cast<int>(norm);
  p.eps = eps;
  p.x_dtype = to_dtype(xt);
  p.mod_dtype = to_dtype(mod_type);
  if (x.numel() == 0) return {out, residual};

  p.rows = x.numel() / C;
  p.out = out.data_ptr();
  p.residual = with_residual ? residual.data_ptr() : nullptr;
  p.x = x.const_data_ptr();
  p.y = y.has_value() ? y->const_data_ptr() : nullptr;
  p.gate = gate.has_value() ? gate->const_data_ptr() : nullptr;
  p.shift = shift.has_value() ? shift->const_data_ptr() : nullptr;
  p.scale = scale.has_value() ? scale->const_data_ptr() : nullptr;
  p.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;

  // Joint coalescing of the leading dims; absent tensors get all-zero strides, which never block a
  // merge.
  const int lead = static_cast<int>(x.dim()) - 1;
  std::vector<int64_t> zeros(static_cast<size_t>(lead), 0);
  auto lead_strides = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->strides().data() : zeros.data();
  };
  const int64_t* const strides[kNumRowTensors] = {x.strides().data(), lead_strides(y), lead_strides(gate),
                                                  lead_strides(shift), lead_strides(scale)};
  TORCH_CHECK(coalesce_rows<kNumRowTensors>(lead, x.sizes().data(), strides, p.layout), kOp,
              ": the leading dims of x and its row-shaped arguments coalesce to more than ", kMaxRowDims,
              " dims (x shape ", x.sizes(), ", strides ", x.strides(),
              "); make some of them contiguous first");
  return {out, residual};
}

}  // namespace adaln
}  // namespace i2v
