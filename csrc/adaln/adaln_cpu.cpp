// CPU kernel of the fused adaLN forward (_adaln_fwd; formula in csrc/ops.cpp).
//
// Rows are split across threads with at::parallel_for. Per row: r = x + gate * y goes to a thread-local
// buffer in the math type (fp32, fp64 for double), the statistics are taken from that buffer (two
// passes for layer norm: mean, then sum((r - mean)^2)), and one last pass writes
//   out = ((r - mean) * rstd * weight + bias) * (1 + scale) + shift.
// When scale/shift repeat over consecutive rows (per-sample or per-frame modulation, or none), that
// pass reads per-channel coefficients mul = weight * (1 + scale), add = bias * (1 + scale) + shift,
// rebuilt only when the modulation row changes; per-token modulation is read directly. Absent terms
// read from per-thread arrays of ones or zeros (x * 1 + 0 is exact, so this equals skipping them).
//
// All loops run over contiguous arrays and are written for GCC's auto-vectorizer (reductions keep 32
// independent partial sums). fp16/bf16 are converted with integer bit operations that
// vectorize. The row loop is compiled for baseline x86-64, AVX2 and AVX-512, chosen at run time, so
// the binary runs on any x86-64 CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "adaln/adaln_common.h"
#include "adaln/adaln_params.h"

#if defined(__GNUC__)
#define I2V_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define I2V_ALWAYS_INLINE inline
#endif

// Define I2V_ADALN_NO_CLONES to build only the baseline x86-64 loops (used to test that path).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(I2V_ADALN_NO_CLONES)
#define I2V_ADALN_X86_CLONES 1
#endif

