// Argument checks and shape set-up shared by the CPU and CUDA launchers of
// the multinomial posterior ops. (pyvq/ops/posterior.py checks the same
// things first, values included, with friendlier Python errors; these guard
// direct torch.ops calls.)
#pragma once

#include "common/checks.h"
#include "posterior/posterior.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace pyvq {
namespace posterior {

// B positions rows, K classes, S positions per row (the product of the
// spatial dims; 1 when there are none).
struct Shape {
  int64_t B, K, S;
};

inline void check_indices(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "pyvq: argument '", name,
              "' must be an int64 tensor of class indices, got dtype ", t.scalar_type());
  check_min_dim(t, name, 1);
}

inline void check_alpha(const at::Tensor& a, const char* name, int64_t B, const at::Tensor& like) {
  check_floating(a, name);
  check_same_device(a, name, like, "x_t");
  TORCH_CHECK(a.dim() == 1 && a.size(0) == B, "pyvq: argument '", name,
              "' must have shape (B,) = (", B, ",), got ", a.sizes());
  if (a.device().is_cpu() && B > 0) {
    const bool ok = a.gt(0).logical_and(a.le(1)).all().item<bool>();
    TORCH_CHECK(ok, "pyvq: argument '", name, "' must hold values in (0, 1]");
  }
}

// Indices read by the kernels must be in [0, K): checked here on CPU (CUDA
// kernels write NaN for an out-of-range position instead of reading
// outside the logits; pyvq.ops checks on every device).
inline void check_index_range(const at::Tensor& t, const char* name, int64_t K) {
  if (!t.device().is_cpu() || t.numel() == 0) return;
  const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < K, "pyvq: argument '", name, "' must hold class indices in [0, ", K,
              "), got values in [", lo, ", ", hi, "]");
}

// logits (B, K, *S) against x_t (B, *S); returns the shape.
inline Shape check_logits(const at::Tensor& logits, const char* name, const at::Tensor& x_t) {
  check_floating(logits, name);
  check_same_device(logits, name, x_t, "x_t");
  TORCH_CHECK(logits.dim() == x_t.dim() + 1, "pyvq: argument '", name,
              "' must be (B, K, *S) with x_t (B, *S), got ", logits.sizes(), " and ", x_t.sizes());
  TORCH_CHECK(logits.size(0) == x_t.size(0), "pyvq: '", name,
              "' and 'x_t' must have the same batch size, got ", logits.size(0), " and ",
              x_t.size(0));
  for (int64_t d = 1; d < x_t.dim(); ++d)
    TORCH_CHECK(logits.size(d + 1) == x_t.size(d), "pyvq: '", name, "' has spatial shape ",
                logits.sizes().slice(2), " but 'x_t' has ", x_t.sizes().slice(1));
  TORCH_CHECK(logits.size(1) >= 1, "pyvq: argument '", name, "' must have K >= 1 classes (dim 1)");
  return {x_t.size(0), logits.size(1), x_t.numel() / std::max<int64_t>(x_t.size(0), 1)};
}

inline Shape index_shape(const at::Tensor& x_t, int64_t K) {
  int64_t S = 1;
  for (int64_t d = 1; d < x_t.dim(); ++d) S *= x_t.size(d);
  return {x_t.size(0), K, S};
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "pyvq: arguments '", a_name, "' and '", b_name,
              "' must have the same shape, got ", a.sizes(), " and ", b.sizes());
}

// The output (B, K, *S) of a posterior: x_t's shape with K inserted at dim 1.
inline std::vector<int64_t> class_shape(const at::Tensor& x_t, int64_t K) {
  std::vector<int64_t> s(x_t.sizes().begin(), x_t.sizes().end());
  s.insert(s.begin() + 1, K);
  return s;
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls fn(scalar_t{}, acc_t{}) for a floating dtype (an op's output dtype:
// the logits' for the model side, the accumulation dtype for the index form).
template <typename Fn>
inline void dispatch_floating(at::ScalarType type, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "multinomial_posterior", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fn(scalar_t{}, acc_t{});
  });
}

// Checked, contiguous inputs of one call, alphas in the accumulation dtype,
// and the allocated output.
struct Prepared {
  Shape shape;
  at::Tensor x_t, x0, logits, grad, alpha_t, alpha_bar_prev, out;
};

inline void prepare_alphas(Prepared& p, const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev,
                           at::ScalarType acc) {
  check_alpha(alpha_t, "alpha_t", p.shape.B, p.x_t);
  check_alpha(alpha_bar_prev, "alpha_bar_prev", p.shape.B, p.x_t);
  p.alpha_t = alpha_t.to(acc).contiguous();
  p.alpha_bar_prev = alpha_bar_prev.to(acc).contiguous();
}

