// CUDA launcher and kernels of pyvq::grid_encode / _grid_encode_backward.
// Same semantics as the CPU op (grid_cpu.cpp); the per-axis, per-corner
// arithmetic is the shared code in grid.h.
//
//   forward_kernel:      one thread per (point, group, level); tables may be
//                        float16/bfloat16 (accumulated in float32).
//   coords_grad_kernel:  one thread per (point, group), levels summed in
//                        order: deterministic, no atomics.
//   table gradient:      by default tables_grad_atomic_kernel, one thread per
//                        (point, group, level) adding into a float32/float64
//                        buffer with atomicAdd (fast; the summation order,
//                        hence the last bits, varies run to run). Under
//                        torch.use_deterministic_algorithms(True) it runs a
//                        deterministic path instead: every (point, group,
//                        level, corner) contribution gets the key
//                        (group * L + level) * T + row, a stable sort orders
//                        them by key (ties by contribution index), and
//                        tables_grad_segment_kernel lets the first thread of
//                        each key's run sum that run in order.
#include "grid/grid_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>

namespace pyvq {
namespace grid {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

// Thread i of the (point, group, level) kernels: its level's index, its
// group g and level l, and its point located on that level.
struct Thread {
  int64_t i, ng, g, l;
};

template <typename acc_t>
__device__ __forceinline__ bool locate_thread(const acc_t* coords, const LevelIndex* levels,
                                              const Shape& s, Thread& t, LevelIndex& li,
                                              Axis<acc_t>* ax) {
  t.i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t.i >= s.N * s.G * s.L) return false;
  t.l = t.i % s.L, t.ng = t.i / s.L, t.g = t.ng % s.G;
  li = levels[t.l];
  locate_point(coords + t.ng * s.d, s.d, li, ax);
  return true;
}

template <typename scalar_t, typename acc_t, int F>
__global__ void forward_kernel(const acc_t* __restrict__ coords,
                               const scalar_t* __restrict__ tables, scalar_t* __restrict__ out,
                               const LevelIndex* __restrict__ levels, Shape s) {
  Thread t;
  LevelIndex li;
  Axis<acc_t> ax[kMaxDim];
  if (!locate_thread(coords, levels, s, t, li, ax)) return;
  const int64_t i = t.i, l = t.l, g = t.g;
  const scalar_t* tab = tables + (g * s.L + l) * s.T * F;
  acc_t acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = acc_t(0);
  for (int c = 0; c < (1 << s.d); ++c) {
    const acc_t w = corner_weight(ax, s.d, c);
    const scalar_t* e = tab + corner_row(ax, s.d, c, li) * F;
#pragma unroll
    for (int f = 0; f < F; ++f) acc[f] += w * static_cast<acc_t>(e[f]);
  }
#pragma unroll
  for (int f = 0; f < F; ++f) out[i * F + f] = static_cast<scalar_t>(acc[f]);
}

template <typename scalar_t, typename acc_t, int F>
__global__ void coords_grad_kernel(const scalar_t* __restrict__ grad_out,
                                   const acc_t* __restrict__ coords,
                                   const scalar_t* __restrict__ tables,
                                   acc_t* __restrict__ grad_coords,
                                   const LevelIndex* __restrict__ levels, Shape s) {
  const int64_t ng = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;  // (n, g)
  if (ng >= s.N * s.G) return;
  const int64_t g = ng % s.G;
  acc_t total[kMaxDim];
  for (int k = 0; k < s.d; ++k) total[k] = acc_t(0);
  Axis<acc_t> ax[kMaxDim];
  for (int64_t l = 0; l < s.L; ++l) {
    const LevelIndex li = levels[l];
    locate_point(coords + ng * s.d, s.d, li, ax);
    const scalar_t* tab = tables + (g * s.L + l) * s.T * F;
    const scalar_t* go = grad_out + (ng * s.L + l) * F;
    acc_t gw[kMaxDim];
    for (int k = 0; k < s.d; ++k) gw[k] = acc_t(0);
    for (int c = 0; c < (1 << s.d); ++c) {
      const scalar_t* e = tab + corner_row(ax, s.d, c, li) * F;
      acc_t dot = acc_t(0);
#pragma unroll
      for (int f = 0; f < F; ++f) dot += static_cast<acc_t>(go[f]) * static_cast<acc_t>(e[f]);
      for (int k = 0; k < s.d; ++k) gw[k] += corner_weight_grad(ax, s.d, c, k) * dot;
    }
    for (int k = 0; k < s.d; ++k)
      if (ax[k].inside) total[k] += static_cast<acc_t>(li.res) * gw[k];
  }
  for (int k = 0; k < s.d; ++k) grad_coords[ng * s.d + k] = total[k];
}

template <typename scalar_t, typename acc_t, int F>
__global__ void tables_grad_atomic_kernel(const scalar_t* __restrict__ grad_out,
                                          const acc_t* __restrict__ coords,
                                          acc_t* __restrict__ grad_tables,
                                          const LevelIndex* __restrict__ levels, Shape s) {
  Thread t;
  LevelIndex li;
  Axis<acc_t> ax[kMaxDim];
  if (!locate_thread(coords, levels, s, t, li, ax)) return;
  const int64_t i = t.i, l = t.l, g = t.g;
  acc_t go[F];
#pragma unroll
  for (int f = 0; f < F; ++f) go[f] = static_cast<acc_t>(grad_out[i * F + f]);
  acc_t* gt = grad_tables + (g * s.L + l) * s.T * F;
  for (int c = 0; c < (1 << s.d); ++c) {
    const acc_t w = corner_weight(ax, s.d, c);
    acc_t* e = gt + corner_row(ax, s.d, c, li) * F;
#pragma unroll
    for (int f = 0; f < F; ++f) atomicAdd(e + f, w * go[f]);
  }
}

// Deterministic path, step 1: the key of every contribution
// e = ((n * G + g) * L + l) * 2^d + corner.
template <typename acc_t>
__global__ void contribution_keys_kernel(const acc_t* __restrict__ coords,
                                         int64_t* __restrict__ keys,
                                         const LevelIndex* __restrict__ levels, Shape s) {
  Thread t;
  LevelIndex li;
  Axis<acc_t> ax[kMaxDim];
  if (!locate_thread(coords, levels, s, t, li, ax)) return;
  const int64_t i = t.i, l = t.l, g = t.g;
  const int corners = 1 << s.d;
  for (int c = 0; c < corners; ++c)
    keys[i * corners + c] = (g * s.L + l) * s.T + corner_row(ax, s.d, c, li);
}

// Step 3: the first position of each run of equal keys sums the run in
// order (the stable sort keeps contributions in index order within a run).
template <typename scalar_t, typename acc_t, int F>
__global__ void tables_grad_segment_kernel(const scalar_t* __restrict__ grad_out,
                                           const acc_t* __restrict__ coords,
                                           const int64_t* __restrict__ sorted_keys,
                                           const int64_t* __restrict__ order, int64_t M,
                                           acc_t* __restrict__ grad_tables,
                                           const LevelIndex* __restrict__ levels, Shape s) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= M) return;
  const int64_t key = sorted_keys[j];
  if (j > 0 && sorted_keys[j - 1] == key) return;
  const int corners = 1 << s.d;
  acc_t acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = acc_t(0);
  Axis<acc_t> ax[kMaxDim];
  for (int64_t m = j; m < M && sorted_keys[m] == key; ++m) {
    const int64_t e = order[m];
    const int c = static_cast<int>(e % corners);
    const int64_t i = e / corners, l = i % s.L, ng = i / s.L;
    const LevelIndex li = levels[l];
    locate_point(coords + ng * s.d, s.d, li, ax);
    const acc_t w = corner_weight(ax, s.d, c);
#pragma unroll
    for (int f = 0; f < F; ++f) acc[f] += w * static_cast<acc_t>(grad_out[i * F + f]);
  }
