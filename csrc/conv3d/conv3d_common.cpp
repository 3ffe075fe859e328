// Causal 3D convolution forward on ATen ops (conv3d_common.h), shared by conv3d_cpu.cpp and
// conv3d_cuda.cpp. The argument checks mirror _check in i2v_kernels/ops/conv3d/__init__.py.
#include "conv3d/conv3d_common.h"

#include <array>
#include <vector>

#include <ATen/Context.h>
#include <ATen/ops/add.h>
#include <ATen/ops/conv3d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mkldnn_convolution.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/strides.h>

namespace i2v {
namespace conv3d {
namespace {

constexpr const char* kOp = "_causal_conv3d_fwd";

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " must be a defined tensor");
  TORCH_CHECK(is_float(t.scalar_type()), kOp, ": ", name,
              " must be a floating-point tensor (float16/bfloat16/float32/float64), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move them to one device");
}

std::array<int64_t, 3> check_triple(const char* name, c10::IntArrayRef v) {
  TORCH_CHECK(v.size() == 3, kOp, ": ", name, " must be a (t, h, w) triple of ints, got ", v);
  for (const int64_t a : v) TORCH_CHECK(a >= 1, kOp, ": ", name, " must be positive, got ", v);
  return {v[0], v[1], v[2]};
}

}  // namespace

