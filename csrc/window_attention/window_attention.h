// Index math of pyvq::window_attention (Swin's W-MSA / SW-MSA core), shared by every kernel.
//
// Layout: q, k, v are (B, heads, H, W, d) with H, W multiples of the window side w. The grid is
// rolled by -shift in both axes and cut into (H / w) x (W / w) windows of N = w * w tokens:
//
//   rolled position (r, c) holds the token of original position ((r + shift) % H, (c + shift) % W);
//   it lies in window (r / w, c / w) at local index i = (r % w) * w + (c % w) (row-major).
//
// Relative position bias: query i = (ri, ci) and key j = (rj, cj) of one window read row
//   (ri - rj + w - 1) * (2w - 1) + (ci - cj + w - 1)
// of the ((2w - 1)^2, heads) table (Swin's relative_position_index).
//
// Shifted-window mask (shift > 0): each rolled axis of length n splits into the regions
// [0, n - w) -> 0, [n - w, n - shift) -> 1, [n - shift, n) -> 2; a token's region id is
// 3 * row_region + col_region, and tokens of different regions do not attend to each other. The
// boundaries n - w and n - shift both fall in the last window of the axis (n - w is a window
// boundary), so only windows in the last window row or column can mix regions.
//
// Plain integers only (no ATen): the CPU launcher calls these per token, a CUDA or Triton
// kernel can do the same.
#pragma once

#include "common/macros.h"

#include <cstdint>

namespace pyvq {
namespace window_attention {

// The original coordinate of rolled coordinate p on an axis of length n.
PYVQ_HOST_DEVICE int64_t source_coord(int64_t p, int64_t shift, int64_t n) {
  const int64_t s = p + shift;
  return s >= n ? s - n : s;  // 0 <= p < n and 0 <= shift < w <= n
}

// Region (0, 1 or 2) of rolled coordinate p on an axis of length n; 0 without a shift.
PYVQ_HOST_DEVICE int axis_region(int64_t p, int64_t n, int64_t w, int64_t shift) {
  if (shift == 0) return 0;
  return p < n - w ? 0 : (p < n - shift ? 1 : 2);
}

// Region id of rolled position (r, c) on an H x W grid.
PYVQ_HOST_DEVICE int region_id(int64_t r, int64_t c, int64_t H, int64_t W, int64_t w,
                               int64_t shift) {
  return 3 * axis_region(r, H, w, shift) + axis_region(c, W, w, shift);
}

// Whether window (wr, wc) of an nwr x nwc window grid holds tokens of more than one region.
PYVQ_HOST_DEVICE bool window_is_mixed(int64_t wr, int64_t wc, int64_t nwr, int64_t nwc,
                                      int64_t shift) {
  return shift > 0 && (wr == nwr - 1 || wc == nwc - 1);
}

// Row of the ((2w - 1)^2, heads) bias table read by query i and key j of a window.
PYVQ_HOST_DEVICE int bias_index(int i, int j, int w) {
  const int ri = i / w, ci = i - ri * w, rj = j / w, cj = j - rj * w;
  return (ri - rj + w - 1) * (2 * w - 1) + (ci - cj + w - 1);
}

// Sizes of one call.
struct Geometry {
  int64_t B, heads, H, W, d;
  int64_t w, shift;
  int64_t nwr, nwc;  // windows per column and per row of the grid: H / w, W / w
  int64_t N;         // tokens per window, w * w
};

PYVQ_HOST_DEVICE Geometry make_geometry(int64_t B, int64_t heads, int64_t H, int64_t W,
                                        int64_t d, int64_t w, int64_t shift) {
  return {B, heads, H, W, d, w, shift, H / w, W / w, w * w};
}

// Original (row, col) of local token i of window (wr, wc).
PYVQ_HOST_DEVICE void token_source(const Geometry& g, int64_t wr, int64_t wc, int64_t i,
                                   int64_t* row, int64_t* col) {
  const int64_t li = i / g.w, lj = i - li * g.w;
  *row = source_coord(wr * g.w + li, g.shift, g.H);
  *col = source_coord(wc * g.w + lj, g.shift, g.W);
}

// Region id of local token i of window (wr, wc).
PYVQ_HOST_DEVICE int token_region(const Geometry& g, int64_t wr, int64_t wc, int64_t i) {
  const int64_t li = i / g.w, lj = i - li * g.w;
  return region_id(wr * g.w + li, wc * g.w + lj, g.H, g.W, g.w, g.shift);
}

}  // namespace window_attention
}  // namespace pyvq
