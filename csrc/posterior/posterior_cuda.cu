// CUDA launcher and kernels of the multinomial posterior ops: one thread per
// position (b, s), running the shared tile code of posterior.h with a tile
// of one. Neighbouring threads are neighbouring positions, so each pass over
// the K classes reads coalesced rows of the (B, K, S) logits. Logits may be
// float16/bfloat16 (accumulated in float32). No atomics: every thread owns
// its outputs (deterministic).
//
// Indices are not range-checked on the device (that would synchronise); a
// position whose x_t or x0 is outside [0, K) gets NaN outputs instead of
// reading outside the logits. pyvq.ops checks the range before the call.
#include "posterior/posterior_common.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace pyvq {
namespace posterior {
namespace {

constexpr int kThreads = 128;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

struct Position {
  int64_t b, off, pos;  // batch row, offset into (B, K, S), offset into (B, S)
};

__device__ __forceinline__ bool locate(int64_t B, int64_t K, int64_t S, Position& p) {
  p.pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p.pos >= B * S) return false;
  p.b = p.pos / S;
  p.off = p.b * K * S + p.pos % S;
  return true;
}

__device__ __forceinline__ bool in_range(int64_t v, int64_t K) { return v >= 0 && v < K; }

template <typename scalar_t>
__device__ void fill_nan(scalar_t* out, int64_t K, int64_t stride) {
  for (int64_t k = 0; k < K; ++k) out[k * stride] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
}

template <typename scalar_t, typename acc_t>
__global__ void model_posterior_kernel(const scalar_t* lg, const int64_t* xt, const acc_t* a, const acc_t* ab,
                                       Shape s, scalar_t* out) {
  Position p;
  if (!locate(s.B, s.K, s.S, p)) return;
  if (!in_range(xt[p.pos], s.K)) return fill_nan(out + p.off, s.K, s.S);
  model_posterior_tile<scalar_t, acc_t, acc_t, 1>(lg + p.off, xt + p.pos, s.K, s.S, 1,
                                           make_coeffs<acc_t>(a[p.b], ab[p.b], s.K), out + p.off);
}

template <typename acc_t>
__global__ void true_posterior_kernel(const int64_t* xt, const int64_t* x0, const acc_t* a, const acc_t* ab, Shape s,
                                      acc_t* out) {
  Position p;
  if (!locate(s.B, s.K, s.S, p)) return;
  if (!in_range(xt[p.pos], s.K) || !in_range(x0[p.pos], s.K)) return fill_nan(out + p.off, s.K, s.S);
  true_posterior_tile<acc_t, acc_t, 1>(xt + p.pos, x0 + p.pos, s.K, s.S, 1, make_coeffs<acc_t>(a[p.b], ab[p.b], s.K),
                                       out + p.off);
}

template <typename scalar_t, typename acc_t>
__global__ void model_posterior_backward_kernel(const scalar_t* gout, const scalar_t* lg, const int64_t* xt,
                                                const acc_t* a, const acc_t* ab, Shape s, scalar_t* grad) {
  Position p;
  if (!locate(s.B, s.K, s.S, p)) return;
  if (!in_range(xt[p.pos], s.K)) return fill_nan(grad + p.off, s.K, s.S);
  model_posterior_backward_tile<scalar_t, acc_t, acc_t, 1>(gout + p.off, lg + p.off, xt + p.pos, s.K, s.S, 1,
                                                    make_coeffs<acc_t>(a[p.b], ab[p.b], s.K), grad + p.off);
}

template <typename scalar_t, typename acc_t>
__global__ void kl_kernel(const scalar_t* lg, const int64_t* xt, const int64_t* x0, const acc_t* a, const acc_t* ab,
                          Shape s, scalar_t* out) {
  Position p;
  if (!locate(s.B, s.K, s.S, p)) return;
  if (!in_range(xt[p.pos], s.K) || !in_range(x0[p.pos], s.K)) return fill_nan(out + p.pos, 1, 1);
  kl_forward_tile<scalar_t, acc_t, acc_t, 1>(lg + p.off, xt + p.pos, x0 + p.pos, s.K, s.S, 1,
                                      make_coeffs<acc_t>(a[p.b], ab[p.b], s.K), out + p.pos);
}

template <typename scalar_t, typename acc_t>
__global__ void kl_backward_kernel(const scalar_t* gout, const scalar_t* lg, const int64_t* xt, const int64_t* x0,
                                   const acc_t* a, const acc_t* ab, Shape s, scalar_t* grad) {
  Position p;
  if (!locate(s.B, s.K, s.S, p)) return;
  if (!in_range(xt[p.pos], s.K) || !in_range(x0[p.pos], s.K)) return fill_nan(grad + p.off, s.K, s.S);
  kl_backward_tile<scalar_t, acc_t, acc_t, 1>(gout + p.pos, lg + p.off, xt + p.pos, x0 + p.pos, s.K, s.S, 1,
                                       make_coeffs<acc_t>(a[p.b], ab[p.b], s.K), grad + p.off);
}

at::Tensor posterior_cuda(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& alpha_t,
                          const at::Tensor& alpha_bar_prev, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  Prepared p = prepare_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes);
  if (p.s.B * p.s.S == 0) return p.out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (p.logits.defined()) {
    dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
      using scalar_t = decltype(sv);
      using acc_t = decltype(av);
      model_posterior_kernel<scalar_t, acc_t><<<blocks_for(p.s.B * p.s.S), kThreads, 0, stream>>>(
          p.logits.const_data_ptr<scalar_t>(), p.x_t.const_data_ptr<int64_t>(), p.alpha_t.const_data_ptr<acc_t>(),
          p.alpha_bar_prev.const_data_ptr<acc_t>(), p.s, p.out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "multinomial_posterior_cuda", [&] {
      true_posterior_kernel<scalar_t><<<blocks_for(p.s.B * p.s.S), kThreads, 0, stream>>>(
          p.x_t.const_data_ptr<int64_t>(), p.x0.const_data_ptr<int64_t>(), p.alpha_t.const_data_ptr<scalar_t>(),
          p.alpha_bar_prev.const_data_ptr<scalar_t>(), p.s, p.out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return p.out;
}

at::Tensor posterior_backward_cuda(const at::Tensor& grad, const at::Tensor& x_t, const at::Tensor& logits,
                                   const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  Prepared p = prepare_posterior_backward(grad, x_t, logits, alpha_t, alpha_bar_prev);
  if (p.s.B * p.s.S == 0) return p.out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    model_posterior_backward_kernel<scalar_t, acc_t><<<blocks_for(p.s.B * p.s.S), kThreads, 0, stream>>>(
        p.grad.const_data_ptr<scalar_t>(), p.logits.const_data_ptr<scalar_t>(), p.x_t.const_data_ptr<int64_t>(),
        p.alpha_t.const_data_ptr<acc_t>(), p.alpha_bar_prev.const_data_ptr<acc_t>(), p.s,
        p.out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.out;
}

at::Tensor kl_cuda(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& logits, const at::Tensor& alpha_t,
                   const at::Tensor& alpha_bar_prev) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  Prepared p = prepare_kl(at::Tensor(), x_t, x0, logits, alpha_t, alpha_bar_prev);
  if (p.s.B * p.s.S == 0) return p.out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    kl_kernel<scalar_t, acc_t><<<blocks_for(p.s.B * p.s.S), kThreads, 0, stream>>>(
        p.logits.const_data_ptr<scalar_t>(), p.x_t.const_data_ptr<int64_t>(), p.x0.const_data_ptr<int64_t>(),
        p.alpha_t.const_data_ptr<acc_t>(), p.alpha_bar_prev.const_data_ptr<acc_t>(), p.s,
        p.out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.out;
}

at::Tensor kl_backward_cuda(const at::Tensor& grad, const at::Tensor& x_t, const at::Tensor& x0,
                            const at::Tensor& logits, const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  Prepared p = prepare_kl(grad, x_t, x0, logits, alpha_t, alpha_bar_prev);
  if (p.s.B * p.s.S == 0) return p.out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    kl_backward_kernel<scalar_t, acc_t><<<blocks_for(p.s.B * p.s.S), kThreads, 0, stream>>>(
        p.grad.const_data_ptr<scalar_t>(), p.logits.const_data_ptr<scalar_t>(), p.x_t.const_data_ptr<int64_t>(),
        p.x0.const_data_ptr<int64_t>(), p.alpha_t.const_data_ptr<acc_t>(), p.alpha_bar_prev.const_data_ptr<acc_t>(),
        p.s, p.out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CUDA, m) {
  m.impl("multinomial_posterior", &posterior_cuda);
  m.impl("_multinomial_posterior_backward", &posterior_backward_cuda);
  m.impl("multinomial_kl", &kl_cuda);
  m.impl("_multinomial_kl_backward", &kl_backward_cuda);
}

}  // namespace posterior
}  // namespace pyvq
