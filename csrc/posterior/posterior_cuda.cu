// CUDA launcher and kernels of the multinomial posterior ops: one thread per
// position (b, s), running the shared tile code of posterior.h (run_tile)
// with a tile of one. Neighbouring threads are neighbouring positions, so
// each pass over the K classes reads coalesced rows of the (B, K, S)
// logits. Logits may be float16/bfloat16 (accumulated in float32). No
// atomics: every thread owns its outputs (deterministic).
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

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

__device__ __forceinline__ bool in_range(const int64_t* v, int64_t pos, int64_t K) {
  return v == nullptr || (v[pos] >= 0 && v[pos] < K);
}

template <Op op, typename scalar_t, typename acc_t>
__global__ void posterior_kernel(Ptrs<scalar_t, acc_t> ptr) {
  const int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pos >= ptr.B * ptr.S) return;
  const int64_t b = pos / ptr.S, s = pos % ptr.S;
  if (!in_range(ptr.x_t, pos, ptr.K) || !in_range(ptr.x0, pos, ptr.K)) {
    const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
    if constexpr (op == Op::kKl) {
      ptr.out[pos] = nan;
    } else {
      for (int64_t k = 0; k < ptr.K; ++k) ptr.out[(b * ptr.K + k) * ptr.S + s] = nan;
    }
    return;
  }
  run_tile<op, scalar_t, acc_t, acc_t, 1>(ptr, b, s, 1);
}

template <Op op>
at::Tensor launch(const Prepared& p) {
  if (p.shape.B * p.shape.S == 0) return p.out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(p.out.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    posterior_kernel<op, scalar_t, acc_t>
        <<<blocks_for(p.shape.B * p.shape.S), kThreads, 0, stream>>>(pointers<scalar_t, acc_t>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.out;
}

at::Tensor posterior_cuda(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& alpha_t,
                          const at::Tensor& alpha_bar_prev, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  Prepared p = prepare_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes);
  return p.logits.defined() ? launch<Op::kModelPosterior>(p) : launch<Op::kTruePosterior>(p);
}

at::Tensor posterior_backward_cuda(const at::Tensor& grad, const at::Tensor& x_t,
                                   const at::Tensor& logits, const at::Tensor& alpha_t,
                                   const at::Tensor& alpha_bar_prev) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  return launch<Op::kModelPosteriorBackward>(
      prepare_posterior_backward(grad, x_t, logits, alpha_t, alpha_bar_prev));
}

at::Tensor kl_cuda(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& logits,
                   const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  return launch<Op::kKl>(prepare_kl(at::Tensor(), x_t, x0, logits, alpha_t, alpha_bar_prev));
}

at::Tensor kl_backward_cuda(const at::Tensor& grad, const at::Tensor& x_t, const at::Tensor& x0,
                            const at::Tensor& logits, const at::Tensor& alpha_t,
                            const at::Tensor& alpha_bar_prev) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  return launch<Op::kKlBackward>(prepare_kl(grad, x_t, x0, logits, alpha_t, alpha_bar_prev));
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