namespace i2v {
namespace adaln {
namespace {

I2V_ALWAYS_INLINE float bits_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

I2V_ALWAYS_INLINE uint32_t float_as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// IEEE binary16 -> binary32, exact. Subnormal halves go through an int -> float conversion rather than
// float subnormal arithmetic, so the result does not depend on the FTZ/DAZ mode.
I2V_ALWAYS_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;                    // exponent and mantissa
  const uint32_t normal = (mag << 13) + (112u << 23);  // rebias the exponent: 127 - 15 = 112
  const uint32_t inf_nan = (mag << 13) | 0x7f800000u;  // keeps the NaN payload
  const uint32_t subnormal = float_as_bits(static_cast<float>(static_cast<int32_t>(mag)) * 0x1p-24f);
  const uint32_t bits = mag >= 0x7c00u ? inf_nan : (mag >= 0x0400u ? normal : subnormal);
  return bits_as_float(bits | sign);
}

// binary32 -> binary16, round to nearest even; NaN -> quiet NaN, overflow -> inf.
I2V_ALWAYS_INLINE uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7fffffffu;
  // Normal range [2^-14, 65520): rebias the exponent, then round the 13 dropped mantissa bits to
  // nearest even (a carry into the exponent is the correct result).
  const uint32_t rebiased = mag - (112u << 23);
  const uint32_t normal = (rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13;
  // Below 2^-14: adding 0.5 puts round(|f| * 2^24) (nearest even, the FPU's rounding) into the low
  // mantissa bits of the sum.
  const uint32_t subnormal = float_as_bits(bits_as_float(mag) + 0.5f) - 0x3f000000u;
  uint32_t bits = mag >= 0x38800000u ? normal : subnormal;
  bits = mag >= 0x477ff000u ? 0x7c00u : bits;  // |f| >= 65520 rounds to inf
  bits = mag > 0x7f800000u ? 0x7e00u : bits;   // NaN
  return static_cast<uint16_t>(bits | sign);
}

I2V_ALWAYS_INLINE float bf16_bits_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN -> quiet NaN (as c10::BFloat16).
I2V_ALWAYS_INLINE uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// Storage type of each element type and its conversions to/from the math type A.
template <typename T>
struct Io {  // float, double
  using storage = T;
  template <typename A>
  static I2V_ALWAYS_INLINE A load(T v) {
    return static_cast<A>(v);
  }
  template <typename A>
  static I2V_ALWAYS_INLINE T store(A v) {
    return static_cast<T>(v);
  }
  static constexpr storage one() { return T(1); }
};

template <>
struct Io<c10::Half> {
  using storage = uint16_t;
  template <typename A>
  static I2V_ALWAYS_INLINE A load(uint16_t v) {
    return static_cast<A>(half_bits_to_float(v));
  }
  template <typename A>
  static I2V_ALWAYS_INLINE uint16_t store(A v) {
    return float_to_half_bits(static_cast<float>(v));
  }
  static constexpr storage one() { return 0x3c00u; }
};

template <>
struct Io<c10::BFloat16> {
  using storage = uint16_t;
  template <typename A>
  static I2V_ALWAYS_INLINE A load(uint16_t v) {
    return static_cast<A>(bf16_bits_to_float(v));
  }
  template <typename A>
  static I2V_ALWAYS_INLINE uint16_t store(A v) {
    return float_to_bf16_bits(static_cast<float>(v));
  }
  static constexpr storage one() { return 0x3f80u; }
};

// fp32 math for float/half/bfloat16, fp64 for double (at::opmath_type).
template <typename T>
using acc_type = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Sums over a row keep kLanes independent partial sums: enough accumulators to hide the add latency
// once vectorized, and one summation order for every instruction set (FMA contraction aside).
constexpr int64_t kLanes = 32;

template <typename A>
I2V_ALWAYS_INLINE A reduce_lanes(A (&acc)[kLanes]) {
  I2V_UNROLL
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    I2V_UNROLL
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

// sum((r - mean)^2) over a row buffer.
template <typename A>
I2V_ALWAYS_INLINE A row_sum_sq_dev(const A* __restrict__ r, int64_t C, A mean) {
  A acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    I2V_UNROLL
    for (int64_t j = 0; j < kLanes; ++j) {
      const A d = r[c + j] - mean;
      acc[j] += d * d;
    }
  }
  // The tail goes to its own accumulator: indexing acc with a run-time index would keep it in memory.
  A tail = 0;
  for (; c < C; ++c) {
    const A d = r[c] - mean;
    tail += d * d;
  }
  return reduce_lanes(acc) + tail;
}

template <typename scalar_t, typename mod_t, bool kY, bool kGate>
I2V_ALWAYS_INLINE acc_type<scalar_t> residual_elem(const typename Io<scalar_t>::storage* __restrict__ xr,
                                                   const typename Io<scalar_t>::storage* __restrict__ yr,
                                                   const typename Io<mod_t>::storage* __restrict__ gr, int64_t c) {
  using A = acc_type<scalar_t>;
  A v = Io<scalar_t>::template load<A>(xr[c]);
  if constexpr (kY) {
    const A yv = Io<scalar_t>::template load<A>(yr[c]);
    if constexpr (kGate) {
      v += Io<mod_t>::template load<A>(gr[c]) * yv;
    } else {
      v += yv;
    }
  }
  return v;
}

// r = x + gate * y into the row buffer; returns sum(r) (squares = false) or sum(r^2) (squares = true).
// A run-time select rather than a template flag: it costs one blend a vector and halves the number of
// instantiated loops.
template <typename scalar_t, typename mod_t, bool kY, bool kGate>
I2V_ALWAYS_INLINE acc_type<scalar_t> load_row(const typename Io<scalar_t>::storage* __restrict__ xr,
                                              const typename Io<scalar_t>::storage* __restrict__ yr,
                                              const typename Io<mod_t>::storage* __restrict__ gr,
                                              acc_type<scalar_t>* __restrict__ r, int64_t C, bool squares) {
  using A = acc_type<scalar_t>;
  A acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    I2V_UNROLL
    for (int64_t j = 0; j < kLanes; ++j) {
      const A v = residual_elem<scalar_t, mod_t, kY, kGate>(xr, yr, gr, c + j);
      r[c + j] = v;
      acc[j] += v * (squares ? v : A(1));
    }
  }
  A tail = 0;  // see row_sum_sq_dev
  for (; c < C; ++c) {
    const A v = residual_elem<scalar_t, mod_t, kY, kGate>(xr, yr, gr, c);
    r[c] = v;
    tail += v * (squares ? v : A(1));
  }
  return reduce_lanes(acc) + tail;
}

// out = ((r - mean) * rstd * weight + bias) * (1 + scale) + shift, reading the modulation directly
// (per-token scale/shift); kAffine drops weight and bias. Absent members of a present pair read
// ones/zeros.
template <typename scalar_t, typename mod_t, bool kAffine>
I2V_ALWAYS_INLINE void store_row_direct(const acc_type<scalar_t>* __restrict__ r, acc_type<scalar_t> mean,
                                        acc_type<scalar_t> rstd,
                                        const typename Io<mod_t>::storage* __restrict__ weight,
                                        const typename Io<mod_t>::storage* __restrict__ bias,
                                        const typename Io<mod_t>::storage* __restrict__ scale,
                                        const typename Io<mod_t>::storage* __restrict__ shift,
                                        typename Io<scalar_t>::storage* __restrict__ out, int64_t C) {
  using A = acc_type<scalar_t>;
  using MIo = Io<mod_t>;
  for (int64_t c = 0; c < C; ++c) {
    A n = (r[c] - mean) * rstd;
    if constexpr (kAffine) n = n * MIo::template load<A>(weight[c]) + MIo::template load<A>(bias[c]);
    n = n * (A(1) + MIo::template load<A>(scale[c])) + MIo::template load<A>(shift[c]);
    out[c] = Io<scalar_t>::store(n);
  }
}

// out = (r - mean) * rstd * mul + add with per-channel coefficients in the math type (see
// build_coefficients); mul == nullptr means plain normalization.
template <typename scalar_t>
I2V_ALWAYS_INLINE void store_row_coef(const acc_type<scalar_t>* __restrict__ r, acc_type<scalar_t> mean,
                                      acc_type<scalar_t> rstd, const acc_type<scalar_t>* __restrict__ mul,
                                      const acc_type<scalar_t>* __restrict__ add,
                                      typename Io<scalar_t>::storage* __restrict__ out, int64_t C) {
  if (mul == nullptr) {
    for (int64_t c = 0; c < C; ++c) out[c] = Io<scalar_t>::store((r[c] - mean) * rstd);
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = Io<scalar_t>::store((r[c] - mean) * rstd * mul[c] + add[c]);
  }
}

// mul = weight * (1 + scale), add = bias * (1 + scale) + shift: the affine and modulation terms folded
// into one multiply-add a channel.
template <typename mod_t, typename A>
void build_coefficients(const typename Io<mod_t>::storage* __restrict__ weight,
                        const typename Io<mod_t>::storage* __restrict__ bias,
                        const typename Io<mod_t>::storage* __restrict__ scale,
                        const typename Io<mod_t>::storage* __restrict__ shift, A* __restrict__ mul,
                        A* __restrict__ add, int64_t C) {
  using MIo = Io<mod_t>;
  for (int64_t c = 0; c < C; ++c) {
    const A s1 = A(1) + MIo::template load<A>(scale[c]);
    mul[c] = MIo::template load<A>(weight[c]) * s1;
    add[c] = MIo::template load<A>(bias[c]) * s1 + MIo::template load<A>(shift[c]);
  }
}

// Per-thread scratch of adaln_rows_impl, C values each.
template <typename scalar_t, typename mod_t>
struct Workspace {
  using A = acc_type<scalar_t>;
  using MS = typename Io<mod_t>::storage;
  std::vector<A> r;
  std::vector<A> mul;
  std::vector<A> add;
  std::vector<MS> ones;
  std::vector<MS> zeros;
  explicit Workspace(int64_t C)
      : r(C), mul(C), add(C), ones(C, Io<mod_t>::one()), zeros(C, MS(0)) {}
};

// Whether the modulation (scale, shift) is the same for consecutive rows: broadcast over the
// innermost coalesced leading dim (stride 0 there), e.g. per-sample [B, 1, C] or per-frame
// [B, T, 1, C]. Such rows then share precomputed coefficients (store_row_coef) instead of converting
// the modulation row again for every row.
bool modulation_row_invariant(const AdalnParams& p) {
  if (p.layout.ndim == 0) return true;  // a single row
  return (p.scale == nullptr || p.layout.strides[kScale][0] == 0) &&
         (p.shift == nullptr || p.layout.strides[kShift][0] == 0);
}

// Rows [begin, end).
template <typename scalar_t, typename mod_t>
I2V_ALWAYS_INLINE void adaln_rows_impl(const AdalnParams& p, int64_t begin, int64_t end,
                                       Workspace<scalar_t, mod_t>& ws) {
  using A = acc_type<scalar_t>;
  using XIo = Io<scalar_t>;
  using XS = typename XIo::storage;
  using MS = typename Io<mod_t>::storage;

  const int64_t C = p.C;
  const XS* x = static_cast<const XS*>(p.x);
  const XS* y = static_cast<const XS*>(p.y);
  const MS* gate = static_cast<const MS*>(p.gate);
  const MS* shift = static_cast<const MS*>(p.shift);
  const MS* scale = static_cast<const MS*>(p.scale);
  const MS* ones = ws.ones.data();
  const MS* zeros = ws.zeros.data();
  const MS* weight = p.weight ? static_cast<const MS*>(p.weight) : ones;
  const MS* bias = p.bias ? static_cast<const MS*>(p.bias) : zeros;
  const bool affine = p.weight != nullptr || p.bias != nullptr;
  const bool modulate = shift != nullptr || scale != nullptr;
  // Folded coefficients unless the modulation changes from row to row.
  const bool use_coef = (affine || modulate) && (!modulate || modulation_row_invariant(p));
  XS* out = static_cast<XS*>(p.out);
  XS* residual = static_cast<XS*>(p.residual);
  const int norm = p.norm;
  const bool squares = norm == kNormRms;
  const A eps = static_cast<A>(p.eps);
  const A inv_C = A(1) / static_cast<A>(C);
  A* r = ws.r.data();
  // Modulation rows the coefficients were built from (valid once have_coef).
  bool have_coef = false;
  const MS* coef_scale = nullptr;
  const MS* coef_shift = nullptr;

  for (int64_t row = begin; row < end; ++row) {
    int64_t off[kNumRowTensors];
    p.layout.offsets(row, off);
    const XS* xr = x + off[kX];
    const XS* yr = y ? y + off[kY] : nullptr;
    const MS* gr = gate ? gate + off[kGate] : nullptr;
    XS* __restrict__ outr = out + row * C;

    A s;  // sum(r) for layer norm, sum(r^2) for RMS norm
    if (y == nullptr) {
      s = load_row<scalar_t, mod_t, false, false>(xr, yr, gr, r, C, squares);
    } else if (gate == nullptr) {
      s = load_row<scalar_t, mod_t, true, false>(xr, yr, gr, r, C, squares);
    } else {
      s = load_row<scalar_t, mod_t, true, true>(xr, yr, gr, r, C, squares);
    }

    if (norm == kNormNone) {
      for (int64_t c = 0; c < C; ++c) outr[c] = XIo::store(r[c]);
      continue;
    }
    if (residual != nullptr) {
      XS* __restrict__ resr = residual + row * C;
      for (int64_t c = 0; c < C; ++c) resr[c] = XIo::store(r[c]);
    }

    A mean = 0;
    A rstd;
    if (norm == kNormLayer) {
      mean = s * inv_C;
      rstd = A(1) / std::sqrt(row_sum_sq_dev(r, C, mean) * inv_C + eps);
    } else {
      // An infinity gives s = inf and rstd = 0, so NaN at the infinity and zeros beside it: make the
      // whole row NaN, as LayerNorm does (docs/SEMANTICS.md).
      rstd = A(1) / std::sqrt(s * inv_C + eps) + s * A(0);
    }

    const MS* scr = scale ? scale + off[kScale] : zeros;
    const MS* shr = shift ? shift + off[kShift] : zeros;
    if (!affine && !modulate) {
      store_row_coef<scalar_t>(r, mean, rstd, nullptr, nullptr, outr, C);
    } else if (use_coef) {
      if (!have_coef || scr != coef_scale || shr != coef_shift) {
        build_coefficients<mod_t, A>(weight, bias, scr, shr, ws.mul.data(), ws.add.data(), C);
        have_coef = true;
        coef_scale = scr;
        coef_shift = shr;
      }
      store_row_coef<scalar_t>(r, mean, rstd, ws.mul.data(), ws.add.data(), outr, C);
    } else if (affine) {
      store_row_direct<scalar_t, mod_t, true>(r, mean, rstd, weight, bias, scr, shr, outr, C);
    } else {
      store_row_direct<scalar_t, mod_t, false>(r, mean, rstd, weight, bias, scr, shr, outr, C);
    }
  }
}

template <typename scalar_t, typename mod_t>
void adaln_rows_baseline(const AdalnParams& p, int64_t begin, int64_t end, Workspace<scalar_t, mod_t>& ws) {
  adaln_rows_impl<scalar_t, mod_t>(p, begin, end, ws);
}

#ifdef I2V_ADALN_X86_CLONES
// The same loops compiled for 256-bit (AVX2) and 512-bit (AVX-512) vectors; called only after a
// run-time CPU check.
template <typename scalar_t, typename mod_t>
__attribute__((target("avx2,fma"))) void adaln_rows_avx2(const AdalnParams& p, int64_t begin, int64_t end,
                                                         Workspace<scalar_t, mod_t>& ws) {
  adaln_rows_impl<scalar_t, mod_t>(p, begin, end, ws);
}

template <typename scalar_t, typename mod_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,prefer-vector-width=512"))) void adaln_rows_avx512(
    const AdalnParams& p, int64_t begin, int64_t end, Workspace<scalar_t, mod_t>& ws) {
  adaln_rows_impl<scalar_t, mod_t>(p, begin, end, ws);
}

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
}
#endif

