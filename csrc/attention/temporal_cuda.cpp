// CUDA binding of _temporal_attention_fwd: argument checks, device guard, current stream, launch
// (temporal_cuda_kernel.cu) and launch check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "attention/temporal_params.h"

namespace i2v {
namespace attention {
namespace {

void check_video(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 5, "_temporal_attention_fwd: ", name, " must be [B, T, S, H, D], got ", t.dim(), " dims");
  TORCH_CHECK(t.sizes() == q.sizes(), "_temporal_attention_fwd: ", name, " must have q's shape ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "_temporal_attention_fwd: ", name,
              " must be on q's CUDA device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "_temporal_attention_fwd: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(4) == 1 || t.size(4) == 1, "_temporal_attention_fwd: ", name,
              " must have unit stride on the head dim D, got strides ", t.strides());
}

at::Tensor temporal_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                       bool causal) {
  check_video("q", q, q);
  check_video("k", k, q);
  check_video("v", v, q);
  DType dtype;
  switch (q.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat; break;
    case at::kHalf: dtype = DType::kHalf; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    default:
      TORCH_CHECK(false, "_temporal_attention_fwd: q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  TORCH_CHECK(q.size(1) <= kTemporalMaxT, "_temporal_attention_fwd: T = ", q.size(1),
              " frames exceeds the CUDA kernel's limit of ", kTemporalMaxT);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  const int64_t max_smem = temporal_max_smem(q.device().index());
  TORCH_CHECK(temporal_smem_per_warp(q.size(1), q.size(4), static_cast<int>(q.element_size())) <= max_smem,
              "_temporal_attention_fwd: T * D = ", q.size(1), " * ", q.size(4),
              " does not fit one warp's shared memory on this GPU (", max_smem, " bytes)");
  TemporalParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.B = q.size(0);
  p.T = q.size(1);
  p.S = q.size(2);
  p.H = q.size(3);
  p.D = q.size(4);
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
    p.o_stride[i] = out.stride(i);
  }
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.dtype = dtype;
  const char* err = temporal_attention_cuda(p, max_smem, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(err == nullptr, "_temporal_attention_fwd: CUDA kernel launch failed: ", err);
  return out;
}

}  // namespace
}  // namespace attention
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CUDA, m) {
  m.impl("_temporal_attention_fwd", &i2v::attention::temporal_attention_fwd_cuda);
}
