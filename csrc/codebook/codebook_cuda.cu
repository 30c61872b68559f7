// CUDA launcher and kernels of pyvq::nearest_code. Same semantics as the CPU
// op (codebook_cpu.cpp): returns (distances in x's dtype, indices int64), in
// the order of the schema in csrc/pyvq.cpp; the arithmetic is the shared code
// in codebook.h.
//
// Pipeline (all on the current stream, no N x K buffer anywhere):
//   1. prepare_codes_kernel: one warp per code. ||c||^2 in double (as the CPU
//      packer does), then bias[k] = code_bias(...) and
//      scaled[k][d] = score_scale(metric) * (c[k][d] * code_factor(...)),
//      so that score(x, k) = <x, scaled[k]> + bias[k].      (K x D + K)
//   2. search_kernel: a SIMT GEMM tile with the argmin fused into it.
//      Grid (ceil(N / kBM), S). Block (bx, s) owns rows [bx*kBM, +kBM) and
//      the code range [s*codes_per_split, +codes_per_split), walked in tiles
//      of kBN codes; D is walked in stages of kBK coordinates through shared
//      memory, stored transposed ([kk][row], [kk][code]) so the inner loop
//      reads one coordinate of kTM rows and kTN codes per step.
//      Thread (tx, ty) of the 16 x 16 block accumulates the kTM x kTN dot
//      products of rows  ty*kTM + i  and codes  tx*kTN + j  (contiguous, so
//      each operand is one 16-byte shared load: a warp's 16 code loads cover
//      one contiguous 256-byte run and its row loads are 2 broadcasts), in
//      acc_t (float32, or float64 for float64 inputs). After each code tile
//      it adds the bias and folds the scores into a per-row running
//      (best, index) with better(): NaN first, lowest index on ties. The 16
//      threads that share a row then reduce with warp shuffles (they are one
//      half-warp).
//   3. With S == 1 the same block finishes: exact distance of each row to its
//      code with distance<>() on the raw vectors. With S > 1 each block writes
//      a partial (score, index) to part_* laid out [S][N] (coalesced per
//      split) and finalize_kernel reduces the S partials per row with
//      better() and writes the distance.
//
// Why split the codes: a small batch (few row tiles) against a large
// codebook would otherwise occupy a handful of SMs. better() is a total
// order on (score, index), so the result does not depend on S or on the
// reduction order: the op is deterministic and needs no atomics.
//
// Why x is widened to the compute dtype once at the boundary (an N x D copy
// for float16/bfloat16 rows, never N x K): the kernels are instantiated for
// float and double only (build time), and the final distance<T, T>() runs on
// exactly the values the CPU launcher converts its rows to, so both backends
// report the same distance for the same code.
#include "codebook/codebook_common.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace pyvq {
namespace codebook {
namespace {

constexpr int kTX = 16;              // threads along codes
constexpr int kTY = 16;              // threads along rows
constexpr int kThreads = kTX * kTY;  // 256
constexpr int kTM = 4;               // rows per thread
constexpr int kTN = 4;               // codes per thread
constexpr int kBM = kTY * kTM;       // 64 rows per block
constexpr int kBN = kTX * kTN;       // 64 codes per tile
constexpr int kBK = 16;              // coordinates per shared-memory stage
constexpr int kPad = 4;              // keeps each shared row 16-byte aligned
constexpr int kMaxSplits = 64;       // most code ranges per row tile
constexpr int kPrepWarps = 8;        // codes per block of prepare_codes

static_assert(kTX == 16, "the row reduction shuffles within a half-warp");

template <typename acc_t>
__global__ void __launch_bounds__(kPrepWarps * 32)
    prepare_codes_kernel(const acc_t* __restrict__ cb, int64_t K, int64_t D, Metric metric,
                         acc_t* __restrict__ scaled, acc_t* __restrict__ bias) {
  const int lane = threadIdx.x & 31;
  const int64_t k = int64_t(blockIdx.x) * kPrepWarps + threadIdx.x / 32;
  if (k >= K) return;  // uniform per warp
  const acc_t* c = cb + k * D;
  double ss = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const double v = double(c[d]);
    ss += v * v;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const acc_t f = acc_t(code_factor<double>(metric, ss));
  const acc_t scale = score_scale<acc_t>(metric);
  if (lane == 0) bias[k] = acc_t(code_bias<double>(metric, ss));
  acc_t* dst = scaled + k * D;
  for (int64_t d = lane; d < D; d += 32) dst[d] = scale * (c[d] * f);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    search_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ cb,
                  const acc_t* __restrict__ scaled, const acc_t* __restrict__ bias, int64_t N,
                  int64_t K, int64_t D, Metric metric, int64_t codes_per_split,
                  int64_t* __restrict__ out_index, acc_t* __restrict__ out_dist,
                  acc_t* __restrict__ part_score, int32_t* __restrict__ part_index) {
  __shared__ __align__(16) acc_t xs[kBK][kBM + kPad];
  __shared__ __align__(16) acc_t cs[kBK][kBN + kPad];
  __shared__ int32_t row_best[kBM];

  const int tid = threadIdx.x;
  const int tx = tid % kTX;
  const int ty = tid / kTX;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t k_begin = int64_t(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(K, k_begin + codes_per_split);

  // (+inf, 0) is neutral: it never beats a real code and a real code 0 with
  // score +inf ties it with the same index (the CPU starts the same way).
  acc_t best[kTM];
  int32_t best_idx[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = acc_t(INFINITY);
    best_idx[i] = 0;
  }

  for (int64_t kt = k_begin; kt < k_end; kt += kBN) {
    acc_t acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);

    for (int64_t d0 = 0; d0 < D; d0 += kBK) {
      // Consecutive threads read consecutive coordinates of one row/code.
#pragma unroll
      for (int e = tid; e < kBM * kBK; e += kThreads) {
        const int r = e / kBK, kk = e % kBK;
        const int64_t row = row0 + r, d = d0 + kk;
        xs[kk][r] = (row < N && d < D) ? x[row * D + d] : acc_t(0);
      }
#pragma unroll
      for (int e = tid; e < kBN * kBK; e += kThreads) {
        const int j = e / kBK, kk = e % kBK;
        const int64_t k = kt + j, d = d0 + kk;
        cs[kk][j] = (k < k_end && d < D) ? scaled[k * D + d] : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        acc_t a[kTM], b[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = xs[kk][ty * kTM + i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) b[j] = cs[kk][tx * kTN + j];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t k = kt + tx * kTN + j;
      if (k >= k_end) continue;  // padding codes are never compared
      const acc_t bk = bias[k];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const acc_t s = acc[i][j] + bk;
        if (better<acc_t>(s, k, best[i], best_idx[i])) {
          best[i] = s;
          best_idx[i] = int32_t(k);
        }
      }
    }
  }

  // The kTX threads of a row are lanes [0, 16) or [16, 32) of one warp.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int off = kTX / 2; off > 0; off >>= 1) {
      const acc_t os = __shfl_xor_sync(0xffffffffu, best[i], off);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, best_idx[i], off);
      if (better<acc_t>(os, oi, best[i], best_idx[i])) {
        best[i] = os;
        best_idx[i] = oi;
      }
    }
  }

