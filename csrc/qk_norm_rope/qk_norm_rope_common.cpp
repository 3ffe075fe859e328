// Argument checks and parameter packing for _qk_norm_rope_fwd, shared by the CPU and CUDA bindings.
#include "qk_norm_rope/qk_norm_rope_common.h"

#include <cmath>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace i2v {
namespace qknr {
namespace {

constexpr const char* kOp = "_qk_norm_rope_fwd";

DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, kOp, ": ", name, " must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat;  // unreachable
}

bool unit_last_stride(const at::Tensor& t) { return t.size(-1) == 1 || t.stride(-1) == 1; }

void check_device(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " must be on q's device ", q.device(), ", got ",
              t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_prepare(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_weight,
    const std::optional<at::Tensor>& k_bias, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, int64_t norm, double eps, bool half_style, c10::DeviceType device_type,
    QkNormRopeParams& p) {
  p = QkNormRopeParams();
  TORCH_CHECK(q.device().type() == device_type, kOp, ": q must be a ", c10::DeviceTypeName(device_type),
              " tensor for this kernel, got one on ", q.device());
  TORCH_CHECK(q.dim() >= 1, kOp, ": q must have shape [..., D] (at least 1 dim), got a 0-dim tensor");
  const auto xt = q.scalar_type();
  p.x_dtype = to_dtype(xt, "q");
  const int64_t D = q.size(-1);
  TORCH_CHECK(D >= 1 && D <= kMaxD, kOp, ": the head dim D = q.size(-1) must be in [1, ", kMaxD, "], got ", D);
  TORCH_CHECK(unit_last_stride(q), kOp, ": q must have stride 1 in its last dim, got strides ", q.strides());
  check_device("k", k, q);
  TORCH_CHECK(k.sizes() == q.sizes(), kOp, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == xt, kOp, ": k must have q's dtype ", xt, ", got ", k.scalar_type());
  TORCH_CHECK(unit_last_stride(k), kOp, ": k must have stride 1 in its last dim, got strides ", k.strides());
  TORCH_CHECK(norm == kNormNone || norm == kNormLayer || norm == kNormRms, kOp,
              ": norm must be 0 (none), 1 (layer norm) or 2 (RMS norm), got ", norm);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, kOp, ": eps must be finite and > 0, got ", eps);
  TORCH_CHECK(cos.has_value() == sin.has_value(), kOp, ": cos and sin must be given together");
  const bool rope = cos.has_value();
  TORCH_CHECK(!half_style || rope, kOp, ": half_style needs the RoPE tables cos and sin");
  TORCH_CHECK(!rope || D % 2 == 0, kOp, ": RoPE needs an even head dim D, got ", D);

  // Side tensors: one shared dtype, q's or float32.
  struct Side {
    const char* name;
    const std::optional<at::Tensor>* t;
    bool per_row;  // cos/sin: q's shape (stride-0 views); weights/biases: [D]
  };
  const Side sides[] = {{"q_weight", &q_weight, false}, {"q_bias", &q_bias, false}, {"k_weight", &k_weight, false},
                        {"k_bias", &k_bias, false},     {"cos", &cos, true},        {"sin", &sin, true}};
  const char* side_name = nullptr;
  at::ScalarType side_type = xt;
  for (const Side& s : sides) {
    if (!s.t->has_value()) continue;
    const at::Tensor& t = **s.t;
    check_device(s.name, t, q);
    if (s.per_row) {
      TORCH_CHECK(t.sizes() == q.sizes(), kOp, ": ", s.name, " must have q's shape ", q.sizes(),
                  " (pass the table expanded over the heads, a stride-0 view), got ", t.sizes());
      TORCH_CHECK(unit_last_stride(t), kOp, ": ", s.name, " must have stride 1 in its last dim, got strides ",
                  t.strides());
    } else {
      TORCH_CHECK(norm != kNormNone, kOp, ": ", s.name, " was given without a norm (norm=0)");
      TORCH_CHECK(t.dim() == 1 && t.size(0) == D, kOp, ": ", s.name, " must have shape [", D,
                  "] (q.size(-1)), got ", t.sizes());
      TORCH_CHECK(t.is_contiguous(), kOp, ": ", s.name, " must be contiguous, got strides ", t.strides());
    }
    const auto tt = t.scalar_type();
    if (side_name == nullptr) {
      TORCH_CHECK(tt == xt || tt == at::kFloat, kOp, ": ", s.name, " must have q's dtype ", xt, " or float32, got ",
                  tt);
      side_name = s.name;
      side_type = tt;
    } else {
      TORCH_CHECK(tt == side_type, kOp, ": the weights, biases, cos and sin must share one dtype, but ", side_name,
                  " is ", side_type, " and ", s.name, " is ", tt);
    }
  }
  if (rope) {
    // One table layout; the stride of a size-1 dim is never used (and may differ).
    for (int64_t d = 0; d < q.dim(); ++d) {
      TORCH_CHECK(q.size(d) == 1 || cos->stride(d) == sin->stride(d), kOp,
                  ": cos and sin must have the same strides (one table layout), got ", cos->strides(), " and ",
                  sin->strides());
    }
  }

  at::Tensor q_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor k_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  p.D = static_cast<int>(D);
  p.norm = static_cast<int>(norm);
  p.half_style = half_style;
  p.eps = static_cast<float>(eps);
  p.side_dtype = to_dtype(side_type, side_name == nullptr ? "q" : side_name);
  if (q.numel() == 0) return {q_out, k_out};

  p.rows = q.numel() / D;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  auto ptr = [](const std::optional<at::Tensor>& t) -> const void* {
    return t.has_value() ? t->const_data_ptr() : nullptr;
  };
  p.q_weight = ptr(q_weight);
  p.q_bias = ptr(q_bias);
  p.k_weight = ptr(k_weight);
  p.k_bias = ptr(k_bias);
  p.cos = ptr(cos);
  p.sin = ptr(sin);

  // Joint coalescing of the leading dims of q, k and the table; an absent table has all-zero strides,
  // which never block a merge.
  const int lead = static_cast<int>(q.dim()) - 1;
  std::vector<int64_t> zeros(static_cast<size_t>(lead), 0);
  const int64_t* const strides[kNumRowTensors] = {q.strides().data(), k.strides().data(),
                                                  rope ? cos->strides().data() : zeros.data()};
  TORCH_CHECK(coalesce_rows<kNumRowTensors>(lead, q.sizes().data(), strides, p.layout), kOp,
              ": the leading dims of q, k and the RoPE table coalesce to more than ", kMaxRowDims,
              " dims (q shape ", q.sizes(), ", strides ", q.strides(), "); make some of them contiguous first");
  return {q_out, k_out};
}

}  // namespace qknr
}  // namespace i2v
