// CPU kernel of _temporal_attention_fwd: each (b, s, h) attends across its T frames, one problem at a
// time, with the package's non-finite rule (i2v_kernels/ops/attention/semantics.py) applied inside.
//
// Why a kernel at all on the CPU: SDPA there needs the rule applied around it (a sum over q, k and v
// to find non-finite inputs, then SDPA over [B*S, H, T, D]), and at a DiT's short T the per-problem
// overhead of ATen's CPU flash kernel dominates: a problem is a T x T score tile. Here a problem's K
// and V rows are converted once into a small fp32 buffer (checked for non-finite values on the way),
// then every query row runs scores, softmax and the weighted sum over D in registers/L1.
//
// Problems are split across threads with at::parallel_for, heads fastest (neighbouring problems read
// neighbouring memory). The inner loops over D are written with independent partial sums so that the
// compiler vectorizes them without reassociating; the same code is compiled a second time for
// AVX2/FMA and AVX-512 and picked at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

namespace i2v {
namespace attention {
namespace {

constexpr int kRows = 8;  // query rows per register tile (8 independent FMA chains hide the FMA latency)

// 64-byte SIMD vectors through GCC/Clang vector extensions (one AVX-512 register, two AVX2 ones, four
// SSE ones: the compiler splits them for the target), unaligned loads and stores.
template <typename acc_t>
struct Simd {
  static constexpr int N = 64 / sizeof(acc_t);
  typedef acc_t Vec __attribute__((vector_size(64), aligned(sizeof(acc_t))));
  static inline __attribute__((always_inline)) Vec load(const acc_t* p) { return *reinterpret_cast<const Vec*>(p); }
  static inline __attribute__((always_inline)) void store(acc_t* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
};

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t T, S, H, D;
  int64_t qs[4], ks[4], vs[4], os[4];  // element strides over (B, T, S, H)
  double scale;
  bool causal;
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

typedef int32_t I32x16 __attribute__((vector_size(64)));

// exp(x) for x <= 0 (scores minus their row's maximum), 16 at a time in fp32: x = n ln2 + r with
// |r| <= ln2 / 2 (n rounded by the 1.5 * 2^23 trick), e^r by its degree-6 Taylor polynomial (relative
// error below 2e-7), 2^n written into the exponent bits. x is clamped at -87 (e^-87 = 1.6e-38, a
// weight that cannot move a sum of at least 1).
static inline __attribute__((always_inline)) Simd<float>::Vec exp_nonpositive(Simd<float>::Vec x) {
  using Vec = Simd<float>::Vec;
  x = x < -87.0f ? Vec{} - 87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  const Vec r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln2 in two parts
  Vec p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I32x16 bits = (__builtin_convertvector(n, I32x16) + 127) << 23;
  return p * reinterpret_cast<const Vec&>(bits);
}

static inline __attribute__((always_inline)) Simd<double>::Vec exp_nonpositive(Simd<double>::Vec x) {
  for (int i = 0; i < Simd<double>::N; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Copies one length-D row into the fp32 (fp64) buffer; returns false when it holds a NaN or an
// infinity (x * 0 is 0 for every finite x, NaN otherwise), with such values replaced by 0.
template <typename scalar_t, typename acc_t>
static inline __attribute__((always_inline)) bool load_row(const scalar_t* __restrict src, acc_t* __restrict dst,
                                                           int64_t D) {
  using S = Simd<acc_t>;
  typename S::Vec probe{};
  int64_t d = 0;
  if (std::is_same<scalar_t, acc_t>::value) {
    for (; d + S::N <= D; d += S::N) {
      const typename S::Vec x = S::load(reinterpret_cast<const acc_t*>(src) + d);
      S::store(dst + d, x);
      probe += x * acc_t(0);
    }
  } else {
    for (int64_t e = 0; e < D; ++e) dst[e] = static_cast<acc_t>(src[e]);
    for (; d + S::N <= D; d += S::N) probe += S::load(dst + d) * acc_t(0);
  }
  acc_t tail = 0;
  for (; d < D; ++d) {
    const acc_t x = static_cast<acc_t>(src[d]);
    dst[d] = x;
    tail += x * acc_t(0);
  }
  for (int j = 0; j < S::N; ++j) tail += probe[j];
  if (tail == acc_t(0)) return true;
  for (d = 0; d < D; ++d) {
    if (!std::isfinite(dst[d])) dst[d] = 0;
  }
  return false;
}

// Per-thread scratch for one problem, padded so that every register tile is whole: q [Tr][Dp],
// k transposed [Dp][Tp], v [Tp][Dp], softmax weights [Tr][Tp] (Tr: T rounded up to kRows; Tp, Dp:
// T and D rounded up to a vector; the padding stays zero). Row flags for the non-finite rule.
template <typename acc_t>
struct Scratch {
  int64_t Tr, Tp, Dp;
  std::vector<acc_t> q, kt, v, p, row;
  std::vector<uint8_t> q_bad, k_bad, v_bad;
  Scratch(int64_t T, int64_t D)
      : Tr(round_up(T, kRows)), Tp(round_up(T, Simd<acc_t>::N)), Dp(round_up(D, Simd<acc_t>::N)), q(Tr * Dp), kt(Dp * Tp), v(Tp * Dp),
        p(Tr * Tp), row(Dp), q_bad(T), k_bad(T), v_bad(T * D) {}
};

template <typename scalar_t, typename acc_t>
static inline __attribute__((always_inline)) void solve(const Problem& p, int64_t b, int64_t s, int64_t h,
                                                        Scratch<acc_t>& w) {
  const int64_t T = p.T, D = p.D, Tp = w.Tp, Dp = w.Dp;
  const auto* q = static_cast<const scalar_t*>(p.q) + b * p.qs[0] + s * p.qs[2] + h * p.qs[3];
  const auto* k = static_cast<const scalar_t*>(p.k) + b * p.ks[0] + s * p.ks[2] + h * p.ks[3];
  const auto* v = static_cast<const scalar_t*>(p.v) + b * p.vs[0] + s * p.vs[2] + h * p.vs[3];
  auto* out = static_cast<scalar_t*>(p.out) + b * p.os[0] + s * p.os[2] + h * p.os[3];
  acc_t* __restrict qb = w.q.data();
  acc_t* __restrict kt = w.kt.data();
  acc_t* __restrict vb = w.v.data();
  acc_t* __restrict pb = w.p.data();
  acc_t* __restrict row = w.row.data();

  // Load: q and v rows as they are, k transposed (scores then run along the keys, no horizontal sums).
  bool any_v_bad = false;
  for (int64_t t = 0; t < T; ++t) {
    w.q_bad[t] = !load_row(q + t * p.qs[1], qb + t * Dp, D);
    w.k_bad[t] = !load_row(k + t * p.ks[1], row, D);
    for (int64_t d = 0; d < D; ++d) kt[d * Tp + t] = row[d];
    if (!load_row(v + t * p.vs[1], vb + t * Dp, D)) {
      if (!any_v_bad) std::fill(w.v_bad.begin(), w.v_bad.end(), 0);
      any_v_bad = true;
      const scalar_t* src = v + t * p.vs[1];
      for (int64_t d = 0; d < D; ++d) w.v_bad[t * D + d] = !std::isfinite(static_cast<acc_t>(src[d]));
    }
  }

  // Scores, kRows query rows x one vector of keys per register tile; under causal only the tiles a
  // row sees.
  using S = Simd<acc_t>;
  using Vec = typename S::Vec;
  constexpr int N = S::N;
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t r0 = 0; r0 < T; r0 += kRows) {
    const int64_t cols = p.causal ? std::min(Tp, round_up(std::min(r0 + kRows, T), N)) : Tp;
    for (int64_t c0 = 0; c0 < cols; c0 += N) {
      Vec acc[kRows] = {};
      for (int64_t d = 0; d < Dp; ++d) {
        const Vec kd = S::load(kt + d * Tp + c0);
        for (int i = 0; i < kRows; ++i) acc[i] += qb[(r0 + i) * Dp + d] * kd;
      }
      for (int i = 0; i < kRows; ++i) S::store(pb + (r0 + i) * Tp + c0, acc[i] * scale);
    }
  }

  // Softmax over the keys each row sees; the weights of keys it does not see (and padding) are 0.
  for (int64_t r = 0; r < T; ++r) {
    const int64_t seen = p.causal ? r + 1 : T;
    const int64_t width = round_up(seen, N);
    acc_t* __restrict pr = pb + r * Tp;
    acc_t m = pr[0];
    for (int64_t c = 1; c < seen; ++c) m = pr[c] > m ? pr[c] : m;
    for (int64_t c = 0; c < width; c += N) S::store(pr + c, exp_nonpositive(S::load(pr + c) - m));
    for (int64_t c = seen; c < Tp; ++c) pr[c] = 0;
    Vec sum{};
    for (int64_t c = 0; c < width; c += N) sum += S::load(pr + c);
    acc_t l = 0;
    for (int j = 0; j < N; ++j) l += sum[j];
    const acc_t inv = acc_t(1) / l;
    for (int64_t c = 0; c < width; c += N) S::store(pr + c, S::load(pr + c) * inv);
  }

  // Output, kRows rows x one vector of the head dim per register tile.
  for (int64_t r0 = 0; r0 < T; r0 += kRows) {
    const int64_t keys = p.causal ? std::min(T, r0 + kRows) : T;
    for (int64_t d0 = 0; d0 < Dp; d0 += N) {
      Vec acc[kRows] = {};
      for (int64_t c = 0; c < keys; ++c) {
        const Vec vc = S::load(vb + c * Dp + d0);
        for (int i = 0; i < kRows; ++i) acc[i] += pb[(r0 + i) * Tp + c] * vc;
      }
      const int64_t n = std::min<int64_t>(N, D - d0);
      for (int i = 0; i < kRows && r0 + i < T; ++i) {
        scalar_t* o = out + (r0 + i) * p.os[1] + d0;
        if (std::is_same<scalar_t, acc_t>::value && n == N) {
          S::store(reinterpret_cast<acc_t*>(o), acc[i]);
        } else {
          for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(acc[i][j]);
        }
      }
    }
  }

  // The non-finite rule (semantics.py): a row whose q, or a key it sees, is not finite is all NaN;
  // otherwise out[r, d] is NaN where a value v[c, d] it sees is not finite. Rare: flags were set above.
  const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
  bool k_bad_seen = false;
  if (!p.causal) {
    for (int64_t t = 0; t < T; ++t) k_bad_seen |= w.k_bad[t] != 0;
  }
  for (int64_t r = 0; r < T; ++r) {
    if (p.causal) k_bad_seen |= w.k_bad[r] != 0;
    scalar_t* o = out + r * p.os[1];
    if (w.q_bad[r] || k_bad_seen) {
      for (int64_t d = 0; d < D; ++d) o[d] = nan;
    } else if (any_v_bad) {
      const int64_t seen = p.causal ? r + 1 : T;
      for (int64_t c = 0; c < seen; ++c) {
        for (int64_t d = 0; d < D; ++d) {
          if (w.v_bad[c * D + d]) o[d] = nan;
        }
      }
    }
  }
}

// Asks the cache for the T rows of q, k, v (and the output's, for writing) of problem (b, s, h): a
// problem's rows lie a frame apart in memory, a pattern the hardware prefetcher does not follow.
template <typename scalar_t>
static inline __attribute__((always_inline)) void prefetch(const Problem& p, int64_t b, int64_t s, int64_t h) {
  const int64_t bytes = p.D * static_cast<int64_t>(sizeof(scalar_t));
  const char* q = static_cast<const char*>(p.q) + (b * p.qs[0] + s * p.qs[2] + h * p.qs[3]) * sizeof(scalar_t);
  const char* k = static_cast<const char*>(p.k) + (b * p.ks[0] + s * p.ks[2] + h * p.ks[3]) * sizeof(scalar_t);
  const char* v = static_cast<const char*>(p.v) + (b * p.vs[0] + s * p.vs[2] + h * p.vs[3]) * sizeof(scalar_t);
  char* o = static_cast<char*>(p.out) + (b * p.os[0] + s * p.os[2] + h * p.os[3]) * sizeof(scalar_t);
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t x = 0; x < bytes; x += 64) {
      __builtin_prefetch(q + t * p.qs[1] * sizeof(scalar_t) + x);
      __builtin_prefetch(k + t * p.ks[1] * sizeof(scalar_t) + x);
      __builtin_prefetch(v + t * p.vs[1] * sizeof(scalar_t) + x);
      __builtin_prefetch(o + t * p.os[1] * sizeof(scalar_t) + x, 1);
    }
  }
}

template <typename scalar_t, typename acc_t>
static inline __attribute__((always_inline)) void solve_range(const Problem& p, int64_t begin, int64_t end) {
  Scratch<acc_t> w(p.T, p.D);
  if (begin < end) prefetch<scalar_t>(p, begin / p.H / p.S, begin / p.H % p.S, begin % p.H);
  for (int64_t i = begin; i < end; ++i) {  // i = (b * S + s) * H + h
    if (i + 1 < end) prefetch<scalar_t>(p, (i + 1) / p.H / p.S, (i + 1) / p.H % p.S, (i + 1) % p.H);
    const int64_t h = i % p.H, bs = i / p.H;
    solve<scalar_t, acc_t>(p, bs / p.S, bs % p.S, h, w);
  }
}

// The same loops compiled three ways; which one runs is decided once per process.
template <typename scalar_t, typename acc_t>
void solve_range_base(const Problem& p, int64_t begin, int64_t end) {
  solve_range<scalar_t, acc_t>(p, begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define I2V_TEMPORAL_CPU_MULTIVERSION 1
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void solve_range_avx2(const Problem& p, int64_t begin, int64_t end) {
  solve_range<scalar_t, acc_t>(p, begin, end);
}

template <typename scalar_t, typename acc_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void solve_range_avx512(const Problem& p, int64_t begin,
                                                                                       int64_t end) {
  solve_range<scalar_t, acc_t>(p, begin, end);
}
#endif

template <typename scalar_t, typename acc_t>
void run(const Problem& p, int64_t problems) {
  using Fn = void (*)(const Problem&, int64_t, int64_t);
  Fn fn = &solve_range_base<scalar_t, acc_t>;
#ifdef I2V_TEMPORAL_CPU_MULTIVERSION
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                   __builtin_cpu_supports("avx512vl")
                               ? 2
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0);
  if (level == 2) fn = &solve_range_avx512<scalar_t, acc_t>;
  if (level == 1) fn = &solve_range_avx2<scalar_t, acc_t>;
#endif
  // About 32K multiply-adds per task so that splitting across threads pays off.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.T * p.T * p.D));
  at::parallel_for(0, problems, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

void check_video(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 5, "_temporal_attention_fwd: ", name, " must be [B, T, S, H, D], got ", t.dim(), " dims");
  TORCH_CHECK(t.sizes() == q.sizes(), "_temporal_attention_fwd: ", name, " must have q's shape ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "_temporal_attention_fwd: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "_temporal_attention_fwd: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(4) == 1 || t.size(4) == 1, "_temporal_attention_fwd: ", name,
              " must have unit stride on the head dim D, got strides ", t.strides());
}

at::Tensor temporal_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                      bool causal) {
  check_video("q", q, q);
  check_video("k", k, q);
  check_video("v", v, q);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  Problem p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.T = q.size(1);
  p.S = q.size(2);
  p.H = q.size(3);
  p.D = q.size(4);
  for (int i = 0; i < 4; ++i) {
    p.qs[i] = q.stride(i);
    p.ks[i] = k.stride(i);
    p.vs[i] = v.stride(i);
    p.os[i] = out.stride(i);
  }
  p.scale = scale;
  p.causal = causal;
  const int64_t problems = q.size(0) * p.S * p.H;
  switch (q.scalar_type()) {
    case at::kFloat: run<float, float>(p, problems); break;
    case at::kDouble: run<double, double>(p, problems); break;
    case at::kHalf: run<c10::Half, float>(p, problems); break;
    case at::kBFloat16: run<c10::BFloat16, float>(p, problems); break;
    default:
      TORCH_CHECK(false, "_temporal_attention_fwd: q must be float32, float64, float16 or bfloat16 on the CPU, got ",
                  q.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace attention
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CPU, m) {
  m.impl("_temporal_attention_fwd", &i2v::attention::temporal_attention_fwd_cpu);
}
