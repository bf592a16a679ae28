// Fused single-pass CPU kernels for AdamW-PMA and Lion-PMA.
//
// The math is not derived here: Python computes every per-step scalar from pma_dist.schedule.PMAPhase
// (see coefficients.py) and this file only applies them. Each element is read once and written once,
// which is what makes the step memory-bound rather than op-count-bound.
//
// Bit-exactness with pma_dist.functional (the foreach path) is a design goal, so every line below
// performs the same IEEE float32 operations, in the same order, as the torch op it replaces:
//   t.add_(g, alpha=a)          -> fma(g, a, t)              (torch's CPU add-with-alpha is an FMA)
//   t.addcmul_(g, g, value=a)   -> fma(a * g, g, t)
//   t.addcdiv_(m, d, value=a)   -> t + (a * m) / d           (two roundings, no FMA)
//   t.div_(s)                   -> t / s                     (a true division, not a reciprocal)
//   t.sign_()                   -> (t > 0) - (t < 0)         (NaN -> 0, -0 -> +0)
// The extension is compiled with -ffp-contract=off so the compiler cannot fuse a multiply and an add
// that torch rounds separately. Scalars arrive as doubles and are rounded to float exactly where torch
// rounds a Python scalar to the tensor's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();
// Elements per parallel work item: big enough to amortise scheduling, small enough to balance the
// uneven tensor sizes of a transformer over the threads. A multiple of kWidth so only tensor ends
// take the partial-vector path (which computes identically anyway).
constexpr int64_t kChunk = 1 << 15;

template <typename T>
inline Vec load_float(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kWidth ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    Vec out;
    if (n == kWidth) {
      at::vec::load_to_float(p, out);
    } else {
      T buf[kWidth] = {};
      std::memcpy(buf, p, n * sizeof(T));
      at::vec::load_to_float(buf, out);
    }
    return out;
  }
}

template <typename T>
inline void store_float(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    n == kWidth ? v.store(p) : v.store(p, n);
  } else {
    // Round to nearest even, like Tensor.copy_ from float32.
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

struct AdamWCoefficients {
  float decay1, grad_coef1, decay2, grad_coef2, param_scale, eps, divisor, step_coef, rescale;
  bool eps_before_divide, apply_rescale;
};

struct LionCoefficients {
  float param_scale, decay1, grad_coef1, step_alpha, decay2, grad_coef2, rescale;
  bool apply_rescale;
};

template <typename T>
void adamw_span(T* param, const T* grad, float* exp_avg, float* exp_avg_sq, int64_t n, const AdamWCoefficients& c) {
  const Vec decay1(c.decay1), grad_coef1(c.grad_coef1), decay2(c.decay2), grad_coef2(c.grad_coef2);
  const Vec param_scale(c.param_scale), eps(c.eps), divisor(c.divisor), step_coef(c.step_coef), rescale(c.rescale);
  for (int64_t i = 0; i < n; i += kWidth) {
    const int64_t k = std::min(kWidth, n - i);
    const Vec g = load_float(grad + i, k);
    Vec m = load_float(exp_avg + i, k);
    Vec v = load_float(exp_avg_sq + i, k);
    Vec p = load_float(param + i, k);

    m = at::vec::fmadd(g, grad_coef1, m * decay1);
    v = at::vec::fmadd(grad_coef2 * g, g, v * decay2);
    p = p * param_scale;
    Vec denom = v.sqrt();
    denom = c.eps_before_divide ? (denom + eps) / divisor : denom / divisor + eps;
    p = p + (step_coef * m) / denom;
    if (c.apply_rescale) {
      m = m * rescale;
      v = v * rescale;
    }

    store_float(param + i, p, k);
    store_float(exp_avg + i, m, k);
    store_float(exp_avg_sq + i, v, k);
  }
}

template <typename T>
void lion_span(T* param, const T* grad, float* exp_avg, int64_t n, const LionCoefficients& c) {
  const Vec param_scale(c.param_scale), decay1(c.decay1), grad_coef1(c.grad_coef1), step_alpha(c.step_alpha);
  const Vec decay2(c.decay2), grad_coef2(c.grad_coef2), rescale(c.rescale), zero(0.0f);
  for (int64_t i = 0; i < n; i += kWidth) {
    const int64_t k = std::min(kWidth, n - i);
    const Vec g = load_float(grad + i, k);
    Vec m = load_float(exp_avg + i, k);
    Vec p = load_float(param + i, k);

    p = p * param_scale;
    const Vec mixed = at::vec::fmadd(g, grad_coef1, m * decay1);
    const Vec direction = mixed.gt(zero) - mixed.lt(zero);
    p = at::vec::fmadd(direction, step_alpha, p);
    m = at::vec::fmadd(g, grad_coef2, m * decay2);
    if (c.apply_rescale) m = m * rescale;

    store_float(param + i, p, k);
    store_float(exp_avg + i, m, k);
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Parameters (and their gradients) may be float32, bfloat16 or float16; moments are always float32.
template <typename Fn>
void dispatch_param_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(TypeTag<float>{});
    case at::kBFloat16: return fn(TypeTag<at::BFloat16>{});
    case at::kHalf: return fn(TypeTag<at::Half>{});
    default: TORCH_CHECK(false, "fused PMA kernels: unsupported parameter dtype ", dtype);
  }
}

struct Span {
  int64_t tensor, begin, length;
};

std::vector<Span> split_into_spans(const std::vector<at::Tensor>& params) {
  std::vector<Span> spans;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t numel = params[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) spans.push_back({t, begin, std::min(kChunk, numel - begin)});
  }
  return spans;
}