  if (gridDim.y > 1) {
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const int64_t row = row0 + ty * kTM + i;
        if (row < N) {
          part_score[int64_t(blockIdx.y) * N + row] = best[i];
          part_index[int64_t(blockIdx.y) * N + row] = best_idx[i];
        }
      }
    }
    return;
  }

  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) row_best[ty * kTM + i] = best_idx[i];
  }
  __syncthreads();
  // One thread per row for the exact distance (a serial loop over D).
  for (int r = tid; r < kBM; r += kThreads) {
    const int64_t row = row0 + r;
    if (row >= N) break;
    const int64_t idx = row_best[r];
    out_index[row] = idx;
    out_dist[row] = distance<acc_t, acc_t>(metric, x + row * D, cb + idx * D, D);
  }
}

template <typename acc_t>
__global__ void finalize_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ cb,
                                int64_t N, int64_t D, Metric metric, int splits,
                                const acc_t* __restrict__ part_score,
                                const int32_t* __restrict__ part_index,
                                int64_t* __restrict__ out_index, acc_t* __restrict__ out_dist) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  acc_t best = part_score[row];
  int32_t idx = part_index[row];
  for (int s = 1; s < splits; ++s) {
    const acc_t ps = part_score[int64_t(s) * N + row];
    const int32_t pi = part_index[int64_t(s) * N + row];
    if (better<acc_t>(ps, pi, best, idx)) {
      best = ps;
      idx = pi;
    }
  }
  out_index[row] = idx;
  out_dist[row] = distance<acc_t, acc_t>(metric, x + row * D, cb + int64_t(idx) * D, D);
}