#pragma unroll
  for (int f = 0; f < F; ++f) grad_tables[key * F + f] = acc[f];
}

at::Tensor levels_on_device(c10::IntArrayRef resolutions, int d, int64_t T, IndexMode mode,
                            const at::Device& device) {
  const auto host = level_indices(resolutions, d, T, mode);
  at::Tensor bytes = at::empty({static_cast<int64_t>(host.size() * sizeof(LevelIndex))},
                               at::TensorOptions().dtype(at::kByte));
  if (!host.empty()) std::memcpy(bytes.mutable_data_ptr<uint8_t>(), host.data(), bytes.numel());
  return bytes.to(device);
}

const LevelIndex* level_ptr(const at::Tensor& t) {
  return reinterpret_cast<const LevelIndex*>(t.const_data_ptr<uint8_t>());
}

at::Tensor grid_encode_cuda(const at::Tensor& coords_in, const at::Tensor& tables_in,
                            c10::IntArrayRef resolutions, c10::string_view index) {
  check_inputs(coords_in, tables_in, resolutions);
  const IndexMode mode = parse_index(std::string(index.data(), index.size()));
  const c10::cuda::CUDAGuard device_guard(coords_in.device());
  const Shape s = shape_of(coords_in, tables_in);
  const int64_t F = tables_in.size(3);
  at::Tensor out = at::empty({s.N, s.G, s.L * F}, tables_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const at::Tensor levels = levels_on_device(resolutions, s.d, s.T, mode, coords.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_grid(tables.scalar_type(), F, [&](auto sv, auto av, auto fc) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    forward_kernel<scalar_t, acc_t, decltype(fc)::value>
        <<<blocks_for(s.N * s.G * s.L), kThreads, 0, stream>>>(
            coords.const_data_ptr<acc_t>(), tables.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), level_ptr(levels), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_encode_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& coords, const at::Tensor& tables,
    c10::IntArrayRef resolutions, c10::string_view index, bool need_coords, bool need_tables) {
  const c10::cuda::CUDAGuard device_guard(coords.device());
  Backward b =
      prepare_backward(grad_out, coords, tables, resolutions, index, need_coords, need_tables);
  const Shape& s = b.s;
  if (s.N == 0 || s.L == 0 || !(need_coords || need_tables)) return finish_backward(b);
  const at::Tensor levels = levels_on_device(resolutions, s.d, s.T, b.mode, b.coords.device());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = s.N * s.G * s.L * (int64_t(1) << s.d);
  at::Tensor sorted_keys, order;
  if (need_tables && deterministic) {
    at::Tensor keys = at::empty({M}, b.coords.options().dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(b.coords.scalar_type(), "grid_encode_keys_cuda", [&] {
      contribution_keys_kernel<scalar_t><<<blocks_for(s.N * s.G * s.L), kThreads, 0, stream>>>(
          b.coords.const_data_ptr<scalar_t>(), keys.mutable_data_ptr<int64_t>(), level_ptr(levels),
          s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    std::tie(sorted_keys, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  }
  dispatch_grid(b.tables.scalar_type(), b.F, [&](auto sv, auto av, auto fc) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    constexpr int kF = decltype(fc)::value;
    const scalar_t* go = b.grad_out.const_data_ptr<scalar_t>();
    const acc_t* xs = b.coords.const_data_ptr<acc_t>();
    if (need_coords) {
      coords_grad_kernel<scalar_t, acc_t, kF><<<blocks_for(s.N * s.G), kThreads, 0, stream>>>(
          go, xs, b.tables.const_data_ptr<scalar_t>(), b.grad_coords.mutable_data_ptr<acc_t>(),
          level_ptr(levels), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_tables && deterministic) {
      tables_grad_segment_kernel<scalar_t, acc_t, kF><<<blocks_for(M), kThreads, 0, stream>>>(
          go, xs, sorted_keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), M,
          b.grad_tables.mutable_data_ptr<acc_t>(), level_ptr(levels), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (need_tables) {
      tables_grad_atomic_kernel<scalar_t, acc_t, kF>
          <<<blocks_for(s.N * s.G * s.L), kThreads, 0, stream>>>(
              go, xs, b.grad_tables.mutable_data_ptr<acc_t>(), level_ptr(levels), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return finish_backward(b);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CUDA, m) {
  m.impl("grid_encode", &grid_encode_cuda);
  m.impl("_grid_encode_backward", &grid_encode_backward_cuda);
}

}  // namespace grid
}  // namespace pyvq