// multinomial_posterior with logits x0 (model posterior) or indices x0
// (true posterior, output in alpha_t's accumulation dtype).
inline Prepared prepare_posterior(const at::Tensor& x_t, const at::Tensor& x0,
                                  const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev,
                                  int64_t num_classes) {
  check_indices(x_t, "x_t");
  Prepared p;
  p.x_t = x_t.contiguous();
  if (x0.is_floating_point()) {
    p.shape = check_logits(x0, "x0", x_t);
    TORCH_CHECK(num_classes == p.shape.K, "pyvq.multinomial_posterior: 'num_classes' is ",
                num_classes, " but the logits 'x0' have K = ", p.shape.K, " classes (dim 1)");
    p.logits = x0.contiguous();
    prepare_alphas(p, alpha_t, alpha_bar_prev, acc_type(x0.scalar_type()));
    p.out = at::empty(p.logits.sizes(), p.logits.options());
  } else {
    check_indices(x0, "x0");
    check_same_shape(x0, "x0", x_t, "x_t");
    TORCH_CHECK(num_classes >= 1, "pyvq.multinomial_posterior: 'num_classes' must be >= 1, got ",
                num_classes);
    p.shape = index_shape(x_t, num_classes);
    p.x0 = x0.contiguous();
    check_index_range(p.x0, "x0", p.shape.K);
    check_floating(alpha_t, "alpha_t");
    const auto acc = acc_type(alpha_t.scalar_type());
    prepare_alphas(p, alpha_t, alpha_bar_prev, acc);
    p.out = at::empty(class_shape(x_t, num_classes), p.alpha_t.options());
  }
  check_index_range(p.x_t, "x_t", p.shape.K);
  return p;
}

inline Prepared prepare_posterior_backward(const at::Tensor& grad, const at::Tensor& x_t,
                                           const at::Tensor& logits, const at::Tensor& alpha_t,
                                           const at::Tensor& alpha_bar_prev) {
  check_indices(x_t, "x_t");
  Prepared p;
  p.shape = check_logits(logits, "logits", x_t);
  check_same_shape(grad, "grad", logits, "logits");
  check_same_dtype(grad, "grad", logits, "logits");
  p.x_t = x_t.contiguous();
  p.logits = logits.contiguous();
  p.grad = grad.contiguous();
  prepare_alphas(p, alpha_t, alpha_bar_prev, acc_type(logits.scalar_type()));
  check_index_range(p.x_t, "x_t", p.shape.K);
  p.out = at::empty(p.logits.sizes(), p.logits.options());
  return p;
}

// multinomial_kl (grad undefined) or its backward (grad of shape x_t).
inline Prepared prepare_kl(const at::Tensor& grad, const at::Tensor& x_t, const at::Tensor& x0,
                           const at::Tensor& logits, const at::Tensor& alpha_t,
                           const at::Tensor& alpha_bar_prev) {
  check_indices(x_t, "x_t");
  check_indices(x0, "x0");
  check_same_shape(x0, "x0", x_t, "x_t");
  Prepared p;
  p.shape = check_logits(logits, "logits", x_t);
  p.x_t = x_t.contiguous();
  p.x0 = x0.contiguous();
  p.logits = logits.contiguous();
  prepare_alphas(p, alpha_t, alpha_bar_prev, acc_type(logits.scalar_type()));
  check_index_range(p.x_t, "x_t", p.shape.K);
  check_index_range(p.x0, "x0", p.shape.K);
  if (grad.defined()) {
    check_same_shape(grad, "grad", x_t, "x_t");
    check_same_dtype(grad, "grad", logits, "logits");
    p.grad = grad.contiguous();
    p.out = at::empty(p.logits.sizes(), p.logits.options());
  } else {
    p.out = at::empty(x_t.sizes(), p.logits.options());
  }
  return p;
}

template <typename scalar_t, typename acc_t>
Ptrs<scalar_t, acc_t> pointers(const Prepared& p) {
  Ptrs<scalar_t, acc_t> ptr;
  ptr.alpha_t = p.alpha_t.const_data_ptr<acc_t>();
  ptr.alpha_bar_prev = p.alpha_bar_prev.const_data_ptr<acc_t>();
  ptr.logits = p.logits.defined() ? p.logits.const_data_ptr<scalar_t>() : nullptr;
  ptr.grad = p.grad.defined() ? p.grad.const_data_ptr<scalar_t>() : nullptr;
  ptr.x_t = p.x_t.const_data_ptr<int64_t>();
  ptr.x0 = p.x0.defined() ? p.x0.const_data_ptr<int64_t>() : nullptr;
  ptr.out = p.out.mutable_data_ptr<scalar_t>();
  ptr.B = p.shape.B, ptr.K = p.shape.K, ptr.S = p.shape.S;
  return ptr;
}

}  // namespace posterior
}  // namespace pyvq
