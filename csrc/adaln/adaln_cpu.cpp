// CPU kernel of the fused adaLN forward (_adaln_fwd; formula in csrc/ops.cpp).
//
// Rows are split across threads with at::parallel_for. Per row: r = x + gate * y goes to a thread-local
// buffer in the math type (fp32, fp64 for double), the statistics are taken from that buffer (two
// passes for layer norm: mean, then sum((r - mean)^2)), and one last pass writes
//   out = ((r - mean) * rstd * weight + bias) * (1 + scale) + shift.
// An absent weight/bias/shift/scale reads from a per-thread array of ones or zeros, so every row runs
// the same branch-free loops; x * 1 + 0 is exact, so this equals skipping the term.
//
// All loops run over contiguous arrays and are written for GCC's auto-vectorizer (reductions through
// `omp simd`, compiled with -fopenmp). fp16/bf16 are converted with integer bit operations that
// vectorize. The row loop is compiled twice, for baseline x86-64 and with AVX2 (chosen at run time),
// so the binary runs on any x86-64 CPU.
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

#if defined(__GNUC__) && defined(__x86_64__)
#define I2V_ADALN_AVX2 1
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

// Rows [begin, end). `buf` holds C math-type values; `ones`/`zeros` hold C modulation-type values.
template <typename scalar_t, typename mod_t>
I2V_ALWAYS_INLINE void adaln_rows_impl(const AdalnParams& p, int64_t begin, int64_t end, acc_type<scalar_t>* buf,
                                       const typename Io<mod_t>::storage* ones,
                                       const typename Io<mod_t>::storage* zeros) {
  using A = acc_type<scalar_t>;
  using XIo = Io<scalar_t>;
  using MIo = Io<mod_t>;
  using XS = typename XIo::storage;
  using MS = typename MIo::storage;

  const int64_t C = p.C;
  const XS* x = static_cast<const XS*>(p.x);
  const XS* y = static_cast<const XS*>(p.y);
  const MS* gate = static_cast<const MS*>(p.gate);
  const MS* shift = static_cast<const MS*>(p.shift);
  const MS* scale = static_cast<const MS*>(p.scale);
  const MS* __restrict__ weight = p.weight ? static_cast<const MS*>(p.weight) : ones;
  const MS* __restrict__ bias = p.bias ? static_cast<const MS*>(p.bias) : zeros;
  XS* out = static_cast<XS*>(p.out);
  XS* residual = static_cast<XS*>(p.residual);
  const int norm = p.norm;
  const A eps = static_cast<A>(p.eps);
  const A inv_C = A(1) / static_cast<A>(C);
  A* __restrict__ r = buf;

  for (int64_t row = begin; row < end; ++row) {
    int64_t off[kNumRowTensors];
    p.layout.offsets(row, off);
    const XS* __restrict__ xr = x + off[kX];
    XS* __restrict__ outr = out + row * C;

    if (y == nullptr) {
      for (int64_t c = 0; c < C; ++c) r[c] = XIo::template load<A>(xr[c]);
    } else if (gate == nullptr) {
      const XS* __restrict__ yr = y + off[kY];
      for (int64_t c = 0; c < C; ++c) r[c] = XIo::template load<A>(xr[c]) + XIo::template load<A>(yr[c]);
    } else {
      const XS* __restrict__ yr = y + off[kY];
      const MS* __restrict__ gr = gate + off[kGate];
      for (int64_t c = 0; c < C; ++c) {
        r[c] = XIo::template load<A>(xr[c]) + MIo::template load<A>(gr[c]) * XIo::template load<A>(yr[c]);
      }
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
      A sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += r[c];
      mean = sum * inv_C;
      A sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) {
        const A d = r[c] - mean;
        sq += d * d;
      }
      rstd = A(1) / std::sqrt(sq * inv_C + eps);
    } else {
      A sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) sq += r[c] * r[c];
      rstd = A(1) / std::sqrt(sq * inv_C + eps);
    }

    const MS* __restrict__ scr = scale ? scale + off[kScale] : zeros;
    const MS* __restrict__ shr = shift ? shift + off[kShift] : zeros;
    for (int64_t c = 0; c < C; ++c) {
      const A n = (r[c] - mean) * rstd * MIo::template load<A>(weight[c]) + MIo::template load<A>(bias[c]);
      outr[c] = XIo::store(n * (A(1) + MIo::template load<A>(scr[c])) + MIo::template load<A>(shr[c]));
    }
  }
}

template <typename scalar_t, typename mod_t>
void adaln_rows_baseline(const AdalnParams& p, int64_t begin, int64_t end, acc_type<scalar_t>* buf,
                         const typename Io<mod_t>::storage* ones, const typename Io<mod_t>::storage* zeros) {
  adaln_rows_impl<scalar_t, mod_t>(p, begin, end, buf, ones, zeros);
}

#ifdef I2V_ADALN_AVX2
// Same loops with 256-bit vectors; only called after a run-time CPU check.
template <typename scalar_t, typename mod_t>
__attribute__((target("avx2,fma"))) void adaln_rows_avx2(const AdalnParams& p, int64_t begin, int64_t end,
                                                         acc_type<scalar_t>* buf,
                                                         const typename Io<mod_t>::storage* ones,
                                                         const typename Io<mod_t>::storage* zeros) {
  adaln_rows_impl<scalar_t, mod_t>(p, begin, end, buf, ones, zeros);
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

template <typename scalar_t, typename mod_t>
void adaln_fwd_cpu_impl(const AdalnParams& p) {
  using A = acc_type<scalar_t>;
  using MIo = Io<mod_t>;
  using MS = typename MIo::storage;
  const int64_t C = p.C;
  // At least ~16K elements per task so that threading pays off on small inputs.
  const int64_t grain = std::max<int64_t>(1, (16384 + C - 1) / C);
#ifdef I2V_ADALN_AVX2
  const bool avx2 = cpu_has_avx2();
#endif
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(static_cast<size_t>(C));
    std::vector<MS> ones(static_cast<size_t>(C), MIo::one());
    std::vector<MS> zeros(static_cast<size_t>(C), MS(0));
#ifdef I2V_ADALN_AVX2
    if (avx2) {
      adaln_rows_avx2<scalar_t, mod_t>(p, begin, end, buf.data(), ones.data(), zeros.data());
      return;
    }
#endif
    adaln_rows_baseline<scalar_t, mod_t>(p, begin, end, buf.data(), ones.data(), zeros.data());
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
