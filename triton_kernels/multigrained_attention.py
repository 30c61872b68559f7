"""Triton kernels of ``pyvq.ops.multigrained_attention`` (the CUDA path),
installed as ``pyvq.triton_kernels.multigrained_attention``; launched by
pyvq/ops/_multigrained_attention_triton.py. The math is that of
pyvq/reference/multigrained_attention.py.

Layout and indexing (nothing is materialised: no padded or unfolded copy of
k / v, no mask, no attention matrix):

- q, k, v, out, grad_out: (B, heads, H, W, head_dim); global_k, global_v:
  (B, heads, G, head_dim); any strides (each kernel takes every stride);
- blocks of ``WS x WS`` tokens, row-major over the grid (``n_blk_cols = W /
  WS`` per row); a block's tokens are row-major inside it (local index ``t``
  -> ``(bi * WS + t // WS, bj * WS + t % WS)``);
- the extended window of block (bi, bj) is rows ``[r0, r1) = [max(0, bi*WS -
  halo), min(H, (bi + 1)*WS + halo))`` by columns ``[c0, c1)`` likewise; its
  ``(r1 - r0) * (c1 - c0)`` keys are walked in tiles of BLOCK_N by index
  ``n -> (r0 + n // (c1 - c0), c0 + n % (c1 - c0))``, so positions outside
  the grid are never addressed (the launcher clips halo to max(H, W));
- lse (B, heads, H, W) and the backward's ``D = rowsum(dO * O)`` are in the
  accumulation dtype (float32, float64 for float64 inputs).

Forward (``multigrained_attention_fwd_kernel``): one program per (batch *
head, block), looping over the block's query tiles (BLOCK_M, so Ws = 16 takes
four tiles of 64); per query tile one online softmax runs over the window's
key tiles, then over the G global keys in tiles of BLOCK_G.

Backward, after ``attention_bwd_preprocess_kernel`` (D per token), recomputes
P = exp(S - lse) and dS = P * (dP - D) in three passes, none with atomics, so
every gradient is bitwise reproducible run to run:

- ``multigrained_attention_bwd_dq_kernel``: a program per (batch * head,
  block) as in forward; dQ of each query tile over both key ranges;
- ``multigrained_attention_bwd_dkdv_kernel``: key-centric, a program per
  (batch * head, key block); dK, dV of each key tile accumulate in registers
  over the query blocks whose extended windows can contain it, the
  ``(2 * ceil(halo / WS) + 1)^2`` blocks around it (clipped to the grid), with
  the keys outside a query block's window masked per query block. It visits
  ``(2 ceil(halo/WS) + 1)^2 WS^4`` (query, key) pairs per key block against
  forward's ``WS^2 (WS + 2 halo)^2``: the masked pairs of the outer blocks
  are the price of owning the key block's gradients without atomics;
- ``multigrained_attention_bwd_global_kernel``: global-key-centric, a
  program per (batch * head, tile of BLOCK_G global keys) looping over all
  H * W queries of its (b, h): dK, dV of the globals in registers, no
  scratch tensor and no cross-program reduction (the global scores are
  recomputed once more instead; G is small, one per block).

Precision as for window attention (triton_kernels/_attention_common.py):
tiles cast to the accumulation dtype after loading, ``ieee`` dots, bfloat16
stores rounded to nearest even; ``scale`` is a float64 argument.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (PREPROCESS_BLOCK, attention_bwd_preprocess_kernel, load_tile,  # noqa: F401
                                online_step, preprocess_grid, query_stats, split_program, store_out_lse,
                                tile_sizes, to_storage)


def block_sizes(block_size: int, halo: int, H: int, W: int, G: int, head_dim: int) -> dict:
    """Launch meta-parameters: BLOCK_M (query tile of a block's Ws^2
    queries), BLOCK_N (key tile of the extended window), BLOCK_G (tile of the
    global keys), BLOCK_D (head_dim padded to a power of two), num_warps.
    ``halo`` is already clipped to max(H, W)."""
    window = min(H, block_size + 2 * halo) * min(W, block_size + 2 * halo)
    meta = tile_sizes(block_size * block_size, window, head_dim)
    meta["BLOCK_G"] = tile_sizes(1, G, head_dim)["BLOCK_N"]
    return meta


def block_grid(batch_heads: int, n_blocks: int) -> tuple:
    """One program per (batch * head, block), flattened on grid axis 0 (the
    only axis allowed more than 65535 programs)."""
    return (batch_heads * n_blocks,)


def global_grid(batch_heads: int, n_global: int, block_g: int) -> tuple:
    """Grid of ``multigrained_attention_bwd_global_kernel``: one program per
    (batch * head, tile of ``block_g`` global keys)."""
    return (batch_heads * triton.cdiv(n_global, block_g),)


# --- shared pieces ----------------------------------------------------------

@triton.jit
def _program_block(n_blocks, heads, n_blk_cols):
    """b * heads + h, b and h (int64) and the block row / column of this
    program (one per (batch * head, block))."""
    blk, bh, b, h = split_program(n_blocks, heads)
    return bh, b, h, blk // n_blk_cols, blk % n_blk_cols


@triton.jit
def _block_tokens(offs, bi, bj, WS: tl.constexpr):
    """Grid row, column (int64) and valid mask of local tokens ``offs`` of
    block (bi, bj)."""
    row = bi * WS + offs // WS
    col = bj * WS + offs % WS
    return row.to(tl.int64), col.to(tl.int64), offs < WS * WS


@triton.jit
def _window(bi, bj, H, W, halo, WS: tl.constexpr):
    """First row and column, column count and key count of block (bi, bj)'s
    extended window clipped to the grid."""
    r0 = tl.maximum(bi * WS - halo, 0)
    r1 = tl.minimum((bi + 1) * WS + halo, H)
    c0 = tl.maximum(bj * WS - halo, 0)
    c1 = tl.minimum((bj + 1) * WS + halo, W)
    return r0, c0, c1 - c0, (r1 - r0) * (c1 - c0)


@triton.jit
def _window_keys(offs, r0, c0, nc, n_keys):
    """Grid row, column (int64) and valid mask of keys ``offs`` of a window
    (as returned by ``_window``)."""
    row = r0 + offs // nc
    col = c0 + offs % nc
    return row.to(tl.int64), col.to(tl.int64), offs < n_keys


@triton.jit
def _in_window(row, col, bi, bj, halo, WS: tl.constexpr):
    """Whether grid positions (row, col) lie in block (bi, bj)'s extended
    window (positions are inside the grid, so no clipping is needed)."""
    rows = (row >= bi * WS - halo) & (row < (bi + 1) * WS + halo)
    cols = (col >= bj * WS - halo) & (col < (bj + 1) * WS + halo)
    return rows & cols


@triton.jit
def _load_kv(k_base, sk_r, sk_c, sk_d, v_base, sv_r, sv_c, sv_d, row, col, offs_d, valid, d_mask, ACC: tl.constexpr):
    """k and v tiles at grid positions (row, col)."""
    k = load_tile(k_base, row, col, sk_r, sk_c, offs_d, sk_d, valid, d_mask, ACC)
    v = load_tile(v_base, row, col, sv_r, sv_c, offs_d, sv_d, valid, d_mask, ACC)
    return k, v


@triton.jit
def _load_globals(g0, gk_base, sgk_g, sgk_d, gv_base, sgv_g, sgv_d, G, offs_d, d_mask,
                  BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """Index, valid mask and the global_k, global_v tiles of the global keys
    [g0, g0 + BLOCK_G) (a (G, head_dim) slice read as a G x 1 grid)."""
    offs_g = g0 + tl.arange(0, BLOCK_G)
    valid = offs_g < G
    gidx = offs_g.to(tl.int64)
    gk = load_tile(gk_base, gidx, gidx, sgk_g, 0, offs_d, sgk_d, valid, d_mask, ACC)
    gv = load_tile(gv_base, gidx, gidx, sgv_g, 0, offs_d, sgv_d, valid, d_mask, ACC)
    return offs_g, valid, gk, gv


@triton.jit
def _scores(q, k, scale, keep, ACC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores ``q k^T * scale``, -inf for keys not in
    ``keep`` (padding, or outside the query block's window)."""
    # scale is a float64 argument (float64 inputs keep its precision); the
    # product is brought back to the accumulation dtype.
    s = (tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale).to(ACC)
    return tl.where(keep[None, :], s, float("-inf"))


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, scale, keep, ACC: tl.constexpr):
    """P = exp(S - lse) and dS = P * (dO v^T - D) of a (query, key) tile."""
    p = tl.exp(_scores(q, k, scale, keep, ACC) - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=ACC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _store_rows(ptr, rows, offs_d, head_dim, x, valid, d_mask):
    """Store a (tokens, BLOCK_D) tile at token ``rows`` of a contiguous
    (tokens, head_dim) slice, in ``ptr``'s dtype."""
    ptrs = ptr + rows[:, None] * head_dim + offs_d[None, :]
    tl.store(ptrs, to_storage(x, ptr.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])


# --- forward ------------------------------------------------------------------

@triton.jit
def multigrained_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, gk_ptr, gv_ptr, out_ptr, lse_ptr,
        sq_b, sq_h, sq_r, sq_c, sq_d,
        sk_b, sk_h, sk_r, sk_c, sk_d,
        sv_b, sv_h, sv_r, sv_c, sv_d,
        sgk_b, sgk_h, sgk_g, sgk_d,
        sgv_b, sgv_h, sgv_g, sgv_d,
        so_b, so_h, so_r, so_c, so_d,
        sl_b, sl_h, sl_r, sl_c,
        heads, H, W, G, head_dim, n_blocks, n_blk_cols, halo, scale: tl.float64,
        WS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """out (B, heads, H, W, head_dim) in out's dtype and lse (B, heads, H, W)
    in the accumulation dtype (lse's); one program per (batch * head, block),
    one online softmax over the extended window's keys, then the globals."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    bh, b, h, bi, bj = _program_block(n_blocks, heads, n_blk_cols)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    gk_base = gk_ptr + b * sgk_b + h * sgk_h
    gv_base = gv_ptr + b * sgv_b + h * sgv_h
    o_base = out_ptr + b * so_b + h * so_h
    l_base = lse_ptr + b * sl_b + h * sl_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    r0, c0, nc, n_keys = _window(bi, bj, H, W, halo, WS)
    for m0 in range(0, WS * WS, BLOCK_M):
        row_q, col_q, valid_q = _block_tokens(m0 + tl.arange(0, BLOCK_M), bi, bj, WS)
        q = load_tile(q_base, row_q, col_q, sq_r, sq_c, offs_d, sq_d, valid_q, d_mask, ACC)
        m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
        l_i = tl.zeros((BLOCK_M,), ACC)
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        for n0 in range(0, n_keys, BLOCK_N):
            row_k, col_k, valid_k = _window_keys(n0 + tl.arange(0, BLOCK_N), r0, c0, nc, n_keys)
            k, v = _load_kv(k_base, sk_r, sk_c, sk_d, v_base, sv_r, sv_c, sv_d, row_k, col_k, offs_d, valid_k,
                            d_mask, ACC)
            m_i, l_i, acc = online_step(m_i, l_i, acc, _scores(q, k, scale, valid_k, ACC), v, ACC)
        for g0 in range(0, G, BLOCK_G):
            offs_g, valid_g, gk, gv = _load_globals(g0, gk_base, sgk_g, sgk_d, gv_base, sgv_g, sgv_d, G, offs_d,
                                                    d_mask, BLOCK_G, ACC)
            m_i, l_i, acc = online_step(m_i, l_i, acc, _scores(q, gk, scale, valid_g, ACC), gv, ACC)
        store_out_lse(o_base, so_r, so_c, so_d, l_base, sl_r, sl_c, row_q, col_q, offs_d, valid_q, d_mask, acc, m_i,
                      l_i)


# --- backward -------------------------------------------------------------------

@triton.jit
def multigrained_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, gk_ptr, gv_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        sq_b, sq_h, sq_r, sq_c, sq_d,
        sk_b, sk_h, sk_r, sk_c, sk_d,
        sv_b, sv_h, sv_r, sv_c, sv_d,
        sgk_b, sgk_h, sgk_g, sgk_d,
        sgv_b, sgv_h, sgv_g, sgv_d,
        sg_b, sg_h, sg_r, sg_c, sg_d,
        sl_b, sl_h, sl_r, sl_c,
        heads, H, W, G, head_dim, n_blocks, n_blk_cols, halo, scale: tl.float64,
        WS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """grad_q, contiguous (B, heads, H, W, head_dim) in its dtype: one program
    per (batch * head, block), each query tile over both key ranges. dO and
    lse have their own strides; delta is contiguous (B * heads, H * W)."""
    ACC: tl.constexpr = delta_ptr.dtype.element_ty
    bh, b, h, bi, bj = _program_block(n_blocks, heads, n_blk_cols)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    gk_base = gk_ptr + b * sgk_b + h * sgk_h
    gv_base = gv_ptr + b * sgv_b + h * sgv_h
    g_base = do_ptr + b * sg_b + h * sg_h
    l_base = lse_ptr + b * sl_b + h * sl_h
    d_base = delta_ptr + bh.to(tl.int64) * H * W
    dq_base = dq_ptr + bh.to(tl.int64) * H * W * head_dim
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    r0, c0, nc, n_keys = _window(bi, bj, H, W, halo, WS)
    for m0 in range(0, WS * WS, BLOCK_M):
        row_q, col_q, valid_q = _block_tokens(m0 + tl.arange(0, BLOCK_M), bi, bj, WS)
        q = load_tile(q_base, row_q, col_q, sq_r, sq_c, offs_d, sq_d, valid_q, d_mask, ACC)
        do = load_tile(g_base, row_q, col_q, sg_r, sg_c, offs_d, sg_d, valid_q, d_mask, ACC)
        lse, delta = query_stats(l_base, sl_r, sl_c, d_base, W, row_q, col_q, valid_q, ACC)
        dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        for n0 in range(0, n_keys, BLOCK_N):
            row_k, col_k, valid_k = _window_keys(n0 + tl.arange(0, BLOCK_N), r0, c0, nc, n_keys)
            k, v = _load_kv(k_base, sk_r, sk_c, sk_d, v_base, sv_r, sv_c, sv_d, row_k, col_k, offs_d, valid_k,
                            d_mask, ACC)
            p, ds = _probs_and_dscores(q, k, v, do, lse, delta, scale, valid_k, ACC)
            dq += tl.dot(ds, k, input_precision="ieee", out_dtype=ACC)
        for g0 in range(0, G, BLOCK_G):
            offs_g, valid_g, gk, gv = _load_globals(g0, gk_base, sgk_g, sgk_d, gv_base, sgv_g, sgv_d, G, offs_d,
                                                    d_mask, BLOCK_G, ACC)
            p, ds = _probs_and_dscores(q, gk, gv, do, lse, delta, scale, valid_g, ACC)
            dq += tl.dot(ds, gk, input_precision="ieee", out_dtype=ACC)
        _store_rows(dq_base, row_q * W + col_q, offs_d, head_dim, dq * scale, valid_q, d_mask)


@triton.jit
def multigrained_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        sq_b, sq_h, sq_r, sq_c, sq_d,
        sk_b, sk_h, sk_r, sk_c, sk_d,
        sv_b, sv_h, sv_r, sv_c, sv_d,
        sg_b, sg_h, sg_r, sg_c, sg_d,
        sl_b, sl_h, sl_r, sl_c,
        heads, H, W, head_dim, n_blocks, n_blk_cols, halo, reach, scale: tl.float64,
        WS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_k, grad_v of the local keys, contiguous (B, heads, H, W,
    head_dim) in their dtypes: one program per (batch * head, key block),
    over the query blocks within ``reach = ceil(halo / WS)`` blocks of it
    (see the module docstring)."""
    ACC: tl.constexpr = delta_ptr.dtype.element_ty
    bh, b, h, ki, kj = _program_block(n_blocks, heads, n_blk_cols)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    g_base = do_ptr + b * sg_b + h * sg_h
    l_base = lse_ptr + b * sl_b + h * sl_h
    d_base = delta_ptr + bh.to(tl.int64) * H * W
    out_off = bh.to(tl.int64) * H * W * head_dim
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    qi0 = tl.maximum(ki - reach, 0)
    qi1 = tl.minimum(ki + reach + 1, H // WS)
    qj0 = tl.maximum(kj - reach, 0)
    qj1 = tl.minimum(kj + reach + 1, n_blk_cols)
    for n0 in range(0, WS * WS, BLOCK_N):
        row_k, col_k, valid_k = _block_tokens(n0 + tl.arange(0, BLOCK_N), ki, kj, WS)
        k, v = _load_kv(k_base, sk_r, sk_c, sk_d, v_base, sv_r, sv_c, sv_d, row_k, col_k, offs_d, valid_k, d_mask,
                        ACC)
        dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        dv = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        for qi in range(qi0, qi1):
            for qj in range(qj0, qj1):
                keep = valid_k & _in_window(row_k, col_k, qi, qj, halo, WS)
                for m0 in range(0, WS * WS, BLOCK_M):
                    row_q, col_q, valid_q = _block_tokens(m0 + tl.arange(0, BLOCK_M), qi, qj, WS)
                    q = load_tile(q_base, row_q, col_q, sq_r, sq_c, offs_d, sq_d, valid_q, d_mask, ACC)
                    do = load_tile(g_base, row_q, col_q, sg_r, sg_c, offs_d, sg_d, valid_q, d_mask, ACC)
                    lse, delta = query_stats(l_base, sl_r, sl_c, d_base, W, row_q, col_q, valid_q, ACC)
                    p, ds = _probs_and_dscores(q, k, v, do, lse, delta, scale, keep, ACC)
                    dv += tl.dot(tl.trans(p), do, input_precision="ieee", out_dtype=ACC)
                    dk += tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=ACC)
        rows = row_k * W + col_k
        _store_rows(dk_ptr + out_off, rows, offs_d, head_dim, dk * scale, valid_k, d_mask)
        _store_rows(dv_ptr + out_off, rows, offs_d, head_dim, dv, valid_k, d_mask)


@triton.jit
def multigrained_attention_bwd_global_kernel(
        q_ptr, gk_ptr, gv_ptr, do_ptr, lse_ptr, delta_ptr, dgk_ptr, dgv_ptr,
        sq_b, sq_h, sq_r, sq_c, sq_d,
        sgk_b, sgk_h, sgk_g, sgk_d,
        sgv_b, sgv_h, sgv_g, sgv_d,
        sg_b, sg_h, sg_r, sg_c, sg_d,
        sl_b, sl_h, sl_r, sl_c,
        heads, H, W, G, head_dim, scale: tl.float64,
        BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_global_k, grad_global_v, contiguous (B, heads, G, head_dim) in
    their dtypes: one program per (batch * head, tile of BLOCK_G globals),
    over all H * W queries of its (b, h) in row-major tiles of BLOCK_M."""
    ACC: tl.constexpr = delta_ptr.dtype.element_ty
    tile, bh, b, h = split_program(tl.cdiv(G, BLOCK_G), heads)
    q_base = q_ptr + b * sq_b + h * sq_h
    g_base = do_ptr + b * sg_b + h * sg_h
    l_base = lse_ptr + b * sl_b + h * sl_h
    d_base = delta_ptr + bh.to(tl.int64) * H * W
    out_off = bh.to(tl.int64) * G * head_dim
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    offs_g, valid_g, gk, gv = _load_globals(tile * BLOCK_G, gk_ptr + b * sgk_b + h * sgk_h, sgk_g, sgk_d,
                                            gv_ptr + b * sgv_b + h * sgv_h, sgv_g, sgv_d, G, offs_d, d_mask,
                                            BLOCK_G, ACC)
    dgk = tl.zeros((BLOCK_G, BLOCK_D), ACC)
    dgv = tl.zeros((BLOCK_G, BLOCK_D), ACC)
    for m0 in range(0, H * W, BLOCK_M):
        offs = m0 + tl.arange(0, BLOCK_M)
        valid_q = offs < H * W
        row_q = (offs // W).to(tl.int64)
        col_q = (offs % W).to(tl.int64)
        q = load_tile(q_base, row_q, col_q, sq_r, sq_c, offs_d, sq_d, valid_q, d_mask, ACC)
        do = load_tile(g_base, row_q, col_q, sg_r, sg_c, offs_d, sg_d, valid_q, d_mask, ACC)
        lse, delta = query_stats(l_base, sl_r, sl_c, d_base, W, row_q, col_q, valid_q, ACC)
        p, ds = _probs_and_dscores(q, gk, gv, do, lse, delta, scale, valid_g, ACC)
        dgv += tl.dot(tl.trans(p), do, input_precision="ieee", out_dtype=ACC)
        dgk += tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=ACC)
    rows = offs_g.to(tl.int64)
    _store_rows(dgk_ptr + out_off, rows, offs_d, head_dim, dgk * scale, valid_g, d_mask)
    _store_rows(dgv_ptr + out_off, rows, offs_d, head_dim, dgv, valid_g, d_mask)