// Why the kernel cannot take these lists ("" if it can). Parameters and gradients share one dtype
// (float32, bfloat16 or float16); moments are float32; everything is contiguous, on CPU, same sizes.
std::string find_problem(const std::vector<std::vector<at::Tensor>>& lists) {
  std::ostringstream why;
  const auto& params = lists.at(0);
  if (params.empty()) return "empty parameter list";
  const auto param_dtype = params[0].scalar_type();
  if (param_dtype != at::kFloat && param_dtype != at::kBFloat16 && param_dtype != at::kHalf) {
    why << "parameter 0 is " << param_dtype << "; the fused kernel supports float32, bfloat16 and float16";
    return why.str();
  }
  for (size_t l = 0; l < lists.size(); ++l) {
    if (lists[l].size() != params.size()) {
      why << "tensor list " << l << " has " << lists[l].size() << " entries, expected " << params.size();
      return why.str();
    }
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& t = lists[l][i];
      const auto expected = l < 2 ? param_dtype : at::kFloat;  // params and grads share a dtype; moments are fp32
      if (!t.device().is_cpu()) {
        why << "tensor " << i << " of list " << l << " is on " << t.device() << ", expected cpu";
      } else if (t.scalar_type() != expected) {
        why << "tensor " << i << " of list " << l << " is " << t.scalar_type() << ", expected " << expected;
      } else if (!t.is_contiguous()) {
        why << "tensor " << i << " of list " << l << " (shape " << t.sizes() << ") is not contiguous";
      } else if (t.numel() != params[i].numel()) {
        why << "tensor " << i << " of list " << l << " has " << t.numel() << " elements, its parameter has "
            << params[i].numel();
      }
      if (why.tellp() > 0) return why.str();
    }
  }
  return "";
}

void check_lists(const char* who, const std::vector<std::vector<at::Tensor>*>& lists) {
  std::vector<std::vector<at::Tensor>> copies;
  for (const auto* l : lists) copies.push_back(*l);
  const std::string problem = find_problem(copies);
  TORCH_CHECK(problem.empty(), who, ": ", problem);
}

