// Arguments of the QK-norm + RoPE forward (_qk_norm_rope_fwd) and the per-row math shared by the CPU
// and CUDA kernels.
//
// Plain C++ only (no torch headers): this header is included by the .cu file. The host bindings
// (qk_norm_rope_common.cpp) validate the tensors and fill a QkNormRopeParams; both kernels run
// `norm_rope_row` below, so the CPU build tests the arithmetic, the pair layout, the masking and the
// access-width choice that the GPU runs (the CUDA kernel adds only the lane mapping and the warp sums).
//
// Formula, for q and for k (each row is one head vector of D elements):
//   n = norm(x) * weight + bias                 LayerNorm (norm 1) or RMSNorm (norm 2) over D
//   y = n * cos + rotate(n) * sin               rotate = (-b, a) for each pair (a, b)
// with pairs (x[2i], x[2i + 1]) (interleaved) or (x[i], x[i + D/2]) (half style). Statistics and
// math in fp32; outputs in q's dtype.
//
// Layout conventions:
//   q, k, cos, sin  [rows, D] reached through `layout` (row offsets in elements, int64), unit stride
//                   on D; cos and sin share one set of strides (the table, read with stride 0 across
//                   heads); cos/sin null when there is no RoPE.
//   weights/biases  [D], contiguous; null when absent.
//   q_out, k_out    [rows, D], contiguous.
#pragma once

#include <cstdint>

#include "common/rows.h"

namespace i2v {
namespace qknr {

// Index of each row-strided input in QkNormRopeParams::layout.strides.
enum RowTensor : int { kQ = 0, kK = 1, kTable = 2, kNumRowTensors = 3 };

enum Norm : int { kNormNone = 0, kNormLayer = 1, kNormRms = 2 };

// Element types (the .cu cannot see at::ScalarType).
enum class DType : int { kFloat = 0, kHalf = 2, kBFloat16 = 3 };

// Widest head dim the kernels take: 8 values a lane of a 32-lane row group (CUDA), 256 on the CPU.
constexpr int kMaxD = 256;
// fp32 values of one tensor a lane holds (the CUDA kernel keeps q's and k's row and the table in
// registers: about 4 * kLaneValues floats).
constexpr int kLaneValues = 8;

struct QkNormRopeParams {
  const void* q = nullptr;
  const void* k = nullptr;
  void* q_out = nullptr;
  void* k_out = nullptr;
  const void* q_weight = nullptr;
  const void* q_bias = nullptr;
  const void* k_weight = nullptr;
  const void* k_bias = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t rows = 0;
  int D = 0;
  RowLayout<kNumRowTensors> layout;
  int norm = kNormNone;
  bool half_style = false;  // only with RoPE
  float eps = 0.f;
  DType x_dtype = DType::kFloat;
  // dtype of every side tensor present (weights, biases, cos, sin): x_dtype or kFloat.
  DType side_dtype = DType::kFloat;
};

// ---------------------------------------------------------------------------------------------------
// Units: the slice of a row one lane handles at a time, VEC elements (one memory access) wide.
//
// Interleaved: a unit is max(VEC, 2) consecutive elements, i.e. P = max(VEC / 2, 1) whole pairs.
// Half style:  a unit is VEC elements of the first half (the a's) and the VEC elements D/2 further on
//              (their b's): P = VEC pairs.
// A lane keeps ITERS units of a row, ITERS * 2P >= kLaneValues values.

template <int VEC, bool HALF>
struct Unit {
  static constexpr int P = HALF ? VEC : (VEC >= 2 ? VEC / 2 : 1);  // pairs per unit
  static constexpr int WIDTH = 2 * P;                               // elements per unit
  static constexpr int LANE_ITERS = (kLaneValues + WIDTH - 1) / WIDTH;   // units a CUDA lane keeps
  static constexpr int ROW_ITERS = (kMaxD + WIDTH - 1) / WIDTH;          // units of the widest row