// xs: (N, D) contiguous, cb: (K, D) contiguous, both acc_t.
// idx_flat: (N,) int64, dist_flat: (N,) acc_t, both contiguous.
template <typename acc_t>
void search_cuda(const at::Tensor& xs, const at::Tensor& cb, Metric metric, at::Tensor& idx_flat,
                 at::Tensor& dist_flat) {
  const int64_t N = xs.size(0), K = cb.size(0), D = cb.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor scaled = at::empty({K, D}, cb.options());
  at::Tensor bias = at::empty({K}, cb.options());
  {
    const unsigned blocks = unsigned((K + kPrepWarps - 1) / kPrepWarps);
    prepare_codes_kernel<acc_t><<<blocks, kPrepWarps * 32, 0, stream>>>(
        cb.const_data_ptr<acc_t>(), K, D, metric, scaled.mutable_data_ptr<acc_t>(),
        bias.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const int64_t row_tiles = (N + kBM - 1) / kBM;
  const int64_t code_tiles = (K + kBN - 1) / kBN;
  TORCH_CHECK(row_tiles <= int64_t(INT32_MAX),
              "pyvq.nearest_code: too many rows for one CUDA launch (", N, ")");
  // Enough blocks to fill the GPU about twice over, in whole code tiles.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits =
      std::min<int64_t>({(2 * sms + row_tiles - 1) / row_tiles, code_tiles, int64_t(kMaxSplits)});
  splits = std::max<int64_t>(splits, 1);
  const int64_t tiles_per_split = (code_tiles + splits - 1) / splits;
  const int64_t codes_per_split = tiles_per_split * kBN;
  splits = (K + codes_per_split - 1) / codes_per_split;

  at::Tensor part_score, part_index;
  if (splits > 1) {
    part_score = at::empty({splits, N}, cb.options());
    part_index = at::empty({splits, N}, cb.options().dtype(at::kInt));
  }
  const dim3 grid{unsigned(row_tiles), unsigned(splits)};
  search_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
      xs.const_data_ptr<acc_t>(), cb.const_data_ptr<acc_t>(), scaled.const_data_ptr<acc_t>(),
      bias.const_data_ptr<acc_t>(), N, K, D, metric, codes_per_split,
      idx_flat.mutable_data_ptr<int64_t>(), dist_flat.mutable_data_ptr<acc_t>(),
      splits > 1 ? part_score.mutable_data_ptr<acc_t>() : nullptr,
      splits > 1 ? part_index.mutable_data_ptr<int32_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (splits > 1) {
    constexpr int kFinThreads = 256;
    const int64_t blocks = (N + kFinThreads - 1) / kFinThreads;
    finalize_kernel<acc_t><<<unsigned(blocks), kFinThreads, 0, stream>>>(
        xs.const_data_ptr<acc_t>(), cb.const_data_ptr<acc_t>(), N, D, metric, int(splits),
        part_score.const_data_ptr<acc_t>(), part_index.const_data_ptr<int32_t>(),
        idx_flat.mutable_data_ptr<int64_t>(), dist_flat.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x,
                                                     const at::Tensor& codebook,
                                                     c10::string_view metric_name) {
  check_inputs(x, codebook);
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  const c10::cuda::CUDAGuard device_guard(x.device());

  const int64_t D = codebook.size(1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor indices = at::empty(out_shape, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty(out_shape, x.options());
  const int64_t N = indices.numel();
  if (N == 0) return {distances, indices};

  const at::ScalarType ct = compute_dtype(x, codebook);
  const at::Tensor cb = codebook.to(ct).contiguous();
  // reshape({N, D}), not ({-1, D}): the latter is ambiguous when D == 0.
  const at::Tensor xs = x.reshape({N, D}).to(ct).contiguous();
  at::Tensor idx_flat = indices.view({-1});
  at::Tensor dist_flat =
      distances.scalar_type() == ct ? distances.view({-1}) : at::empty({N}, cb.options());
  if (ct == at::kDouble)
    search_cuda<double>(xs, cb, metric, idx_flat, dist_flat);
  else
    search_cuda<float>(xs, cb, metric, idx_flat, dist_flat);
  if (distances.scalar_type() != ct) distances.view({-1}).copy_(dist_flat);
  return {distances, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CUDA, m) { m.impl("nearest_code", &nearest_code_cuda); }

}  // namespace codebook
}  // namespace pyvq
