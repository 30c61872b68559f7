// CPU launcher of pyvq::nearest_code: converts and packs the codebook once,
// then searches blocks of rows in parallel with at::parallel_for. See
// codebook_cpu_kernel.h for the kernel and codebook.h for the shared math.
#include "codebook/codebook_common.h"
#include "codebook/codebook_cpu_kernel.h"
#include "common/build_facts.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace pyvq {
namespace codebook {
namespace {

template <typename T>
void search_cpu(const at::Tensor& x_any, const at::Tensor& cb, Metric metric, at::Tensor& indices,
                at::Tensor& distances) {
  const int64_t N = x_any.size(0), K = cb.size(0), D = cb.size(1);
  const int64_t P = cpu::num_panels(K);
  const CpuIsa isa = cpu_isa_for(cpu::kSearchIsa);  // once per call: PYVQ_CPU_ISA may change
  at::Tensor packed = at::empty({P * D * cpu::kPanel + 1}, cb.options());
  at::Tensor bias = at::empty({P * cpu::kPanel}, cb.options());
  at::Tensor bf16;
  if (std::is_same_v<T, float> && cpu::use_screening(D, isa))
    bf16 = at::empty({P * cpu::bf16_pairs(D) * cpu::kPanel}, cb.options().dtype(at::kInt));
  cpu::PackedCodes<T> codes;
  cpu::pack_codes<T>(
      cb.const_data_ptr<T>(), K, D, metric, packed.mutable_data_ptr<T>(),
      bias.mutable_data_ptr<T>(),
      bf16.defined() ? reinterpret_cast<uint32_t*>(bf16.mutable_data_ptr<int32_t>()) : nullptr,
      &codes);
  cpu::Blocking blk = cpu::choose_blocking<T>(D);
  // Smaller row blocks when there are few rows, so every thread gets work.
  const int64_t per_task = (N + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  const int64_t rounded = (per_task + cpu::kMaxMR - 1) / cpu::kMaxMR * cpu::kMaxMR;
  blk.rows = std::max<int64_t>(cpu::kMaxMR, std::min(blk.rows, rounded));
  const T* cbp = cb.const_data_ptr<T>();
  int64_t* out_idx = indices.mutable_data_ptr<int64_t>();
  const bool same = x_any.scalar_type() == cb.scalar_type();
  const int64_t nblocks = (N + blk.rows - 1) / blk.rows;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x_any.scalar_type(), "nearest_code_cpu", [&] {
        using in_t = scalar_t;
        const in_t* xin = x_any.const_data_ptr<in_t>();
        in_t* dist = distances.mutable_data_ptr<in_t>();
        at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
          const int64_t cap = blk.rows * (D > 0 ? D : 1);
          // One scratch allocation per task: packed rows, running scores,
          // and (for a dtype other than T) the rows converted to T.
          at::Tensor scratch =
              at::empty({cpu::scratch_size<T>(blk, D) + (same ? 0 : cap)}, cb.options());
          at::Tensor iscratch = at::empty({blk.rows}, indices.options().dtype(at::kInt));
          T* s = scratch.mutable_data_ptr<T>();
          T* conv = s + cpu::scratch_size<T>(blk, D);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r0 = b * blk.rows;
            const int64_t rows = std::min(blk.rows, N - r0);
            const T* xr;
            if (same) {
              xr = reinterpret_cast<const T*>(xin) + r0 * D;
            } else {
              for (int64_t i = 0; i < rows * D; ++i) conv[i] = static_cast<T>(xin[r0 * D + i]);
              xr = conv;
            }
            cpu::search_rows<T>(isa, codes, xr, rows, blk, s, iscratch.mutable_data_ptr<int32_t>(),
                                out_idx + r0);
            for (int64_t i = 0; i < rows; ++i) {
              const T* c = cbp + out_idx[r0 + i] * D;
              dist[r0 + i] = static_cast<in_t>(distance<T, T>(metric, xr + i * D, c, D));
            }
          }
        });
      });
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                    c10::string_view metric_name) {
  check_inputs(x, codebook);
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  const int64_t D = codebook.size(1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor indices = at::empty(out_shape, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty(out_shape, x.options());
  if (indices.numel() == 0) return {distances, indices};

  const at::ScalarType ct = compute_dtype(x, codebook);
  at::Tensor cb = codebook.to(ct).contiguous();
  at::Tensor xs = x.reshape({indices.numel(), D});
  if (xs.scalar_type() != ct && xs.scalar_type() != at::kHalf && xs.scalar_type() != at::kBFloat16)
    xs = xs.to(ct);  // float32 rows with a float64 codebook
  xs = xs.contiguous();
  at::Tensor idx_flat = indices.view({-1});
  at::Tensor dist_flat = at::empty({xs.size(0)}, xs.options());
  if (ct == at::kDouble)
    search_cpu<double>(xs, cb, metric, idx_flat, dist_flat);
  else
    search_cpu<float>(xs, cb, metric, idx_flat, dist_flat);
  distances.view({-1}).copy_(dist_flat);
  return {distances, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CPU, m) { m.impl("nearest_code", &nearest_code_cpu); }

PYVQ_REGISTER_CPU_OP("nearest_code", cpu::kSearchIsa);

}  // namespace codebook
}  // namespace pyvq
