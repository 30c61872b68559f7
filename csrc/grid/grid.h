// Shared math of pyvq::grid_encode (multiresolution feature-grid lookup),
// run by the CPU launcher and the CUDA kernels alike. The definition is
// pyvq/reference/grid.py; in short, for one point, one group, one level of
// resolution r:
//
//   x_k in [0, 1] (clamped), p_k = x_k * r, cell_k = min(floor(p_k), r - 1),
//   w_k = p_k - cell_k; corner c (bit k = +1 along axis k) has vertex
//   v_k = cell_k + bit_k and interpolation weight prod_k (bit_k ? w_k : 1 - w_k);
//   its table row is
//     dense (when (r + 1)^d <= T):   sum_k v_k (r + 1)^k
//     "dense_mod":                    (sum_k v_k (r + 1)^k) mod T
//     "hash":                         (xor_k (uint32) v_k * pi_k) mod T.
//
// Everything a corner needs is split per axis (row_term[k][bit] and the two
// weights), so a corner costs d lookups instead of d multiplications.
#pragma once

#include "common/macros.h"

#include <cstdint>

namespace pyvq {
namespace grid {

constexpr int kMaxDim = 7;

enum class IndexMode : int32_t { kDenseMod = 0, kHash = 1 };

// Instant-NGP's primes, pi_1 = 1.
PYVQ_HOST_DEVICE uint32_t hash_prime(int k) {
  switch (k) {
    case 0: return 1u;
    case 1: return 2654435761u;
    case 2: return 805459861u;
    case 3: return 3674653429u;
    case 4: return 2097192037u;
    case 5: return 1434869437u;
    default: return 2165219737u;
  }
}

// How one level indexes its table.
struct LevelIndex {
  int64_t res;  // r
  bool dense;   // (r + 1)^d <= T
  bool hash;    // not dense and mode == kHash
  int64_t T;
  bool pow2;                // T is a power of two: "mod T" is "& (T - 1)"
  int64_t stride[kMaxDim];  // (r + 1)^k, reduced mod T unless dense
};

PYVQ_HOST_DEVICE uint64_t mod_table(uint64_t v, const LevelIndex& li) {
  return li.pow2 ? v & static_cast<uint64_t>(li.T - 1) : v % static_cast<uint64_t>(li.T);
}

PYVQ_HOST_DEVICE LevelIndex make_level_index(int64_t r, int d, int64_t T, IndexMode mode) {
  LevelIndex li;
  li.res = r;
  li.T = T;
  li.pow2 = (T & (T - 1)) == 0;
  // (r + 1)^d <= T without overflow: stop multiplying once past T.
  int64_t count = 1;
  bool dense = true;
  for (int k = 0; k < d; ++k) {
    if (count > T / (r + 1)) {
      dense = false;
      break;
    }
    count *= r + 1;
  }
  li.dense = dense && count <= T;
  li.hash = !li.dense && mode == IndexMode::kHash;
  int64_t s = 1;
  for (int k = 0; k < kMaxDim; ++k) {
    li.stride[k] = s;
    s = li.dense ? s * (r + 1) : (s * (r + 1)) % T;
    if (li.dense && k + 1 >= d) s = 0;  // unused past d; avoid overflow
  }
  return li;
}

// Per-axis part of a point at one level: the two weights, the two row terms
// (vertex cell_k and cell_k + 1), and whether x_k was strictly inside (0, 1)
// (the clamp passes gradient there only, as torch.clamp does).
template <typename acc_t>
struct Axis {
  acc_t w0, w1;      // 1 - w_k, w_k
  uint64_t term[2];  // dense / dense_mod: v * stride mod T; hash: (uint32) v * pi_k
  bool inside;
};

template <typename acc_t>
PYVQ_HOST_DEVICE Axis<acc_t> locate_axis(acc_t x, int k, const LevelIndex& li) {
  Axis<acc_t> a;
  a.inside = x > acc_t(0) && x < acc_t(1);  // torch.clamp's gradient mask
  const acc_t xc = x < acc_t(0) ? acc_t(0) : (x > acc_t(1) ? acc_t(1) : x);
  const acc_t p = xc * static_cast<acc_t>(li.res);
  int64_t cell = static_cast<int64_t>(p);  // p >= 0: truncation == floor
  if (cell > li.res - 1) cell = li.res - 1;
  const acc_t w = p - static_cast<acc_t>(cell);
  a.w0 = acc_t(1) - w;
  a.w1 = w;
  for (int b = 0; b < 2; ++b) {
    const int64_t v = cell + b;
    if (li.hash) {
      a.term[b] = static_cast<uint64_t>(static_cast<uint32_t>(v) * hash_prime(k));
    } else if (li.dense) {
      a.term[b] = static_cast<uint64_t>(v * li.stride[k]);
    } else {
      a.term[b] = mod_table(static_cast<uint64_t>(v * li.stride[k]), li);
    }
  }
  return a;
}

// All d axes of one point (x: its d coordinates).
template <typename acc_t>
PYVQ_HOST_DEVICE void locate_point(const acc_t* x, int d, const LevelIndex& li, Axis<acc_t>* ax) {
  for (int k = 0; k < d; ++k) ax[k] = locate_axis<acc_t>(x[k], k, li);
}

// Table row of corner `corner` from the axes' terms.
template <typename acc_t>
PYVQ_HOST_DEVICE int64_t corner_row(const Axis<acc_t>* axes, int d, int corner,
                                    const LevelIndex& li) {
  if (li.hash) {
    uint32_t h = 0;
    for (int k = 0; k < d; ++k) h ^= static_cast<uint32_t>(axes[k].term[(corner >> k) & 1]);
    return static_cast<int64_t>(mod_table(h, li));
  }
  uint64_t row = 0;
  for (int k = 0; k < d; ++k) row += axes[k].term[(corner >> k) & 1];
  return li.dense ? static_cast<int64_t>(row) : static_cast<int64_t>(mod_table(row, li));
}

// Interpolation weight of a corner: the product over axes in axis order
// (the reference's order, so float32 results match it closely).
template <typename acc_t>
PYVQ_HOST_DEVICE acc_t corner_weight(const Axis<acc_t>* axes, int d, int corner) {
  acc_t w = acc_t(1);
  for (int k = 0; k < d; ++k) w = w * ((corner >> k) & 1 ? axes[k].w1 : axes[k].w0);
  return w;
}

// d(weight)/d(w_k) of a corner: the other axes' factors, signed by bit k.
template <typename acc_t>
PYVQ_HOST_DEVICE acc_t corner_weight_grad(const Axis<acc_t>* axes, int d, int corner, int k) {
  acc_t w = (corner >> k) & 1 ? acc_t(1) : acc_t(-1);
  for (int j = 0; j < d; ++j)
    if (j != k) w = w * ((corner >> j) & 1 ? axes[j].w1 : axes[j].w0);
  return w;
}

}  // namespace grid
}  // namespace pyvq