  // Units in a row of D elements (the last one partial only for VEC == 1 and odd D, without RoPE).
  I2V_HOST_DEVICE static int count(int D) { return HALF ? (D / 2) / VEC : (D + WIDTH - 1) / WIDTH; }
};

// The widest access VEC (elements of x, a power of two up to 16 bytes) that every row of every tensor
// allows: D (D/2 for the half style) a multiple of VEC, each row-strided tensor's strides multiples of
// VEC, and each base pointer aligned to the access size (16 bytes at most: VEC fp32 values of a side
// tensor next to 16-bit x are two 16-byte accesses). Shared by the CPU kernel (which checks the
// alignment on every access) and the CUDA launcher.
inline int access_width(const QkNormRopeParams& p, int x_size, int side_size) {
  const void* row_ptrs[kNumRowTensors] = {p.q, p.k, p.cos};
  const int row_sizes[kNumRowTensors] = {x_size, x_size, side_size};
  const void* flat_ptrs[] = {p.q_out, p.k_out, p.sin, p.q_weight, p.q_bias, p.k_weight, p.k_bias};
  const int flat_sizes[] = {x_size, x_size, side_size, side_size, side_size, side_size, side_size};
  for (int vec = 16 / x_size; vec >= 2; vec /= 2) {
    const int span = p.half_style ? p.D / 2 : p.D;
    bool ok = span % vec == 0;
    for (int t = 0; t < kNumRowTensors && ok; ++t) {
      if (row_ptrs[t] == nullptr) continue;
      const int align = vec * row_sizes[t] < 16 ? vec * row_sizes[t] : 16;
      ok = reinterpret_cast<uintptr_t>(row_ptrs[t]) % align == 0;
      for (int d = 0; d < p.layout.ndim && ok; ++d) ok = p.layout.strides[t][d] % vec == 0;
    }
    for (int i = 0; i < 7 && ok; ++i) {
      const int align = vec * flat_sizes[i] < 16 ? vec * flat_sizes[i] : 16;
      ok = flat_ptrs[i] == nullptr || reinterpret_cast<uintptr_t>(flat_ptrs[i]) % align == 0;
    }
    if (ok) return vec;
  }
  return 1;
}

// ---------------------------------------------------------------------------------------------------
// The row routine. `Ops` supplies the memory accesses and the sum over the lanes of a row:
//   template <typename X, int N> static void load(const X* ptr, float (&out)[N]);   N consecutive
//   template <typename X, int N> static void store(X* ptr, const float (&in)[N]);
//   static float lanes_sum(float v);   the sum over the lanes that share the row (identity on the CPU)
//   static float rsqrt(float v);
// Every lane of a row group must call norm_rope_row the same way (the sums are collective), valid
// row or not.

#if defined(__CUDACC__)
#define I2V_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define I2V_HD_TEMPLATE
#endif

// Pairs (a, b) of unit u of the row at `ptr` (zeros where out of range).
I2V_HD_TEMPLATE
template <typename X, int VEC, bool HALF, typename Ops>
I2V_HOST_DEVICE void load_unit(const X* ptr, int u, int D, float (&a)[Unit<VEC, HALF>::P],
                               float (&b)[Unit<VEC, HALF>::P]) {
  using U = Unit<VEC, HALF>;
  if constexpr (HALF) {
    Ops::template load<X, VEC>(ptr + u * VEC, a);
    Ops::template load<X, VEC>(ptr + D / 2 + u * VEC, b);
  } else if constexpr (VEC >= 2) {
    float v[U::WIDTH];
    Ops::template load<X, U::WIDTH>(ptr + u * U::WIDTH, v);
    I2V_UNROLL
    for (int j = 0; j < U::P; ++j) {
      a[j] = v[2 * j];
      b[j] = v[2 * j + 1];
    }
  } else {
    // scalar: the pair's second element is missing at the end of an odd row (no RoPE then)
    Ops::template load<X, 1>(ptr + 2 * u, reinterpret_cast<float(&)[1]>(a[0]));
    b[0] = 0.f;
    if (2 * u + 1 < D) Ops::template load<X, 1>(ptr + 2 * u + 1, reinterpret_cast<float(&)[1]>(b[0]));
  }
}

I2V_HD_TEMPLATE
template <typename X, int VEC, bool HALF, typename Ops>
I2V_HOST_DEVICE void store_unit(X* ptr, int u, int D, const float (&a)[Unit<VEC, HALF>::P],
                                const float (&b)[Unit<VEC, HALF>::P]) {
  using U = Unit<VEC, HALF>;
  if constexpr (HALF) {
    Ops::template store<X, VEC>(ptr + u * VEC, a);
    Ops::template store<X, VEC>(ptr + D / 2 + u * VEC, b);
  } else if constexpr (VEC >= 2) {
    float v[U::WIDTH];
    I2V_UNROLL
    for (int j = 0; j < U::P; ++j) {
      v[2 * j] = a[j];
      v[2 * j + 1] = b[j];
    }
    Ops::template store<X, U::WIDTH>(ptr + u * U::WIDTH, v);
  } else {
    Ops::template store<X, 1>(ptr + 2 * u, reinterpret_cast<const float(&)[1]>(a[0]));
    if (2 * u + 1 < D) Ops::template store<X, 1>(ptr + 2 * u + 1, reinterpret_cast<const float(&)[1]>(b[0]));
  }
}

// Whether element b of pair j of unit u exists (false only past the end of an odd row).
template <int VEC, bool HALF>
I2V_HOST_DEVICE bool b_exists(int u, int D) {
  return HALF || VEC >= 2 || 2 * u + 1 < D;
}

// Normalizes, applies the affine and rotates one row held as ITERS units (unit it is u = lane + it *
// lanes; `have[it]` says it exists), in place. cos/sin: the table's units (used when rope).
I2V_HD_TEMPLATE
template <typename S, int VEC, bool HALF, int ITERS, typename Ops>
I2V_HOST_DEVICE void norm_rope_values(const QkNormRopeParams& p, const S* weight, const S* bias, int lane,
                                      int lanes, bool rope, float (&a)[ITERS][Unit<VEC, HALF>::P],
                                      float (&b)[ITERS][Unit<VEC, HALF>::P],
                                      const float (&ca)[ITERS][Unit<VEC, HALF>::P],
                                      const float (&cb)[ITERS][Unit<VEC, HALF>::P],
                                      const float (&sa)[ITERS][Unit<VEC, HALF>::P],
                                      const float (&sb)[ITERS][Unit<VEC, HALF>::P], const bool (&have)[ITERS]) {
  using U = Unit<VEC, HALF>;
  const int D = p.D;
  if (p.norm != kNormNone) {
    const float inv_D = 1.f / static_cast<float>(D);
    float mean = 0.f;
    if (p.norm == kNormLayer) {
      float s = 0.f;
      I2V_UNROLL
      for (int it = 0; it < ITERS; ++it) {
        I2V_UNROLL
        for (int j = 0; j < U::P; ++j) s += a[it][j] + b[it][j];  // absent values are 0
      }
      mean = Ops::lanes_sum(s) * inv_D;
    }
    float ss = 0.f;
    I2V_UNROLL
    for (int it = 0; it < ITERS; ++it) {
      const int u = lane + it * lanes;
      I2V_UNROLL
      for (int j = 0; j < U::P; ++j) {
        // centred values, 0 where absent (they must not add mean^2 to the sum)
        a[it][j] = have[it] ? a[it][j] - mean : 0.f;
        b[it][j] = have[it] && b_exists<VEC, HALF>(u, D) ? b[it][j] - mean : 0.f;
        ss += a[it][j] * a[it][j] + b[it][j] * b[it][j];
      }
    }
    ss = Ops::lanes_sum(ss) * inv_D;
    // + ss * 0: an infinity NaNs the whole row under RMSNorm as under LayerNorm (docs/SEMANTICS.md)
    const float rstd = p.norm == kNormLayer ? Ops::rsqrt(ss + p.eps) : Ops::rsqrt(ss + p.eps) + ss * 0.f;
    I2V_UNROLL
    for (int it = 0; it < ITERS; ++it) {
      const int u = lane + it * lanes;
      float wa[U::P] = {}, wb[U::P] = {}, ba[U::P] = {}, bb[U::P] = {};  // set where used
      if (have[it] && weight != nullptr) {
        load_unit<S, VEC, HALF, Ops>(weight, u, D, wa, wb);
      }
      if (have[it] && bias != nullptr) {
        load_unit<S, VEC, HALF, Ops>(bias, u, D, ba, bb);
      }
      I2V_UNROLL
      for (int j = 0; j < U::P; ++j) {
        a[it][j] *= rstd;
        b[it][j] *= rstd;
        if (have[it] && weight != nullptr) {
          a[it][j] *= wa[j];
          b[it][j] *= wb[j];
        }
        if (have[it] && bias != nullptr) {
          a[it][j] += ba[j];
          b[it][j] += bb[j];
        }
      }
    }
  }
  if (rope) {
    I2V_UNROLL
    for (int it = 0; it < ITERS; ++it) {
      I2V_UNROLL
      for (int j = 0; j < U::P; ++j) {
        const float x0 = a[it][j];
        const float x1 = b[it][j];
        a[it][j] = x0 * ca[it][j] - x1 * sa[it][j];
        b[it][j] = x1 * cb[it][j] + x0 * sb[it][j];
      }
    }
  }
}

// One row of q and the same row of k (they share the table row): loads, math, stores. `lane` of
// `lanes` lanes that share the row; valid == false: a padding row of the lane group (nothing is read
// or written, the collective sums still run). Every load comes before the first store: the compiler
// cannot tell that q_out does not alias k, so a store in between would hold back k's loads.
I2V_HD_TEMPLATE
template <typename T, typename S, int VEC, bool HALF, int ITERS, typename Ops>
I2V_HOST_DEVICE void norm_rope_row(const QkNormRopeParams& p, int64_t row, bool valid, int lane, int lanes) {
  using U = Unit<VEC, HALF>;
  const int D = p.D;
  const int units = U::count(D);
  int64_t off[kNumRowTensors] = {0, 0, 0};
  if (valid) p.layout.offsets(row, off);
  bool have[ITERS];
  I2V_UNROLL
  for (int it = 0; it < ITERS; ++it) have[it] = valid && lane + it * lanes < units;

  const bool rope = p.cos != nullptr;
  const T* q = static_cast<const T*>(p.q) + off[kQ];
  const T* k = static_cast<const T*>(p.k) + off[kK];
  float qa[ITERS][U::P], qb[ITERS][U::P], ka[ITERS][U::P], kb[ITERS][U::P];
  float ca[ITERS][U::P], cb[ITERS][U::P], sa[ITERS][U::P], sb[ITERS][U::P];
  I2V_UNROLL
  for (int it = 0; it < ITERS; ++it) {
    const int u = lane + it * lanes;
    if (have[it]) {
      load_unit<T, VEC, HALF, Ops>(q, u, D, qa[it], qb[it]);
      load_unit<T, VEC, HALF, Ops>(k, u, D, ka[it], kb[it]);
    } else {
      I2V_UNROLL
      for (int j = 0; j < U::P; ++j) qa[it][j] = qb[it][j] = ka[it][j] = kb[it][j] = 0.f;
    }
    if (rope && have[it]) {
      load_unit<S, VEC, HALF, Ops>(static_cast<const S*>(p.cos) + off[kTable], u, D, ca[it], cb[it]);
      load_unit<S, VEC, HALF, Ops>(static_cast<const S*>(p.sin) + off[kTable], u, D, sa[it], sb[it]);
    } else {
      I2V_UNROLL
      for (int j = 0; j < U::P; ++j) ca[it][j] = cb[it][j] = sa[it][j] = sb[it][j] = 0.f;
    }
  }

  norm_rope_values<S, VEC, HALF, ITERS, Ops>(p, static_cast<const S*>(p.q_weight), static_cast<const S*>(p.q_bias),
                                             lane, lanes, rope, qa, qb, ca, cb, sa, sb, have);
  norm_rope_values<S, VEC, HALF, ITERS, Ops>(p, static_cast<const S*>(p.k_weight), static_cast<const S*>(p.k_bias),
                                             lane, lanes, rope, ka, kb, ca, cb, sa, sb, have);
  T* q_out = static_cast<T*>(p.q_out) + row * D;
  T* k_out = static_cast<T*>(p.k_out) + row * D;
  I2V_UNROLL
  for (int it = 0; it < ITERS; ++it) {
    if (have[it]) {
      store_unit<T, VEC, HALF, Ops>(q_out, lane + it * lanes, D, qa[it], qb[it]);
      store_unit<T, VEC, HALF, Ops>(k_out, lane + it * lanes, D, ka[it], kb[it]);
    }
  }
}

// CUDA launcher (qk_norm_rope_cuda_kernel.cu). `stream` is the cudaStream_t to launch on. Returns
// nullptr on success, else a static error message (the caller raises it). Requires p.rows > 0.
const char* qk_norm_rope_fwd_cuda(const QkNormRopeParams& p, void* stream);

}  // namespace qknr
}  // namespace i2v
