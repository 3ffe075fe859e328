// Row addressing for "[..., C]" kernels whose inputs are arbitrary strided views.
//
// A kernel that works one row of C contiguous channels at a time sees the leading dims of x (all but
// the last) as a flat row index. Every input may reach its rows through different strides (a sliced x,
// a per-sample shift expanded with stride 0, ...), so the leading dims are coalesced jointly over all
// inputs and each kernel turns a row index into one int64 element offset per input.
//
// Plain C++ (no torch headers): it is shared by the host bindings, the CPU kernels and the .cu files.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define I2V_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define I2V_HOST_DEVICE inline
#endif

// Full unrolling of a loop with a constant trip count, in nvcc and in GCC/Clang host code.
#if defined(__CUDACC__)
#define I2V_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define I2V_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define I2V_UNROLL _Pragma("GCC unroll 16")
#else
#define I2V_UNROLL
#endif

namespace i2v {

// Most coalesced leading dims a RowLayout can hold. Broadcasting patterns of video DiTs need at most 3
// ([B, T, S, C] x with a per-frame [B, T, 1, C] modulation); the rest is headroom.
constexpr int kMaxRowDims = 8;

// Coalesced leading dims of NT row-strided tensors, stored innermost first: row index r has
// coordinate (r / prod(sizes[0..d))) % sizes[d] along dim d. Strides are in elements.
template <int NT>
struct RowLayout {
  int ndim = 0;
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[NT][kMaxRowDims] = {};

  // Element offset of row `row` in every tensor. The dim loop is fully unrolled so that device code
  // indexes the (kernel-parameter) arrays with constants only.
  I2V_HOST_DEVICE void offsets(int64_t row, int64_t (&off)[NT]) const {
    I2V_UNROLL
    for (int t = 0; t < NT; ++t) off[t] = 0;
    I2V_UNROLL
    for (int d = 0; d < kMaxRowDims; ++d) {
      if (d < ndim) {
        int64_t idx = row;  // the outermost dim needs no modulo: row < prod(sizes)
        if (d + 1 < ndim) {
          const int64_t size = sizes[d];
          // One 32-bit division when both fit (64-bit division is a long instruction sequence on GPUs).
          const int64_t quot = ((row | size) >> 32) == 0
                                   ? static_cast<int64_t>(static_cast<uint32_t>(row) / static_cast<uint32_t>(size))
                                   : row / size;
          idx = row - quot * size;
          row = quot;
        }
        I2V_UNROLL
        for (int t = 0; t < NT; ++t) off[t] += idx * strides[t][d];
      }
    }
  }
};

// Builds the RowLayout of NT tensors that share the leading sizes `sizes[0..ndim)` (outermost first,
// the layout of torch's sizes()) and have per-tensor strides `strides[t][0..ndim)`. Size-1 dims are
// dropped; dim i is merged into dim i+1 when stride[i] == stride[i+1] * size[i+1] for every tensor.
// Returns false when more than kMaxRowDims dims remain (the layout is then unusable).
template <int NT>
inline bool coalesce_rows(int ndim, const int64_t* sizes, const int64_t* const (&strides)[NT],
                          RowLayout<NT>& out) {
  out = RowLayout<NT>();
  int n = 0;
  for (int i = ndim - 1; i >= 0; --i) {  // innermost leading dim first
    const int64_t size = sizes[i];
    if (size == 1) continue;
    bool mergeable = n > 0;
    for (int t = 0; t < NT && mergeable; ++t) {
      mergeable = strides[t][i] == out.strides[t][n - 1] * out.sizes[n - 1];
    }
    if (mergeable) {
      out.sizes[n - 1] *= size;  // keeps the inner dim's strides
      continue;
    }
    if (n == kMaxRowDims) return false;
    out.sizes[n] = size;
    for (int t = 0; t < NT; ++t) out.strides[t][n] = strides[t][i];
    ++n;
  }
  out.ndim = n;
  return true;
}

}  // namespace i2v
