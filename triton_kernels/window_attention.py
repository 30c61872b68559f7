"""Triton kernels of ``pyvq.ops.window_attention`` (the CUDA path), installed
as ``pyvq.triton_kernels.window_attention``; launched by
pyvq/ops/_window_attention_triton.py. The math is that of
pyvq/reference/window_attention.py.

Layout and indexing (nothing is materialised: no rolled copy, no window
partition, no mask, no (windows, w^2, w^2) attention matrix):

- q, k, v, out, grad_out: (B, heads, H, W, head_dim), any strides (each
  kernel takes the five strides of each tensor);
- one program per (batch * head, window): program id
  ``pid = (b * heads + h) * n_windows + window``, windows row-major over the
  rolled grid (``n_win_cols = W / w`` per row);
- the local index ``i`` of a token inside its window is row-major
  (``ri = i // w``, ``ci = i % w``); its rolled position is
  ``(wr * w + ri, wc * w + ci)`` and it is read from / written to the
  original position ``((r + shift) % H, (c + shift) % W)``;
- relative position bias: ``bias_table[(ri - rj + w - 1) * (2w - 1) +
  (ci - cj + w - 1), h]`` (Swin's index), gathered per tile;
- shifted-window mask: each rolled axis of length n has regions
  ``[0, n - w) -> 0``, ``[n - w, n - shift) -> 1``, ``[n - shift, n) -> 2``;
  a token's region is ``3 * row_region + col_region`` and scores between
  tokens of different regions are ``-inf``;
- lse (B, heads, H, W) and the backward's ``D = rowsum(dO * O)`` are in the
  accumulation dtype (float32, float64 for float64 inputs) at the original
  positions.

A window's w*w tokens are cut into query blocks of BLOCK_M and key blocks of
BLOCK_N (both at least 16, tl.dot's smallest tile; a window of up to 64
tokens is a single block); padded rows and columns are masked. Every tile is
cast to the accumulation dtype after loading and every tl.dot runs with
``input_precision="ieee"`` (no TF32), so float16 / bfloat16 storage is
computed in float32 (Triton's interpreter has no bfloat16 arithmetic) and
float64 in float64. The price on a GPU: float32 / half dots run on FMA units,
not tensor cores (native half operands for ``q k^T``, or TF32x3, are the
tuning left for a machine with a GPU to measure). ``scale`` is a float64
argument so that float64 inputs keep its full precision.

Backward: ``window_attention_bwd_preprocess_kernel`` writes D per token,
then ``window_attention_bwd_kernel`` recomputes P from lse,
``dS = P * (dP - D)``; pass 1 loops over key blocks (dK, dV accumulated in
registers over the window's query blocks), pass 2 over query blocks (dQ over
key blocks), so a program owns its window's gradients and needs no atomics
for them. The bias gradient is summed into a scratch row per program,
``dbias_partial[pid, (2w - 1)^2]``, which the launcher reduces over batch and
windows with ``torch.sum`` (deterministic across programs). Inside a program
the default (``DETERMINISTIC_BIAS=False``) adds a tile into its row with
``tl.atomic_add``: pairs of one tile share bias entries, and on a GPU the
order of those float additions is unspecified, so the bias gradient may
differ in its last bits between runs (q, k, v gradients never do).
``DETERMINISTIC_BIAS=True`` (the launcher sets it under
``torch.use_deterministic_algorithms(True)``) sums each table entry with a
masked reduction in a fixed order instead: exact run to run, about
(2w - 1)^2 tile reductions more per tile.

Tile sizes, tile loads, the rounding store, the online-softmax step and the
final store of forward, the query statistics and the D preprocessing kernel
are shared with the multi-grained attention kernels
(triton_kernels/_attention_common.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (PREPROCESS_BLOCK, load_tile, online_step, preprocess_grid,  # noqa: F401
                                query_stats, store_out_lse, tile_sizes, to_storage)
from ._attention_common import attention_bwd_preprocess_kernel as window_attention_bwd_preprocess_kernel  # noqa: F401


def block_sizes(window_size: int, head_dim: int) -> dict:
    """Launch meta-parameters: BLOCK_M, BLOCK_N (tokens of a window per query /
    key block, equal), BLOCK_D (head_dim padded to a power of two) and
    num_warps."""
    tokens = window_size * window_size
    return tile_sizes(tokens, tokens, head_dim)


def window_grid(batch_heads: int, n_windows: int) -> tuple:
    """One program per (batch * head, window), flattened on grid axis 0 (the
    only axis allowed more than 65535 programs)."""
    return (batch_heads * n_windows,)


# --- shared pieces ----------------------------------------------------------

@triton.jit
def _axis_region(r, n, shift, WINDOW: tl.constexpr):
    """Region (0, 1, 2) of rolled coordinates r on an axis of length n."""
    return tl.where(r < n - WINDOW, 0, tl.where(r < n - shift, 1, 2))


@triton.jit
def _window_tokens(offs, wr, wc, H, W, shift, WINDOW: tl.constexpr, SHIFTED: tl.constexpr):
    """Tokens ``offs`` (local indices) of window (wr, wc): in-window row and
    column, region id, original row and column (int64), valid mask."""
    ri = offs // WINDOW
    ci = offs % WINDOW
    valid = offs < WINDOW * WINDOW
    r = wr * WINDOW + ri
    c = wc * WINDOW + ci
    if SHIFTED:
        region = 3 * _axis_region(r, H, shift, WINDOW) + _axis_region(c, W, shift, WINDOW)
        row = (r + shift) % H
        col = (c + shift) % W
    else:
        region = offs * 0
        row = r
        col = c
    return ri, ci, region, row.to(tl.int64), col.to(tl.int64), valid


@triton.jit
def _bias_index(ri_q, ci_q, ri_k, ci_k, WINDOW: tl.constexpr):
    """Swin's relative position index of each (query, key) pair of a tile."""
    dr = ri_q[:, None] - ri_k[None, :] + WINDOW - 1
    dc = ci_q[:, None] - ci_k[None, :] + WINDOW - 1
    return dr * (2 * WINDOW - 1) + dc


