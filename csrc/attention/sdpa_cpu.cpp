// CPU kernel of _sdpa_cpu_checked: ATen's CPU flash attention, run only when q, k and v hold no NaN
// or infinity, the common case of the package's non-finite rule (i2v_kernels/ops/attention/semantics.py).
// When one does, the op returns None without running the kernel, and the Python caller takes the
// rule's full path (semantics.finite_inputs).
//
// Why C++ for a check that torch.sum could do: on a 2-core CPU, cross attention at [1, 2048, 4, 64]
// queries and 226 keys, the ATen sums plus .item() cost 0.1-0.2 ms of a 2.7 ms call, where this one
// call of plain loops over the exponent bits costs ~0.07 ms over the kernel alone. It reads the inputs
// before the kernel: read after it, k and v had left the cache (75 us instead of 27 for the two).
//
// q must be read: the kernel's log-sum-exp does not reveal a NaN query row. At long rows it comes out
// NaN, but at 6 keys the kernel returned lse 0 and a zero output row for a query holding one NaN.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace i2v {
namespace attention {
namespace {

// Elements per thread's share of a check: small enough that both threads of a 2-core CPU read k or v
// (8K elements, 32 KiB of fp32).
constexpr int64_t kGrain = 1 << 13;

// Whether n elements starting at p hold no NaN or infinity: an element is non-finite exactly when all
// of its exponent bits are set. The OR-reduction over a plain loop vectorizes.
template <typename bits_t>
bool finite_run(const void* p, int64_t n, bits_t exponent) {
  const bits_t* x = static_cast<const bits_t*>(p);
  bits_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<bits_t>((x[i] & exponent) == exponent);
  return bad == 0;
}

bool finite_elements(const void* p, int64_t n, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return finite_run<uint32_t>(p, n, 0x7f800000u);
    case at::kDouble: return finite_run<uint64_t>(p, n, 0x7ff0000000000000ull);
    case at::kHalf: return finite_run<uint16_t>(p, n, 0x7c00u);
    case at::kBFloat16: return finite_run<uint16_t>(p, n, 0x7f80u);
    default: TORCH_CHECK(false, "_sdpa_cpu_checked: unsupported dtype ", dtype);
  }
}

// Whether t holds no NaN or infinity. A dense tensor (contiguous up to a permutation of its dims, as
// the kernel's lse and transposed views are) is one run of memory; otherwise rows along the last dim
// (unit stride, or one element) are the runs and the outer dims are walked with an index counter.
// Either way the work is split across threads.
bool all_finite(const at::Tensor& t) {
  const int64_t n = t.numel();
  if (n == 0) return true;
  const int64_t item = t.element_size();
  const char* base = static_cast<const char*>(t.data_ptr());
  const at::ScalarType dtype = t.scalar_type();
  if (t.is_non_overlapping_and_dense()) {  // its elements fill one run of memory, in some order
    std::atomic<bool> ok{true};
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if (ok.load(std::memory_order_relaxed) && !finite_elements(base + begin * item, end - begin, dtype))
        ok.store(false, std::memory_order_relaxed);
    });
    return ok.load();
  }
  const int64_t dims = t.dim();
  const int64_t row = t.size(dims - 1);
  TORCH_CHECK(t.stride(dims - 1) == 1 || row == 1, "_sdpa_cpu_checked: unit stride on the last dim expected");
  const int64_t rows = n / row;
  std::atomic<bool> ok{true};
  const int64_t grain = std::max<int64_t>(1, kGrain / row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end && ok.load(std::memory_order_relaxed); ++r) {
      int64_t rest = r, offset = 0;
      for (int64_t d = dims - 2; d >= 0; --d) {
        const int64_t size = t.size(d);
        offset += (rest % size) * t.stride(d);
        rest /= size;
      }
      if (!finite_elements(base + offset * item, row, dtype)) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

std::optional<at::Tensor> sdpa_cpu_checked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& bias, bool causal, double scale) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->device().is_cpu(), "_sdpa_cpu_checked: q, k, v must be [batch, H, seq, D] CPU "
                "tensors, got ", t->sizes(), " on ", t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "_sdpa_cpu_checked: k and v must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1, "_sdpa_cpu_checked: unit stride on D expected, got strides ",
                t->strides());
  }
  if (!all_finite(q) || !all_finite(k) || !all_finite(v)) return std::nullopt;
  return std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, bias, scale));
}

}  // namespace
}  // namespace attention
}  // namespace i2v

TORCH_LIBRARY_IMPL(i2v_kernels, CPU, m) { m.impl("_sdpa_cpu_checked", &i2v::attention::sdpa_cpu_checked); }
