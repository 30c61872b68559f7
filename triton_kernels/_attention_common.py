"""Pieces shared by the attention kernels (triton_kernels/window_attention.py,
triton_kernels/multigrained_attention.py): tile sizes, tile loads, the
rounding store, the online-softmax step and the final store of forward, the
query statistics of backward and its ``D = rowsum(dO * O)`` preprocessing
kernel.

Precision convention of every attention kernel: tiles are cast to the
accumulation dtype ``ACC`` (float32, float64 for float64 inputs) right after
loading, every ``tl.dot`` runs with ``input_precision="ieee"``, and results
are stored through ``to_storage`` (round to nearest even for bfloat16).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Largest query / key tile: a 64 x 64 score tile plus the q, k, v, acc tiles
# of head_dim <= 64 stay in registers; wider heads take 32-token tiles.
MAX_BLOCK = 64
MAX_BLOCK_WIDE_HEAD = 32
MIN_BLOCK = 16  # tl.dot's smallest M, N and K


def tile_sizes(query_tokens: int, key_tokens: int, head_dim: int) -> dict:
    """Launch meta-parameters for programs that loop over ``query_tokens``
    queries and up to ``key_tokens`` keys: BLOCK_M, BLOCK_N (power-of-two
    tiles, at least MIN_BLOCK, at most MAX_BLOCK), BLOCK_D (head_dim padded to
    a power of two) and num_warps."""
    block_d = max(MIN_BLOCK, triton.next_power_of_2(max(head_dim, 1)))
    cap = MAX_BLOCK if block_d <= 64 else MAX_BLOCK_WIDE_HEAD

    def tile(tokens):
        return max(MIN_BLOCK, min(triton.next_power_of_2(max(tokens, 1)), cap))

    block_m, block_n = tile(query_tokens), tile(key_tokens)
    num_warps = 4 if max(block_m, block_n) * block_d <= 64 * 64 else 8
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps}


PREPROCESS_BLOCK = 64


def preprocess_grid(batch_heads: int, tokens: int, block: int) -> tuple:
    """Grid of ``attention_bwd_preprocess_kernel``: blocks of ``block`` tokens
    of each (batch * head)."""
    return (batch_heads * triton.cdiv(tokens, block),)


@triton.jit
def load_tile(base, row, col, stride_r, stride_c, offs_d, stride_d, valid, d_mask, ACC: tl.constexpr):
    """(tokens, BLOCK_D) tile of a (H, W, head_dim) slice, zero where masked.
    ``row`` and ``col`` are int64 so that large strides cannot overflow."""
    ptrs = base + row[:, None] * stride_r + col[:, None] * stride_c + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0).to(ACC)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Cast to the storage dtype, rounding to nearest even. Triton's
    interpreter truncates float32 -> bfloat16, so the bits are rounded first
    (the cast is then exact; on a GPU the result is that of cvt.rn)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def split_program(n_per_head, heads):
    """For a grid of ``n_per_head`` programs per (batch * head): this
    program's index among them, b * heads + h, and b and h (int64)."""
    pid = tl.program_id(0)
    bh = pid // n_per_head
    return pid % n_per_head, bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)


@triton.jit
def online_step(m_i, l_i, acc, s, v, ACC: tl.constexpr):
    """One online-softmax step over a key tile with scores ``s`` (-inf where
    masked) and values ``v``: the new running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A query whose keys in this tile are all masked keeps m = -inf;
    # subtracting 0 instead keeps exp() at 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee", out_dtype=ACC)
    return m_new, l_i, acc


@triton.jit
def store_out_lse(o_base, so_r, so_c, so_d, l_base, sl_r, sl_c, row, col, offs_d, valid, d_mask, acc, m_i, l_i):
    """Normalise the online softmax of a query tile and store out (in out's
    dtype) and lse = m + log(l) at grid positions (row, col). Every stored
    query has a key that is not masked, so l = 0 only when all its scores
    are -inf (an inf input): out and lse are then NaN, as softmax's 0 / 0 in
    the reference and the C++ kernels. Rows past the grid (l = 0 too) are
    not stored."""
    l_safe = tl.where(l_i > 0, l_i, float("nan"))
    o_ptrs = o_base + row[:, None] * so_r + col[:, None] * so_c + offs_d[None, :] * so_d
    tl.store(o_ptrs, to_storage(acc / l_safe[:, None], o_base.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])
    tl.store(l_base + row * sl_r + col * sl_c, m_i + tl.log(l_safe), mask=valid)


@triton.jit
def query_stats(l_base, sl_r, sl_c, d_base, W, row, col, valid, ACC: tl.constexpr):
    """lse (strided (H, W) slice) and D (contiguous (H, W) slice) of a query
    tile; padded rows get lse = +inf (so P = 0 there) and D = 0."""
    lse = tl.load(l_base + row * sl_r + col * sl_c, mask=valid, other=float("inf")).to(ACC)
    delta = tl.load(d_base + row * W + col, mask=valid, other=0.0)
    return lse, delta


@triton.jit
def attention_bwd_preprocess_kernel(
        out_ptr, do_ptr, delta_ptr,
        so_b, so_h, so_r, so_c, so_d,
        sg_b, sg_h, sg_r, sg_c, sg_d,
        heads, W, tokens, head_dim,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta (B * heads, H * W) contiguous, accumulation dtype (delta's):
    ``D = sum_d dO * O`` per token, in row-major token order; out and dO
    (B, heads, H, W, head_dim) with their own strides."""
    ACC: tl.constexpr = delta_ptr.dtype.element_ty
    blk, bh, b, h = split_program(tl.cdiv(tokens, BLOCK), heads)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < tokens
    row = (offs // W).to(tl.int64)
    col = (offs % W).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    o = load_tile(out_ptr + b * so_b + h * so_h, row, col, so_r, so_c, offs_d, so_d, valid, d_mask, ACC)
    g = load_tile(do_ptr + b * sg_b + h * sg_h, row, col, sg_r, sg_c, offs_d, sg_d, valid, d_mask, ACC)
    tl.store(delta_ptr + bh.to(tl.int64) * tokens + offs, tl.sum(o * g, axis=1), mask=valid)
