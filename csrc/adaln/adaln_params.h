// Arguments of the fused adaLN forward, as seen by the kernels (CPU and CUDA).
//
// Plain C++ only: this header is included by the .cu file, which must stay free of torch headers.
// The host bindings (adaln_common.cpp) validate the tensors and fill an AdalnParams; the kernels
// read it. Layout conventions:
//   x, y, gate, shift, scale  [rows, C] reached through `layout` (row offsets in elements, int64),
//                             last dim contiguous; absent tensors are null.
//   weight, bias              [C], contiguous; null when absent.
//   out, residual             [rows, C], contiguous; residual is null when not produced.
#pragma once

#include <cstdint>

#include "common/rows.h"

namespace i2v {
namespace adaln {

// Index of each row-strided input in AdalnParams::layout.strides.
enum RowTensor : int { kX = 0, kY = 1, kGate = 2, kShift = 3, kScale = 4, kNumRowTensors = 5 };

enum Norm : int { kNormNone = 0, kNormLayer = 1, kNormRms = 2 };

// Element types the kernels are instantiated for (the .cu cannot see at::ScalarType).
enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

struct AdalnParams {
  void* out = nullptr;
  void* residual = nullptr;
  const void* x = nullptr;
  const void* y = nullptr;
  const void* gate = nullptr;
  const void* shift = nullptr;
  const void* scale = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  int64_t rows = 0;
  int64_t C = 0;
  RowLayout<kNumRowTensors> layout;
  int norm = kNormNone;
  double eps = 0.0;
  DType x_dtype = DType::kFloat;
  // dtype of every modulation tensor present (gate, shift, scale, weight, bias): x_dtype or kFloat.
  DType mod_dtype = DType::kFloat;
};

// CUDA launcher (adaln_cuda_kernel.cu). `stream` is the cudaStream_t to launch on. Returns nullptr on
// success, else a static error message (the caller raises it). Requires p.rows > 0.
const char* adaln_fwd_cuda(const AdalnParams& p, void* stream);

}  // namespace adaln
}  // namespace i2v