void adamw_pma_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                    std::vector<at::Tensor> exp_avg_sqs, double decay1, double grad_coef1, double decay2,
                    double grad_coef2, double param_scale, double eps, double divisor, bool eps_before_divide,
                    double step_coef, double rescale) {
  check_lists("adamw_pma_step", {&params, &grads, &exp_avgs, &exp_avg_sqs});
  const AdamWCoefficients c{static_cast<float>(decay1),      static_cast<float>(grad_coef1),
                            static_cast<float>(decay2),      static_cast<float>(grad_coef2),
                            static_cast<float>(param_scale), static_cast<float>(eps),
                            static_cast<float>(divisor),     static_cast<float>(step_coef),
                            static_cast<float>(rescale),     eps_before_divide,
                            rescale != 1.0};
  const auto spans = split_into_spans(params);
  dispatch_param_dtype(params[0].scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        const Span& span = spans[s];
        adamw_span(params[span.tensor].data_ptr<scalar_t>() + span.begin,
                   grads[span.tensor].data_ptr<scalar_t>() + span.begin,
                   exp_avgs[span.tensor].data_ptr<float>() + span.begin,
                   exp_avg_sqs[span.tensor].data_ptr<float>() + span.begin, span.length, c);
      }
    });
  });
}

void lion_pma_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                   double param_scale, double decay1, double grad_coef1, double step_alpha, double decay2,
                   double grad_coef2, double rescale) {
  check_lists("lion_pma_step", {&params, &grads, &exp_avgs});
  const LionCoefficients c{static_cast<float>(param_scale), static_cast<float>(decay1),
                           static_cast<float>(grad_coef1),  static_cast<float>(step_alpha),
                           static_cast<float>(decay2),      static_cast<float>(grad_coef2),
                           static_cast<float>(rescale),     rescale != 1.0};
  const auto spans = split_into_spans(params);
  dispatch_param_dtype(params[0].scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        const Span& span = spans[s];
        lion_span(params[span.tensor].data_ptr<scalar_t>() + span.begin,
                  grads[span.tensor].data_ptr<scalar_t>() + span.begin,
                  exp_avgs[span.tensor].data_ptr<float>() + span.begin, span.length, c);
      }
    });
  });
}

// Roofline for benchmarks: the memory traffic of an AdamW step (read p, g, m, v; write p, m, v) with
// the same chunking and threads, and next to no arithmetic (p += g, m += g, v += g). An optimizer as
// fast as this is bound by memory alone.
void stream_like_adamw(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                       std::vector<at::Tensor> exp_avg_sqs) {
  check_lists("stream_like_adamw", {&params, &grads, &exp_avgs, &exp_avg_sqs});
  TORCH_CHECK(params[0].scalar_type() == at::kFloat, "stream_like_adamw: float32 only");
  const auto spans = split_into_spans(params);
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const Span& span = spans[s];
      float* p = params[span.tensor].data_ptr<float>() + span.begin;
      const float* g = grads[span.tensor].data_ptr<float>() + span.begin;
      float* m = exp_avgs[span.tensor].data_ptr<float>() + span.begin;
      float* v = exp_avg_sqs[span.tensor].data_ptr<float>() + span.begin;
      for (int64_t i = 0; i < span.length; i += kWidth) {
        const int64_t k = std::min(kWidth, span.length - i);
        const Vec gv = load_float(g + i, k);
        store_float(p + i, load_float(p + i, k) + gv, k);
        store_float(m + i, load_float(m + i, k) + gv, k);
        store_float(v + i, load_float(v + i, k) + gv, k);
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused single-pass CPU kernels for AdamW-PMA and Lion-PMA (see pma_dist/kernels/pma_cpu.cpp)";
  m.def("adamw_pma_step", &adamw_pma_step, py::call_guard<py::gil_scoped_release>());
  m.def("lion_pma_step", &lion_pma_step, py::call_guard<py::gil_scoped_release>());
  m.def("unsupported_reason", &find_problem,
        "Why the fused kernels cannot update these lists [params, grads, *moments]; '' if they can");
  m.def("stream_like_adamw", &stream_like_adamw, py::call_guard<py::gil_scoped_release>());
  m.attr("vector_width") = kWidth;
}
