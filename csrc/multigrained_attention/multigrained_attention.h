// Index math of pyvq::multigrained_attention (Efficient-VQGAN's multi-grained attention, Cao et
// al., Sec. 3.2), shared by every kernel.
//
// Layout: q, k, v are (B, heads, H, W, d) with H, W multiples of the block side ws; global_k,
// global_v are (B, heads, G, d). The grid is cut into nbr x nbc = (H / ws) x (W / ws) blocks of
// M = ws * ws queries; block (bi, bj) is number bi * nbc + bj, and its query i = li * ws + lj
// (row-major) sits at grid position (bi * ws + li, bj * ws + lj).
//
// Keys of block (bi, bj), in the order every kernel streams them through one softmax:
//   local   the block's extended window clipped to the grid, rows [r0, r1) x columns [c0, c1)
//           with r0 = max(0, bi * ws - halo), r1 = min(H, (bi + 1) * ws + halo) (columns
//           likewise), row-major: local key j is grid position (r0 + j / (c1 - c0),
//           c0 + j % (c1 - c0)); positions outside the grid are not keys at all (never
//           zero-padded into the softmax);
//   global  then the G global keys, key nk + g for g < G, nk = (r1 - r0) * (c1 - c0).
//
// Backward overlap: the windows of block rows bi and bi' share grid rows only when
// |bi - bi'| * ws < ws + 2 halo. Block rows of one colour class p (bi % P == p, with
// P = 1 + ceil(2 halo / ws), at most nbr) therefore have disjoint windows, so a CPU backward
// that runs the classes one after another, the block rows of one class in parallel, adds every
// local key's gradient contributions in one fixed order (class by class, then the blocks of a
// block row left to right) without atomics.
//
// Plain integers only (no ATen): the CPU launcher calls these per block and key.
#pragma once

#include "common/macros.h"

#include <cstdint>

namespace pyvq {
namespace multigrained_attention {

// A halo of max(H, W) already covers the whole grid from every block; larger ones are clipped.
PYVQ_HOST_DEVICE int64_t clip_halo(int64_t halo, int64_t H, int64_t W) {
  const int64_t most = H > W ? H : W;
  return halo < most ? halo : most;
}

// First grid coordinate of block b's extended window on an axis.
PYVQ_HOST_DEVICE int64_t window_begin(int64_t b, int64_t ws, int64_t halo) {
  const int64_t lo = b * ws - halo;
  return lo > 0 ? lo : 0;
}

// One past the last grid coordinate of block b's extended window on an axis of length n.
PYVQ_HOST_DEVICE int64_t window_end(int64_t b, int64_t ws, int64_t halo, int64_t n) {
  const int64_t hi = (b + 1) * ws + halo;
  return hi < n ? hi : n;
}

// The number of colour classes of block rows whose windows are disjoint within a class (header
// comment): 1 + ceil(2 halo / ws), at most nbr (then every class is one block row).
PYVQ_HOST_DEVICE int64_t num_row_classes(int64_t ws, int64_t halo, int64_t nbr) {
  const int64_t p = 1 + (2 * halo + ws - 1) / ws;
  return p < nbr ? p : (nbr > 0 ? nbr : 1);
}

// Sizes of one call (halo already clipped).
struct Geometry {
  int64_t B, heads, H, W, d;
  int64_t ws, halo, G;
  int64_t nbr, nbc;  // blocks per column and per row of the grid: H / ws, W / ws
  int64_t M;         // queries per block, ws * ws
};

PYVQ_HOST_DEVICE Geometry make_geometry(int64_t B, int64_t heads, int64_t H, int64_t W,
                                        int64_t d, int64_t ws, int64_t halo, int64_t G) {
  return {B, heads, H, W, d, ws, clip_halo(halo, H, W), G, H / ws, W / ws, ws * ws};
}

// The clipped extended window of one block: rows [r0, r1) x columns [c0, c1).
struct Window {
  int64_t r0, r1, c0, c1;
};

PYVQ_HOST_DEVICE Window block_window(const Geometry& g, int64_t bi, int64_t bj) {
  return {window_begin(bi, g.ws, g.halo), window_end(bi, g.ws, g.halo, g.H),
          window_begin(bj, g.ws, g.halo), window_end(bj, g.ws, g.halo, g.W)};
}

// Number of local keys of a window.
PYVQ_HOST_DEVICE int64_t window_keys(const Window& w) { return (w.r1 - w.r0) * (w.c1 - w.c0); }

// Grid position of local key j of window w.
PYVQ_HOST_DEVICE void window_key(const Window& w, int64_t j, int64_t* row, int64_t* col) {
  const int64_t cols = w.c1 - w.c0;
  const int64_t jr = j / cols;
  *row = w.r0 + jr;
  *col = w.c0 + (j - jr * cols);
}

// Grid position of query i of block (bi, bj).
PYVQ_HOST_DEVICE void block_query(const Geometry& g, int64_t bi, int64_t bj, int64_t i,
                                  int64_t* row, int64_t* col) {
  const int64_t li = i / g.ws;
  *row = bi * g.ws + li;
  *col = bj * g.ws + (i - li * g.ws);
}

}  // namespace multigrained_attention
}  // namespace pyvq