template <typename scalar_t, typename mod_t>
void adaln_fwd_cpu_impl(const AdalnParams& p) {
  // At least ~16K elements per task so that threading pays off on small inputs.
  const int64_t grain = std::max<int64_t>(1, (16384 + p.C - 1) / p.C);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    Workspace<scalar_t, mod_t> ws(p.C);
#ifdef I2V_ADALN_X86_CLONES
    // float64 (reference checks, gradcheck) keeps the baseline loops only: less compile time.
    if constexpr (!std::is_same<scalar_t, double>::value) {
      switch (cpu_isa()) {
        case Isa::kAvx512: adaln_rows_avx512<scalar_t, mod_t>(p, begin, end, ws); return;
        case Isa::kAvx2: adaln_rows_avx2<scalar_t, mod_t>(p, begin, end, ws); return;
        case Isa::kBaseline: break;
      }
    }
#endif
    adaln_rows_baseline<scalar_t, mod_t>(p, begin, end, ws);
  });
}

std::tuple<at::Tensor, at::Tensor> adaln_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                                 const std::optional<at::Tensor>& gate,
                                                 const std::optional<at::Tensor>& shift,
                                                 const std::optional<at::Tensor>& scale,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, int64_t norm, double eps) {
  AdalnParams p;
  auto outputs = adaln_prepare(x, y, gate, shift, scale, weight, bias, norm, eps, c10::DeviceType::CPU, p);
  if (p.rows == 0) return outputs;
  const bool mod_f32 = p.mod_dtype == DType::kFloat;
  switch (p.x_dtype) {
    case DType::kFloat: adaln_fwd_cpu_impl<float, float>(p); break;
    case DType::kDouble:
      mod_f32 ? adaln_fwd_cpu_impl<double, float>(p) : adaln_fwd_cpu_impl<double, double>(p);
      break;
    case DType::kHalf:
      mod_f32 ? adaln_fwd_cpu_impl<c10::Half, float>(p) : adaln_fwd_cpu_impl<c10::Half, c10::Half>(p);
      break;
    case DType::kBFloat16:
      mod_f32 ? adaln_fwd_cpu_impl<c10::BFloat16, float>(p) : adaln_fwd_cpu_impl<c10::BFloat16, c10::BFloat16>(p);
      break;
  }
  return outputs;
}

}  // namespace
}  // namespace adaln
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CPU, m) { m.impl("_adaln_fwd", &i2v::adaln::adaln_fwd_cpu); }