@triton.jit
def _scores(q, k, scale, bias_head, stride_bt, ri_q, ci_q, reg_q, valid_q, ri_k, ci_k, reg_k, valid_k,
            WINDOW: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores ``q k^T * scale + bias``, -inf for padded
    keys and, with a shift, for pairs from different regions."""
    # scale is a float64 argument (float64 inputs keep its precision); the
    # product is brought back to the accumulation dtype.
    s = (tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale).to(ACC)
    if HAS_BIAS:
        idx = _bias_index(ri_q, ci_q, ri_k, ci_k, WINDOW)
        pair = valid_q[:, None] & valid_k[None, :]
        s += tl.load(bias_head + idx * stride_bt, mask=pair, other=0.0).to(ACC)
    keep = valid_k[None, :]
    if SHIFTED:
        keep = keep & (reg_q[:, None] == reg_k[None, :])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _program_window(n_windows, heads, n_win_cols):
    """This program's id, b * heads + h, b and h (int64), and its window's
    row and column on the rolled grid."""
    pid = tl.program_id(0)
    win = pid % n_windows
    bh = pid // n_windows
    return pid, bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64), win // n_win_cols, win % n_win_cols


@triton.jit
def _load_pair(start, a_base, sa_r, sa_c, sa_d, b_base, sb_r, sb_c, sb_d, offs_d, d_mask, wr, wc, H, W, shift,
               WINDOW: tl.constexpr, SHIFTED: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Tokens [start, start + BLOCK) of the window (as ``_window_tokens``) and
    the tiles of two tensors there (k and v, or q and dO)."""
    ri, ci, reg, row, col, valid = _window_tokens(start + tl.arange(0, BLOCK), wr, wc, H, W, shift, WINDOW, SHIFTED)
    a = load_tile(a_base, row, col, sa_r, sa_c, offs_d, sa_d, valid, d_mask, ACC)
    b = load_tile(b_base, row, col, sb_r, sb_c, offs_d, sb_d, valid, d_mask, ACC)
    return ri, ci, reg, row, col, valid, a, b


# --- forward ------------------------------------------------------------------

@triton.jit
def window_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr,
        sq_b, sq_h, sq_r, sq_c, sq_d,
        sk_b, sk_h, sk_r, sk_c, sk_d,
        sv_b, sv_h, sv_r, sv_c, sv_d,
        sb_t, sb_h,
        so_b, so_h, so_r, so_c, so_d,
        sl_b, sl_h, sl_r, sl_c,
        heads, H, W, head_dim, n_windows, n_win_cols, shift, scale: tl.float64,
        WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr):
    """out (B, heads, H, W, head_dim) in out's dtype and lse (B, heads, H, W)
    in the accumulation dtype (lse's), one program per (batch * head,
    window), online softmax over the window's key blocks."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    pid, bh, b, h, wr, wc = _program_window(n_windows, heads, n_win_cols)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    o_base = out_ptr + b * so_b + h * so_h
    l_base = lse_ptr + b * sl_b + h * sl_h
    bias_head = bias_ptr + h * sb_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for m0 in range(0, WINDOW * WINDOW, BLOCK_M):
        ri_q, ci_q, reg_q, row_q, col_q, valid_q = _window_tokens(
            m0 + tl.arange(0, BLOCK_M), wr, wc, H, W, shift, WINDOW, SHIFTED)
        q = load_tile(q_base, row_q, col_q, sq_r, sq_c, offs_d, sq_d, valid_q, d_mask, ACC)
        m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
        l_i = tl.zeros((BLOCK_M,), ACC)
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        for n0 in range(0, WINDOW * WINDOW, BLOCK_N):
            ri_k, ci_k, reg_k, row_k, col_k, valid_k, k, v = _load_pair(
                n0, k_base, sk_r, sk_c, sk_d, v_base, sv_r, sv_c, sv_d, offs_d, d_mask, wr, wc, H, W, shift,
                WINDOW, SHIFTED, BLOCK_N, ACC)
            s = _scores(q, k, scale, bias_head, sb_t, ri_q, ci_q, reg_q, valid_q, ri_k, ci_k, reg_k, valid_k,
                        WINDOW, HAS_BIAS, SHIFTED, ACC)
            m_i, l_i, acc = online_step(m_i, l_i, acc, s, v, ACC)
        store_out_lse(o_base, so_r, so_c, so_d, l_base, sl_r, sl_c, row_q, col_q, offs_d, valid_q, d_mask, acc, m_i,
                      l_i)


# --- backward -------------------------------------------------------------------

@triton.jit
def _accumulate_bias_grad(acc_t, offs_t, ds, idx, pair, row_ptr, T: tl.constexpr, DETERMINISTIC_BIAS: tl.constexpr):
    """Add the tile ``ds`` into the program's bias-gradient row: atomics into
    ``row_ptr`` (returns ``acc_t`` unchanged), or a fixed-order masked sum per
    table entry into the register vector ``acc_t``."""
    if DETERMINISTIC_BIAS:
        ds = tl.where(pair, ds, 0.0)
        for t in range(T):
            acc_t = tl.where(offs_t == t, acc_t + tl.sum(tl.sum(tl.where(idx == t, ds, 0.0), axis=1), axis=0), acc_t)
    else:
        tl.atomic_add(row_ptr + idx, ds, mask=pair)
    return acc_t


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, scale, bias_head, sb_t, ri_q, ci_q, reg_q, valid_q, ri_k, ci_k, reg_k,
                       valid_k, WINDOW: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
                       ACC: tl.constexpr):
    """P = exp(S - lse) and dS = P * (dO v^T - D) of a (query, key) tile."""
    s = _scores(q, k, scale, bias_head, sb_t, ri_q, ci_q, reg_q, valid_q, ri_k, ci_k, reg_k, valid_k,
                WINDOW, HAS_BIAS, SHIFTED, ACC)
    p = tl.exp(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=ACC)
    return p, p * (dp - delta[:, None])


@triton.jit
def window_attention_bwd_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr,
        dq_ptr, dk_ptr, dv_ptr, dbias_ptr,
        sq_b, sq_h, sq_r, sq_c, sq_d,
        sk_b, sk_h, sk_r, sk_c, sk_d,
        sv_b, sv_h, sv_r, sv_c, sv_d,
        sb_t, sb_h,
        sg_b, sg_h, sg_r, sg_c, sg_d,
        sl_b, sl_h, sl_r, sl_c,
        heads, H, W, head_dim, n_windows, n_win_cols, shift, scale: tl.float64,
        WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, DETERMINISTIC_BIAS: tl.constexpr):
    """grad_q, grad_k, grad_v: contiguous (B, heads, H, W, head_dim) in their
    dtype; dbias_ptr (B * heads * n_windows, (2w - 1)^2) in the accumulation
    dtype (delta's), zero-filled, one row per program (see the module
    docstring). dO has its own strides; lse its own; delta is contiguous
    (B * heads, H * W)."""
    ACC: tl.constexpr = delta_ptr.dtype.element_ty
    T: tl.constexpr = (2 * WINDOW - 1) * (2 * WINDOW - 1)
    pid, bh, b, h, wr, wc = _program_window(n_windows, heads, n_win_cols)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    g_base = do_ptr + b * sg_b + h * sg_h
    l_base = lse_ptr + b * sl_b + h * sl_h
    d_base = delta_ptr + bh.to(tl.int64) * H * W
    # The gradients are allocated contiguous: (b * heads + h) * H * W * head_dim.
    out_base = bh.to(tl.int64) * H * W * head_dim
    bias_head = bias_ptr + h * sb_h
    dbias_row = dbias_ptr + pid.to(tl.int64) * T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    offs_t = tl.arange(0, BLOCK_T)
    acc_t = tl.zeros((BLOCK_T,), ACC)

    # Pass 1: dK, dV of each key block, over the window's query blocks.
    for n0 in range(0, WINDOW * WINDOW, BLOCK_N):
        ri_k, ci_k, reg_k, row_k, col_k, valid_k, k, v = _load_pair(
            n0, k_base, sk_r, sk_c, sk_d, v_base, sv_r, sv_c, sv_d, offs_d, d_mask, wr, wc, H, W, shift,
            WINDOW, SHIFTED, BLOCK_N, ACC)
        dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        dv = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        for m0 in range(0, WINDOW * WINDOW, BLOCK_M):
            ri_q, ci_q, reg_q, row_q, col_q, valid_q, q, do = _load_pair(
                m0, q_base, sq_r, sq_c, sq_d, g_base, sg_r, sg_c, sg_d, offs_d, d_mask, wr, wc, H, W, shift,
                WINDOW, SHIFTED, BLOCK_M, ACC)
            lse, delta = query_stats(l_base, sl_r, sl_c, d_base, W, row_q, col_q, valid_q, ACC)
            p, ds = _probs_and_dscores(q, k, v, do, lse, delta, scale, bias_head, sb_t, ri_q, ci_q, reg_q, valid_q,
                                       ri_k, ci_k, reg_k, valid_k, WINDOW, HAS_BIAS, SHIFTED, ACC)
            dv += tl.dot(tl.trans(p), do, input_precision="ieee", out_dtype=ACC)
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=ACC)
            if HAS_BIAS:
                idx = _bias_index(ri_q, ci_q, ri_k, ci_k, WINDOW)
                pair = valid_q[:, None] & valid_k[None, :]
                acc_t = _accumulate_bias_grad(acc_t, offs_t, ds, idx, pair, dbias_row, T, DETERMINISTIC_BIAS)
        k_out = out_base + (row_k * W + col_k)[:, None] * head_dim + offs_d[None, :]
        kv_mask = valid_k[:, None] & d_mask[None, :]
        tl.store(dk_ptr + k_out, to_storage(dk * scale, dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + k_out, to_storage(dv, dv_ptr.dtype.element_ty), mask=kv_mask)
    if HAS_BIAS:
        if DETERMINISTIC_BIAS:
            tl.store(dbias_row + offs_t, acc_t, mask=offs_t < T)

    # Pass 2: dQ of each query block, over the window's key blocks.
    for m0 in range(0, WINDOW * WINDOW, BLOCK_M):
        ri_q, ci_q, reg_q, row_q, col_q, valid_q, q, do = _load_pair(
            m0, q_base, sq_r, sq_c, sq_d, g_base, sg_r, sg_c, sg_d, offs_d, d_mask, wr, wc, H, W, shift,
            WINDOW, SHIFTED, BLOCK_M, ACC)
        lse, delta = query_stats(l_base, sl_r, sl_c, d_base, W, row_q, col_q, valid_q, ACC)
        dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        for n0 in range(0, WINDOW * WINDOW, BLOCK_N):
            ri_k, ci_k, reg_k, row_k, col_k, valid_k, k, v = _load_pair(
                n0, k_base, sk_r, sk_c, sk_d, v_base, sv_r, sv_c, sv_d, offs_d, d_mask, wr, wc, H, W, shift,
                WINDOW, SHIFTED, BLOCK_N, ACC)
            p, ds = _probs_and_dscores(q, k, v, do, lse, delta, scale, bias_head, sb_t, ri_q, ci_q, reg_q, valid_q,
                                       ri_k, ci_k, reg_k, valid_k, WINDOW, HAS_BIAS, SHIFTED, ACC)
            dq += tl.dot(ds, k, input_precision="ieee", out_dtype=ACC)
        q_out = out_base + (row_q * W + col_q)[:, None] * head_dim + offs_d[None, :]
        q_mask = valid_q[:, None] & d_mask[None, :]
        tl.store(dq_ptr + q_out, to_storage(dq * scale, dq_ptr.dtype.element_ty), mask=q_mask)