at::Tensor causal_conv3d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& cache, const std::optional<at::Tensor>& residual,
                                 c10::IntArrayRef stride_arg, c10::IntArrayRef dilation_arg, int64_t time_pad,
                                 c10::DeviceType device_type) {
  // ---- argument checks (as the Python op's _check) ----
  TORCH_CHECK(x.defined() && x.device().type() == device_type, kOp, ": x must be a ", c10::DeviceTypeName(device_type),
              " tensor for this kernel, got ", x.defined() ? x.device().str() : std::string("an undefined tensor"));
  check_tensor("x", x, x);
  TORCH_CHECK(x.dim() == 5, kOp, ": x must be [B, Cin, T, H, W] (5 dims), got shape ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(C >= 1 && T >= 1 && H >= 1 && W >= 1, kOp, ": x [B, Cin, T, H, W] needs Cin, T, H, W >= 1, got shape ",
              x.sizes());
  check_tensor("weight", weight, x);
  TORCH_CHECK(weight.dim() == 5, kOp, ": weight must be [Cout, Cin, kt, kh, kw] (5 dims), got shape ", weight.sizes());
  const int64_t Cout = weight.size(0), kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  TORCH_CHECK(weight.size(1) == C, kOp, ": weight must be [Cout, Cin=", C, ", kt, kh, kw] to match x's ", C,
              " channels (x is [B, Cin, T, H, W] = ", x.sizes(), "), got weight ", weight.sizes());
  TORCH_CHECK(Cout >= 1 && kt >= 1 && kh >= 1 && kw >= 1, kOp,
              ": weight [Cout, Cin, kt, kh, kw] needs Cout and kernel sizes >= 1, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kOp, ": weight must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  if (bias.has_value()) {
    check_tensor("bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout, kOp, ": bias must have shape (", Cout,
                ",) (Cout of weight), got ", bias->sizes());
  }
  const auto stride = check_triple("stride", stride_arg);
  const auto dilation = check_triple("dilation", dilation_arg);
  TORCH_CHECK(time_pad == kTimePadReplicate || time_pad == kTimePadZeros, kOp, ": time_pad must be ",
              kTimePadReplicate, " (replicate) or ", kTimePadZeros, " (zeros), got ", time_pad);
  const int64_t P = (kt - 1) * dilation[0];
  const int64_t ph = dilation[1] * (kh - 1) / 2, pw = dilation[2] * (kw - 1) / 2;
  const int64_t span_h = dilation[1] * (kh - 1) + 1, span_w = dilation[2] * (kw - 1) + 1;
  TORCH_CHECK(H + 2 * ph >= span_h, kOp, ": the kernel (size ", kh, ", dilation ", dilation[1], ") spans ", span_h,
              " pixels, more than the padded input's H = ", H, " + 2 * ", ph, "; x is ", x.sizes());
  TORCH_CHECK(W + 2 * pw >= span_w, kOp, ": the kernel (size ", kw, ", dilation ", dilation[2], ") spans ", span_w,
              " pixels, more than the padded input's W = ", W, " + 2 * ", pw, "; x is ", x.sizes());
  if (cache.has_value()) {
    check_tensor("cache", *cache, x);
    TORCH_CHECK(cache->sizes() == c10::IntArrayRef({B, C, P, H, W}), kOp, ": cache must be [B, Cin, P, H, W] = [", B,
                ", ", C, ", ", P, ", ", H, ", ", W, "] (P = (kt - 1) * dilation_t = ", P,
                " frames of the previous chunk), got ", cache->sizes());
    TORCH_CHECK(cache->scalar_type() == x.scalar_type(), kOp, ": cache must have x's dtype ", x.scalar_type(),
                ", got ", cache->scalar_type());
  }
  const std::vector<int64_t> out_sizes = {B, Cout, (T - 1) / stride[0] + 1, (H + 2 * ph - span_h) / stride[1] + 1,
                                          (W + 2 * pw - span_w) / stride[2] + 1};
  if (residual.has_value()) {
    check_tensor("residual", *residual, x);
    TORCH_CHECK(residual->sizes() == c10::IntArrayRef(out_sizes), kOp,
                ": residual must have the output's shape [B, Cout, T_out, H_out, W_out] = ", c10::IntArrayRef(out_sizes),
                ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), kOp, ": residual must have x's dtype ", x.scalar_type(),
                ", got ", residual->scalar_type());
  }

  // Output layout per device (the op's contract, as output_format() in ops/conv3d/__init__.py):
  // channels_last_3d on CUDA (what the next cuDNN conv reads fastest), NCDHW on CPU (what ATen's CPU
  // conv3d computes in, so neither this op nor the next conv pays a layout copy).
  const bool cpu = device_type == c10::DeviceType::CPU;
  const auto cl = c10::MemoryFormat::ChannelsLast3d;
  const auto out_options = x.options().memory_format(cpu ? c10::MemoryFormat::Contiguous : cl);
  if (B == 0) return at::empty(out_sizes, out_options);

  // ---- the temporally padded input, built once ----
  // Math dtype: x's, except fp16/bf16 on CPU, which run in fp32 as the reference does (the copy into
  // the padded buffer converts for free).
  const bool upcast =
      device_type == c10::DeviceType::CPU && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
  const at::ScalarType math = upcast ? at::kFloat : x.scalar_type();
  // Layout the convolution runs in (its output comes in the same one): channels_last_3d on CUDA (what
  // cuDNN's tensor-core kernels want). NCDHW on CPU: the layout the reference convolves in (torch.cat
  // makes it), and oneDNN's kernel for it measured 4-7% faster than its NDHWC one on VAE shapes.
  const bool channels_last = !cpu;
  at::Tensor input;
  if (P == 0) {
    input = x.to(math);  // no copy when x already has the math dtype
    if (channels_last) input = input.contiguous(cl);
  } else {
    const auto format = channels_last ? cl : c10::MemoryFormat::Contiguous;
    input = at::empty({B, C, P + T, H, W}, x.options().dtype(math).memory_format(format));
    input.narrow(2, P, T).copy_(x);
    at::Tensor front = input.narrow(2, 0, P);
    if (cache.has_value()) {
      front.copy_(*cache);
    } else if (time_pad == kTimePadReplicate) {
      front.copy_(input.narrow(2, P, 1).expand({B, C, P, H, W}));  // frame 0, already converted and laid out
    } else {
      front.zero_();
    }
  }

  // ---- convolution, bias, residual ----
  const std::optional<at::Tensor> conv_bias = bias.has_value() ? std::optional<at::Tensor>(bias->to(math)) : std::nullopt;
  // On CPU in fp32, oneDNN's convolution directly: ATen's conv3d sends convolutions with few channels
  // (the last decoder stages, up to ~64 channels) to its im2col kernel (slow_conv3d), measured 6-15x
  // slower than oneDNN there ([1, 16..32, 14, 26..50, 34..66], 3x3x3, 2 threads). Where ATen's own
  // choice is faster (e.g. a 3x1x1 time conv of 384 channels on an 8x12 crop), measured dispatch picks
  // the `native` backend, which calls F.conv3d as eager code does. fp64 (no oneDNN kernel) and a
  // build or a user (torch.backends.mkldnn) without oneDNN take at::conv3d.
  const std::vector<int64_t> conv_stride = {stride[0], stride[1], stride[2]};
  const std::vector<int64_t> conv_padding = {0, ph, pw};
  const std::vector<int64_t> conv_dilation = {dilation[0], dilation[1], dilation[2]};
  const bool onednn = cpu && math == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
  at::Tensor y = onednn ? at::mkldnn_convolution(input.contiguous(), weight.to(math).contiguous(), conv_bias,
                                                 conv_padding, conv_stride, conv_dilation, 1)
                        : at::conv3d(input, weight.to(math), conv_bias, conv_stride, conv_padding, conv_dilation, 1);
  TORCH_CHECK(y.sizes() == c10::IntArrayRef(out_sizes), kOp, ": internal error: convolution output ", y.sizes(),
              ", expected ", c10::IntArrayRef(out_sizes));
  // The residual is added in the math dtype (fp32 for fp16/bf16 on CPU, as the reference), in place or
  // fused with the one copy to the output's dtype and layout.
  const c10::IntArrayRef sizes(out_sizes);
  const c10::DimVector out_strides =
      cpu ? c10::contiguous_strides(sizes) : c10::DimVector(c10::IntArrayRef(c10::get_channels_last_strides_3d(sizes)));
  if (y.scalar_type() == x.scalar_type() && y.strides() == c10::IntArrayRef(out_strides)) {
    if (residual.has_value()) y.add_(*residual);
    return y;
  }
  at::Tensor out = at::empty(out_sizes, out_options);
  if (residual.has_value()) {
    at::add_out(out, y, *residual);
  } else {
    out.copy_(y);
  }
  return out;
}

}  // namespace conv3d
}  // namespace i2v
