"""The Triton ops of ``pyvq.ops.multigrained_attention`` (its CUDA path):

- ``torch.ops.pyvq.multigrained_attention_triton(q, k, v, global_k,
  global_v, block_size, halo, scale) -> (out, lse)``
- ``torch.ops.pyvq._multigrained_attention_triton_backward(grad_out, q, k, v,
  global_k, global_v, out, lse, block_size, halo, scale) -> (grad_q, grad_k,
  grad_v, grad_global_k, grad_global_v)``

with the semantics and outputs of the C++ schemas
``pyvq::multigrained_attention`` and ``pyvq::_multigrained_attention_backward``
(csrc/pyvq.cpp): out contiguous in q's shape and dtype, lse (B, heads, H, W)
in float32 (float64 for float64 inputs); gradients contiguous in their
inputs' shapes and dtypes. Arguments are checked by the public op
(``pyvq.ops.multigrained_attention``), not here.

Registered with ``torch.library.triton_op`` and launched through
``wrap_triton`` (torch.compile traces into them on a GPU); autograd is the
one shared with the C++ op. Importing this module imports Triton:
``pyvq.ops.multigrained_attention`` imports it only for CUDA tensors. On CPU
tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how the tests run them.

Every gradient is computed without atomics (a key-centric pass for the local
keys, a global-key-centric one for the globals; see
triton_kernels/multigrained_attention.py), so results are bitwise
reproducible and ``torch.use_deterministic_algorithms(True)`` needs no
separate path. Empty inputs (B, heads, H, W or head_dim 0) launch nothing,
except that head_dim 0 still computes lse.
"""

import torch
from torch.library import triton_op, wrap_triton

from pyvq._checks import accumulation_dtype
from pyvq.ops._attention import forward_fake, register_autograd
from pyvq.ops.multigrained_attention import backward_fake
from pyvq.triton_kernels import multigrained_attention as _kernels


def _geometry(q: torch.Tensor, global_k: torch.Tensor, block_size: int, halo: int):
    """(B, heads, H, W, head_dim, G, n_blocks, n_blk_cols, halo clipped to
    max(H, W): a larger halo covers no more of the grid)."""
    B, heads, H, W, d = q.shape
    return (B, heads, H, W, d, global_k.shape[2], (H // block_size) * (W // block_size), W // block_size,
            min(halo, max(H, W)))


def _global_args(global_k: torch.Tensor, global_v: torch.Tensor, q: torch.Tensor):
    """(global_k, global_v, their eight strides) for the kernels; with G = 0
    q stands in for both (the kernels' global loops run zero times), so no
    empty tensor's pointer is passed."""
    if global_k.shape[2] == 0:
        return q, q, (0,) * 8
    return global_k, global_v, (*global_k.stride(), *global_v.stride())


@triton_op("pyvq::multigrained_attention_triton", mutates_args=())
def multigrained_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor,
                                  global_v: torch.Tensor, block_size: int, halo: int,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, heads, H, W, head_dim) contiguous in q's dtype, lse
    (B, heads, H, W) in the accumulation dtype; see the module docstring."""
    B, heads, H, W, d, G, n_blocks, n_blk_cols, halo = _geometry(q, global_k, block_size, halo)
    out = torch.empty((B, heads, H, W, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, H, W), dtype=accumulation_dtype(q.dtype), device=q.device)
    if lse.numel() == 0:
        return out, lse
    gk, gv, g_strides = _global_args(global_k, global_v, q)
    meta = _kernels.block_sizes(block_size, halo, H, W, G, d)
    wrap_triton(_kernels.multigrained_attention_fwd_kernel)[_kernels.block_grid(B * heads, n_blocks)](
        q, k, v, gk, gv, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *g_strides, *out.stride(), *lse.stride(),
        heads, H, W, G, d, n_blocks, n_blk_cols, halo, scale,
        WS=block_size, **meta)
    return out, lse


@triton_op("pyvq::_multigrained_attention_triton_backward", mutates_args=())
def _multigrained_attention_triton_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor,
        global_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, block_size: int, halo: int,
        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_global_k, grad_global_v), recomputing P
    from lse; see the module docstring."""
    B, heads, H, W, d, G, n_blocks, n_blk_cols, halo = _geometry(q, global_k, block_size, halo)
    dq, dk, dv = (torch.empty((B, heads, H, W, d), dtype=t.dtype, device=t.device) for t in (q, k, v))
    launch = dq.numel() > 0
    # Without queries (H * W = 0) no global key is attended: zero gradients.
    alloc = torch.empty if launch else torch.zeros
    dgk, dgv = (alloc((B, heads, G, d), dtype=t.dtype, device=t.device) for t in (global_k, global_v))
    if not launch:
        return dq, dk, dv, dgk, dgv
    acc = accumulation_dtype(q.dtype)
    meta = _kernels.block_sizes(block_size, halo, H, W, G, d)
    delta = torch.empty((B * heads, H * W), dtype=acc, device=q.device)
    block = _kernels.PREPROCESS_BLOCK
    wrap_triton(_kernels.attention_bwd_preprocess_kernel)[_kernels.preprocess_grid(B * heads, H * W, block)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, W, H * W, d,
        BLOCK=block, BLOCK_D=meta["BLOCK_D"], num_warps=4)
    gk, gv, g_strides = _global_args(global_k, global_v, q)
    grid = _kernels.block_grid(B * heads, n_blocks)
    wrap_triton(_kernels.multigrained_attention_bwd_dq_kernel)[grid](
        q, k, v, gk, gv, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *g_strides, *grad_out.stride(), *lse.stride(),
        heads, H, W, G, d, n_blocks, n_blk_cols, halo, scale,
        WS=block_size, **meta)
    reach = -(-halo // block_size)  # query blocks whose windows reach into a key block, each side
    wrap_triton(_kernels.multigrained_attention_bwd_dkdv_kernel)[grid](
        q, k, v, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
        heads, H, W, d, n_blocks, n_blk_cols, halo, reach, scale,
        WS=block_size, BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"],
        num_warps=meta["num_warps"])
    if G > 0:
        block_m = _kernels.tile_sizes(H * W, G, d)["BLOCK_M"]
        wrap_triton(_kernels.multigrained_attention_bwd_global_kernel)[
            _kernels.global_grid(B * heads, G, meta["BLOCK_G"])](
            q, global_k, global_v, grad_out, lse, delta, dgk, dgv,
            *q.stride(), *global_k.stride(), *global_v.stride(), *grad_out.stride(), *lse.stride(),
            heads, H, W, G, d, scale,
            BLOCK_M=block_m, BLOCK_G=meta["BLOCK_G"], BLOCK_D=meta["BLOCK_D"], num_warps=meta["num_warps"])
    return dq, dk, dv, dgk, dgv


# triton_op's own fake traces the body, which under Triton's interpreter runs
# the kernel on fake tensors; the shared fakes give the same shapes without it.
multigrained_attention_triton.register_fake(forward_fake)
_multigrained_attention_triton_backward.register_fake(backward_fake)
register_autograd("pyvq::multigrained_attention_triton", "_multigrained_attention_triton_backward", 5)
