"""The Triton ops of ``pyvq.ops.window_attention`` (its CUDA path):

- ``torch.ops.pyvq.window_attention_triton(q, k, v, bias_table, window_size,
  shift, scale) -> (out, lse)``
- ``torch.ops.pyvq._window_attention_triton_backward(grad_out, q, k, v,
  bias_table, out, lse, window_size, shift, scale) -> (grad_q, grad_k,
  grad_v, grad_bias)``

with the semantics and outputs of the C++ schemas ``pyvq::window_attention``
and ``pyvq::_window_attention_backward`` (csrc/pyvq.cpp): out contiguous in
q's shape and dtype, lse (B, heads, H, W) in float32 (float64 for float64
inputs) at the original positions; gradients contiguous in their inputs'
dtypes, grad_bias in bias_table's shape and dtype or an empty (0,) tensor of
q's dtype without a bias table. Arguments are checked by the public op
(``pyvq.ops.window_attention``), not here.

Registered with ``torch.library.triton_op`` and launched through
``wrap_triton`` (torch.compile traces into them on a GPU); autograd is the
one shared with the C++ op. Importing this module imports Triton:
``pyvq.ops.window_attention`` imports it only for CUDA tensors. On CPU
tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how the tests run them.

The bias gradient is reduced deterministically across programs; inside a
program it uses atomics unless ``torch.use_deterministic_algorithms(True)``
is on (see triton_kernels/window_attention.py).
"""

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from pyvq._checks import accumulation_dtype
from pyvq.ops.window_attention import backward_fake, forward_fake, register_autograd
from pyvq.triton_kernels import window_attention as _kernels


def _bias_args(bias_table: Optional[torch.Tensor], q: torch.Tensor):
    """(tensor, its two strides) for the kernels' bias arguments; without a
    table any tensor stands in (HAS_BIAS=False never reads it)."""
    if bias_table is None:
        return q, (0, 0)
    return bias_table, tuple(bias_table.stride())


def _grid_shape(q: torch.Tensor, window_size: int):
    B, heads, H, W, d = q.shape
    return B, heads, H, W, d, (H // window_size) * (W // window_size), W // window_size


@triton_op("pyvq::window_attention_triton", mutates_args=())
def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor],
                            window_size: int, shift: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, heads, H, W, head_dim) contiguous in q's dtype, lse
    (B, heads, H, W) in the accumulation dtype; see the module docstring."""
    B, heads, H, W, d, n_windows, n_win_cols = _grid_shape(q, window_size)
    out = torch.empty((B, heads, H, W, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, H, W), dtype=accumulation_dtype(q.dtype), device=q.device)
    if lse.numel() == 0:
        return out, lse
    bias, bias_strides = _bias_args(bias_table, q)
    meta = _kernels.block_sizes(window_size, d)
    wrap_triton(_kernels.window_attention_fwd_kernel)[_kernels.window_grid(B * heads, n_windows)](
        q, k, v, bias, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(), *lse.stride(),
        heads, H, W, d, n_windows, n_win_cols, shift, scale,
        WINDOW=window_size, HAS_BIAS=bias_table is not None, SHIFTED=shift > 0, **meta)
    return out, lse


@triton_op("pyvq::_window_attention_triton_backward", mutates_args=())
def _window_attention_triton_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        bias_table: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, window_size: int, shift: int,
        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_bias), recomputing P from lse; see the
    module docstring."""
    B, heads, H, W, d, n_windows, n_win_cols = _grid_shape(q, window_size)
    acc = accumulation_dtype(q.dtype)
    grads = [torch.empty((B, heads, H, W, d), dtype=t.dtype, device=t.device) for t in (q, k, v)]
    has_bias = bias_table is not None
    table = (2 * window_size - 1) ** 2
    # One row of bias-gradient partial sums per program, reduced below.
    partial = torch.zeros((B * heads * n_windows if has_bias else 0, table), dtype=acc, device=q.device)
    if grads[0].numel() > 0:
        meta = _kernels.block_sizes(window_size, d)
        delta = torch.empty((B * heads, H * W), dtype=acc, device=q.device)
        block = _kernels.PREPROCESS_BLOCK
        grid = _kernels.preprocess_grid(B * heads, H * W, block)
        wrap_triton(_kernels.window_attention_bwd_preprocess_kernel)[grid](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, W, H * W, d,
            BLOCK=block, BLOCK_D=meta["BLOCK_D"], num_warps=4)
        deterministic = has_bias and torch.are_deterministic_algorithms_enabled()
        bias, bias_strides = _bias_args(bias_table, q)
        wrap_triton(_kernels.window_attention_bwd_kernel)[_kernels.window_grid(B * heads, n_windows)](
            q, k, v, bias, grad_out, lse, delta, grads[0], grads[1], grads[2], partial if has_bias else delta,
            *q.stride(), *k.stride(), *v.stride(), *bias_strides, *grad_out.stride(), *lse.stride(),
            heads, H, W, d, n_windows, n_win_cols, shift, scale,
            WINDOW=window_size, BLOCK_T=triton.next_power_of_2(table) if deterministic else 1,
            HAS_BIAS=has_bias, SHIFTED=shift > 0, DETERMINISTIC_BIAS=deterministic, **meta)
    if has_bias:
        grad_bias = partial.view(B, heads, n_windows, table).sum(dim=(0, 2)).t()
        grad_bias = grad_bias.to(bias_table.dtype).contiguous()
    else:
        grad_bias = torch.empty((0,), dtype=q.dtype, device=q.device)
    return (*grads, grad_bias)


# triton_op's own fake traces the body, which under Triton's interpreter runs
# the kernel on fake tensors; the shared fakes give the same shapes without it.
window_attention_triton.register_fake(forward_fake)
_window_attention_triton_backward.register_fake(backward_fake)
register_autograd("pyvq::window_attention_triton", "_window_attention_triton_backward", 4)
