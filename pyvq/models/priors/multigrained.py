"""Efficient-VQGAN's second stage (Cao et al., "Efficient-VQGAN: Towards
High-Resolution Image Generation with Efficient Vision Transformers", ICCV
2023, Sec. 3.2-3.3 and 4.3): a multi-grained transformer over a VQ
tokenizer's code indices, trained by masked visual token modelling (MVTM)
and sampled block by block with MaskGIT-style parallel decoding inside each
block.

Codes are int64 maps (B, H, W) with values in [0, K), K = ``num_codes``; the
grid is cut into ``Ws x Ws`` blocks (``Ws = block_size``, H and W multiples
of it), G = (H / Ws) (W / Ws) of them, numbered row-major.

Model (``MultiGrainedTransformer``):

- input tokens are codes or the [MASK] token (index K): a token embedding
  (K + 1 entries) plus a learned position embedding over the H x W grid;
- global tokens: a Conv2d with kernel = stride = Ws over the (masked) token
  embeddings, one token per block, plus their own learned position
  embedding; with ``num_classes > 0`` a class embedding (``num_classes + 1``
  entries, the last the null class) enters as one more global token;
- ``depth`` pre-norm layers. Local tokens: LayerNorm, one qkv linear, then
  ``pyvq.ops.multigrained_attention(q, k, v, global_k, global_v,
  block_size=Ws, halo=Es)``: each block's queries attend, in one softmax,
  to the block's extended window of (Ws + 2 Es)^2 tokens (clipped to the
  grid) and to every global token, whose keys and values come from the same
  qkv linear applied to the (separately normed) global tokens. Global
  tokens attend among themselves (``scaled_dot_product_attention``; G is
  small). One output projection serves both; each kind of token has its own
  MLP and norms. (``global_attention=True`` replaces the local attention by
  plain SDPA over all H * W tokens plus the globals: the cost the op
  replaces, for benchmarks.)
- head: LayerNorm + linear to K logits at every local token.

Training (``training_loss``, eq. 2 of the paper). Per sample, in this
order of draws from the caller's generator:

1. r ~ U(0, 1), gamma(r) = cos(pi/2 r); ``ceil(gamma * H * W)`` tokens
   (at least one) are masked, chosen uniformly at random (the lowest ranks
   of H * W uniform draws);
2. block masking (Sec. 3.3: "whole blocks are masked at random before this
   conv, so the model can predict blocks in any order"; ``block_masking``):
   m ~ uniform on {0, ..., G - 1}, then m whole blocks chosen uniformly at
   random are masked as well. The mask is one token map, so those blocks are
   masked both in the local input and in the embeddings that feed the
   global conv -- as at sampling time, where the blocks not yet generated
   are wholly masked in both. m < G: at least one block is left to the
   token-level mask (with one block, G = 1, this is plain MaskGIT);
3. with ``num_classes > 0``, in training mode, each label is replaced by
   the null class with probability ``label_dropout`` (classifier-free
   guidance; ``labels=None`` is the null class for every sample).

The loss is the cross-entropy of the model's prediction at every masked
token, averaged over the masked tokens of the batch, in nats per token.

Sampling (``sample``): blocks are visited in a fixed order (``"raster"``,
or ``"random"``, ``"center_out"``). Inside a block with M unknown tokens,
T = min(steps_per_block, M) forward passes: at step t every still-masked
token of the block is drawn from softmax(logits / temperature) (argmax at
temperature 0), its confidence is its probability under softmax(logits)
(plus, with ``choice_temperature`` > 0, MaskGIT's Gumbel noise annealed by
``choice_temperature * (1 - (t + 1) / T)``), and the most confident are kept
so that ``mask_schedule(M, T)[t]`` tokens stay masked: floor(M cos(pi/2
(t + 1) / T)), or one fewer than before the step where that would keep
every token masked; 0 after the last step. The rest are re-masked. So
Ws = 1 is autoregressive sampling (H * W passes, one token each) and
Ws = H = W is MaskGIT over the whole grid (T passes).

Editing (Sec. 4.3, no retraining): ``inpaint(codes, keep)`` runs the same
decoder with the known tokens (``keep`` True) in place from the start: only
unknown tokens are drawn, known ones are never written, and blocks with no
unknown token are skipped (no forward pass). ``outpaint`` is inpainting
with the known region in the centre (``outpaint_keep``); ``edit_box``
regenerates a box, optionally conditioned on a class label (``box_keep``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_positive_fields,
    is_int,
)
from pyvq.models._pretrained import PretrainedModel, register_preset
from pyvq.models.priors._config import check_tokenizer_field
from pyvq.models.priors.base import Prior
from pyvq.models.priors.sampling import generator_device, gumbel_argmax, rand
from pyvq.ops import multigrained_attention

__all__ = [
    "ORDERS",
    "MultiGrainedTransformer",
    "MultiGrainedTransformerConfig",
    "box_keep",
    "mask_schedule",
    "outpaint_keep",
]

_NAME = "MultiGrainedTransformerConfig"
ORDERS = ("raster", "random", "center_out")
"""Block orders of the sampler: row-major; a random permutation (one per
call, from the generator); by distance of the block's centre from the
grid's centre (ties row-major)."""

_MAX_HEAD_DIM = 256  # what multigrained_attention accepts


# ---------------------------------------------------------------- helpers
def _grid(size, name: str, where: str, what: str = "argument") -> tuple[int, int]:
    """An int side or an (H, W) pair -> (H, W), every side >= 1."""
    if is_int(size):
        side = check_int(name, size, where=where, minimum=1, what=what)
        return side, side
    items = tuple(size) if isinstance(size, (tuple, list)) else None
    if items is None or len(items) != 2 or not all(is_int(v) for v in items):
        raise ArgumentTypeError(f"{where}: {what} '{name}' must be an int or an (H, W) pair of ints, got {size!r}")
    if min(items) < 1:
        raise ValueError(f"{where}: {what} '{name}' must have sides >= 1, got {tuple(items)}")
    return int(items[0]), int(items[1])


def mask_schedule(num: int, steps: int) -> list[int]:
    """Tokens still masked after each of ``steps`` decoding steps of a block
    with ``num`` unknown tokens: ``floor(num * cos(pi/2 * (t + 1) / steps))``
    for t = 0 .. steps - 1, lowered to one fewer than the previous count
    where it would decode nothing (so every step decodes at least one token
    for ``steps <= num``); the last entry is 0.

    >>> mask_schedule(64, 8)
    [62, 59, 53, 45, 35, 24, 12, 0]
    """
    num = check_int("num", num, where="mask_schedule", minimum=0)
    steps = check_int("steps", steps, where="mask_schedule", minimum=1)
    out, left = [], num
    for t in range(steps):
        target = math.floor(num * math.cos(math.pi / 2 * (t + 1) / steps)) if t < steps - 1 else 0
        left = max(0, min(target, left - 1))
        out.append(left)
    return out


def outpaint_keep(size, border) -> torch.Tensor:
    """The ``keep`` mask of outpainting: a bool (H, W) map, True in the
    centre and False on a frame of ``border`` tokens (an int, or
    (top, left, bottom, right)) to generate. ``size`` is an int or (H, W)."""
    H, W = _grid(size, "size", "outpaint_keep")
    if is_int(border):
        border = (int(border),) * 4
    items = tuple(border) if isinstance(border, (tuple, list)) else None
    if items is None or len(items) != 4 or not all(is_int(v) and v >= 0 for v in items):
        raise ValueError(f"outpaint_keep: argument 'border' must be an int >= 0 or (top, left, bottom, right) "
                         f"ints >= 0, got {border!r}")
    top, left, bottom, right = (int(v) for v in items)
    if top + bottom >= H or left + right >= W:
        raise ValueError(f"outpaint_keep: argument 'border' {items} leaves no known centre in a {H} x {W} grid")
    keep = torch.zeros(H, W, dtype=torch.bool)
    keep[top:H - bottom, left:W - right] = True
    return keep


def box_keep(size, box) -> torch.Tensor:
    """The ``keep`` mask of a box edit: a bool (H, W) map, False inside
    ``box`` = (y0, x0, y1, x1) (latent coordinates, half-open: rows
    y0 .. y1 - 1, columns x0 .. x1 - 1) and True elsewhere."""
    H, W = _grid(size, "size", "box_keep")
    items = tuple(box) if isinstance(box, (tuple, list)) else None
    if items is None or len(items) != 4 or not all(is_int(v) for v in items):
        raise ArgumentTypeError(f"box_keep: argument 'box' must be (y0, x0, y1, x1) ints, got {box!r}")
    y0, x0, y1, x1 = (int(v) for v in items)
    if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
        raise ValueError(f"box_keep: argument 'box' (y0, x0, y1, x1) must satisfy 0 <= y0 < y1 <= {H} and "
                         f"0 <= x0 < x1 <= {W}, got {items}")
    keep = torch.ones(H, W, dtype=torch.bool)
    keep[y0:y1, x0:x1] = False
    return keep


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class MultiGrainedTransformerConfig:
    """Architecture, training and sampling settings of a
    ``MultiGrainedTransformer`` (defaults: preset ``mgt_f16_16x16``).

    Attributes:
        num_codes: K, the tokenizer's codebook size (>= 2); index K is [MASK].
        latent_size: the code grid, an int side or (H, W); H and W multiples
            of ``block_size``.
        block_size: Ws, the block side (the paper's f = 16 setting: 8).
        halo: Es >= 0, the extension of each block's local window (each side).
        width, depth, heads: the transformer (width divisible by heads,
            head dim at most 256).
        mlp_ratio: MLP hidden width / width (> 0).
        dropout: on the residual branches and embeddings, [0, 1).
        num_classes: class labels (0 = unconditional); the class embedding
            has one more entry, the null class.
        label_dropout: probability, in training, of replacing a label by the
            null class (classifier-free guidance), [0, 1].
        block_masking: mask random whole blocks in training (Sec. 3.3).
        global_attention: the local tokens attend to every token plus the
            globals with plain SDPA instead of ``multigrained_attention``
            (a baseline for benchmarks).
        steps_per_block, temperature, choice_temperature: sampling defaults
            (see ``MultiGrainedTransformer.sample``).
        tokenizer: the record of the tokenizer whose codes the prior was
            trained on (``pyvq.data.codes.tokenizer_record``; written by
            ``PriorTrainer``, checked against the tokenizer given to
            ``pyvq sample`` / ``pyvq inpaint``); None: not recorded.
    """

    num_codes: int = 1024
    latent_size: int | tuple[int, int] = 16
    block_size: int = 8
    halo: int = 2
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    num_classes: int = 0
    label_dropout: float = 0.1
    block_masking: bool = True
    global_attention: bool = False
    steps_per_block: int = 8
    temperature: float = 1.0
    choice_temperature: float = 0.0
    tokenizer: dict | None = None

    def __post_init__(self):
        H, W = _grid(self.latent_size, "latent_size", _NAME, "field")
        check_tokenizer_field(self, _NAME)
        if not is_int(self.latent_size):
            object.__setattr__(self, "latent_size", (H, W))
        check_positive_fields(self, ("block_size", "width", "depth", "heads", "steps_per_block"), where=_NAME)
        check_int("num_codes", self.num_codes, where=_NAME, minimum=2, what="field")
        check_int("halo", self.halo, where=_NAME, minimum=0, what="field")
        check_int("num_classes", self.num_classes, where=_NAME, minimum=0, what="field")
        ws = self.block_size
        if H % ws or W % ws:
            raise ValueError(f"{_NAME}: field 'latent_size' ({H} x {W}) must be a multiple of field 'block_size' "
                             f"({ws}) in both axes")
        if self.width % self.heads:
            raise ValueError(f"{_NAME}: field 'width' ({self.width}) must be divisible by field 'heads' "
                             f"({self.heads})")
        if self.width // self.heads > _MAX_HEAD_DIM:
            raise ValueError(f"{_NAME}: fields 'width' / 'heads' (the head dim) must be at most {_MAX_HEAD_DIM}, "
                             f"got {self.width} / {self.heads} = {self.width // self.heads}")
        check_float("mlp_ratio", self.mlp_ratio, where=_NAME, what="field", low=0.0, low_open=True,
                    high=math.inf, high_open=True)
        check_float("dropout", self.dropout, where=_NAME, what="field", low=0.0, high=1.0, high_open=True)
        check_float("label_dropout", self.label_dropout, where=_NAME, what="field", low=0.0, high=1.0)
        check_float("temperature", self.temperature, where=_NAME, what="field", low=0.0, high=math.inf,
                    high_open=True)
        check_float("choice_temperature", self.choice_temperature, where=_NAME, what="field", low=0.0,
                    high=math.inf, high_open=True)
        check_bool("block_masking", self.block_masking, where=_NAME, what="field")
        check_bool("global_attention", self.global_attention, where=_NAME, what="field")

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W), the code grid."""
        return _grid(self.latent_size, "latent_size", _NAME, "field")

    @property
    def num_blocks(self) -> int:
        """G, the number of Ws x Ws blocks (= global tokens from the conv)."""
        H, W = self.grid
        return (H // self.block_size) * (W // self.block_size)


# ---------------------------------------------------------------- layers
def _mlp(width: int, ratio: float, dropout: float) -> nn.Sequential:
    hidden = max(1, int(round(width * ratio)))
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


class _Layer(nn.Module):
    """One pre-norm layer over local tokens x (B, H, W, C) and global
    tokens g (B, G', C); see the module docstring."""

    def __init__(self, c: MultiGrainedTransformerConfig):
        super().__init__()
        w = c.width
        self.heads, self.block_size, self.halo, self.global_attention = c.heads, c.block_size, c.halo, \
            c.global_attention
        self.norm_local, self.norm_global = nn.LayerNorm(w), nn.LayerNorm(w)
        self.qkv = nn.Linear(w, 3 * w)
        self.proj = nn.Linear(w, w)
        self.mlp_norm_local, self.mlp_norm_global = nn.LayerNorm(w), nn.LayerNorm(w)
        self.mlp_local = _mlp(w, c.mlp_ratio, c.dropout)
        self.mlp_global = _mlp(w, c.mlp_ratio, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, W, C = x.shape
        G, h = g.shape[1], self.heads
        d = C // h
        q, k, v = self.qkv(self.norm_local(x)).view(B, H, W, 3, h, d).permute(3, 0, 4, 1, 2, 5).unbind(0)
        gq, gk, gv = self.qkv(self.norm_global(g)).view(B, G, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        if self.global_attention:
            keys = torch.cat([k.reshape(B, h, H * W, d), gk], dim=2)
            values = torch.cat([v.reshape(B, h, H * W, d), gv], dim=2)
            a = F.scaled_dot_product_attention(q.reshape(B, h, H * W, d), keys, values).view(B, h, H, W, d)
        else:
            a = multigrained_attention(q, k, v, gk, gv, block_size=self.block_size, halo=self.halo)
        ga = F.scaled_dot_product_attention(gq, gk, gv)  # (B, h, G, d)
        x = x + self.drop(self.proj(a.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)))
        g = g + self.drop(self.proj(ga.transpose(1, 2).reshape(B, G, C)))
        x = x + self.drop(self.mlp_local(self.mlp_norm_local(x)))
        g = g + self.drop(self.mlp_global(self.mlp_norm_global(g)))
        return x, g


# ---------------------------------------------------------------- model
class MultiGrainedTransformer(PretrainedModel, Prior):
    """Efficient-VQGAN's multi-grained transformer prior over code indices;
    see the module docstring.

    Args:
        config: a ``MultiGrainedTransformerConfig``.

    A ``Prior`` (``code_kind = "indices"``; see ``pyvq.models.priors.base``).
    Submodules: ``token_embed`` (K + 1, width; row K is [MASK]),
    ``pos_embed`` (1, H, W, width), ``global_conv`` (kernel = stride = Ws),
    ``global_pos`` (1, G, width), ``class_embed`` (num_classes + 1, width;
    None when unconditional), ``layers`` (depth ``_Layer``), ``norm`` and
    ``head`` (width -> K; called once per forward pass, so a forward hook on
    it counts passes). ``mask_id`` is K.

    Parameter counts: ``mgt_f16_16x16`` 81,011,712 (K = 1024, width 512,
    depth 12, heads 8, MLP x4: 62.9M in the layers, whose local and global
    MLPs are separate, 16.8M in the 8 x 8 global conv), ``mgt_32x32``
    81,411,072, ``mgt_64x64`` 83,008,512 (larger position embeddings),
    ``mgt_tiny`` (K = 256) 155,392.

    ``forward(codes, generator=None)`` is ``training_loss``; ``sample``,
    ``inpaint``, ``outpaint`` and ``edit_box`` run in eval mode without
    gradients.
    """

    config_class = MultiGrainedTransformerConfig
    code_kind = "indices"  # the codes it models (see pyvq.data.codes)
    # PriorTrainer's build_prior sizes these config fields from a codes
    # folder: the codebook size and the code-map side.
    code_config_fields = {"num_codes": "num_classes", "latent_size": "code_size"}

    def __init__(self, config: MultiGrainedTransformerConfig):
        super().__init__(config)
        c = config
        H, W = c.grid
        ws = c.block_size
        self.num_codes = c.num_codes
        self.mask_id = c.num_codes
        self.token_embed = nn.Embedding(c.num_codes + 1, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, H, W, c.width))
        self.global_conv = nn.Conv2d(c.width, c.width, kernel_size=ws, stride=ws)
        self.global_pos = nn.Parameter(torch.zeros(1, c.num_blocks, c.width))
        self.class_embed = nn.Embedding(c.num_classes + 1, c.width) if c.num_classes > 0 else None
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.num_codes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.global_pos, std=0.02)

    @property
    def code_shape(self) -> tuple[int, int]:
        """(H, W)."""
        return self.config.grid

    # ------------------------------------------------------------ checks
    def _labels(self, labels, batch: int, method: str) -> torch.Tensor | None:
        """None (unconditional model) or (batch,) int64 class indices in
        [0, num_classes], num_classes being the null class (``labels=None``)."""
        where, n = self._where(method), self.config.num_classes
        if n == 0:
            if labels is not None:
                raise ValueError(f"{where}: argument 'labels' was given but the model is unconditional "
                                 f"(num_classes=0)")
            return None
        if labels is None:
            return torch.full((batch,), n, dtype=torch.int64, device=self._device)
        given = torch.tensor(int(labels)) if is_int(labels) else labels
        integer = isinstance(given, torch.Tensor) and not (given.is_floating_point() or given.is_complex()
                                                           or given.dtype == torch.bool)
        if not integer:
            got = f"dtype {given.dtype}" if isinstance(given, torch.Tensor) else type(given).__name__
            raise ArgumentTypeError(f"{where}: argument 'labels' must be None, an int or an integer tensor, got {got}")
        if given.dim() > 1 or given.numel() not in (1, batch):
            raise ValueError(f"{where}: argument 'labels' must be an int or have shape ({batch},), "
                             f"got {tuple(given.shape)}")
        labels = given.reshape(-1).expand(batch)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > n):
            raise ValueError(f"{where}: argument 'labels' must hold classes in [0, {n}] ({n} = the null class), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return labels.to(self._device, torch.int64)

    def _check_tokens(self, tokens, method: str) -> torch.Tensor:
        where = self._where(method)
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool:
            got = f"dtype {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ArgumentTypeError(f"{where}: argument 'tokens' must be an integer tensor, got {got}")
        H, W = self.code_shape
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (H, W):
            raise ValueError(f"{where}: argument 'tokens' must have shape (B, {H}, {W}), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > self.mask_id):
            raise ValueError(f"{where}: argument 'tokens' must hold codes in [0, {self.num_codes}) or the mask "
                             f"index {self.mask_id}, got values in [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.to(self._device, torch.int64)

    # ------------------------------------------------------------ network
    def logits(self, tokens: torch.Tensor, labels=None) -> torch.Tensor:
        """Logits over the K codes at every position.

        Args:
            tokens: (B, H, W) integers in [0, K], K (``mask_id``) = [MASK].
            labels: None (the null class; required None when unconditional),
                an int or a (B,) integer tensor of classes in
                [0, num_classes] (num_classes = the null class).

        Returns (B, H, W, K) in the model's dtype.
        """
        tokens = self._check_tokens(tokens, "logits")
        return self._forward(tokens, self._labels(labels, tokens.shape[0], "logits"))

    def _forward(self, tokens: torch.Tensor, labels: torch.Tensor | None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, K) logits, or (B, P, K) at the flat ``positions`` (P,)."""
        B, H, W = tokens.shape
        e = self.token_embed(tokens)  # (B, H, W, C)
        g = self.global_conv(e.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2) + self.global_pos  # (B, G, C)
        if self.class_embed is not None:
            g = torch.cat([g, self.class_embed(labels)[:, None]], dim=1)
        x, g = self.drop(e + self.pos_embed), self.drop(g)
        for layer in self.layers:
            x, g = layer(x, g)
        if positions is not None:
            x = x.reshape(B, H * W, -1)[:, positions]
        return self.head(self.norm(x))

    # ------------------------------------------------------------ training
    def training_mask(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The MVTM mask of a batch, (batch, H, W) bool, True = masked: the
        cosine-schedule token mask plus, with ``block_masking``, m ~ U{0..G-1}
        random whole blocks (the module docstring). Draws, in order: r
        (batch,), token ranks (batch, H * W), then m (batch,) and block
        ranks (batch, G) -- the block draws also when ``block_masking`` is
        off, so the stream does not depend on it."""
        c = self.config
        H, W = c.grid
        N, G, ws, dev = H * W, c.num_blocks, c.block_size, self._device
        r = rand((batch,), generator, dev).double()
        count = torch.ceil(torch.cos(math.pi / 2 * r) * N).clamp(1, N).long()
        ranks = rand((batch, N), generator, dev).argsort(1).argsort(1)
        mask = (ranks < count[:, None]).view(batch, H, W)
        m = (rand((batch,), generator, dev).double() * G).floor().long().clamp(max=G - 1)
        block_ranks = rand((batch, G), generator, dev).argsort(1).argsort(1)
        if c.block_masking:
            blocks = (block_ranks < m[:, None]).view(batch, H // ws, W // ws)
            mask |= blocks.repeat_interleave(ws, 1).repeat_interleave(ws, 2)
        return mask

    def training_loss(self, codes: torch.Tensor, generator: torch.Generator | None = None, labels=None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """The MVTM loss on a batch of codes (eq. 2): cross-entropy at the
        masked tokens of ``training_mask``.

        Args:
            codes: (B, H, W) integer codes in [0, K).
            generator: for every draw (dropout excepted): the mask, then the
                label dropout (B,) for a conditional model in training mode.
            labels: as in ``logits`` (None: the null class).

        Returns:
            ``(loss, logs)``: the mean cross-entropy over the masked tokens
            (a float32 scalar with a graph, nats per token) and
            ``{"train/ce", "train/accuracy", "train/mask_ratio"}`` as floats.
        """
        codes = self._check_codes(codes, "codes", "training_loss")
        B = codes.shape[0]
        labels = self._labels(labels, B, "training_loss")
        mask = self.training_mask(B, generator)
        if labels is not None and self.training and self.config.label_dropout > 0:
            drop = rand((B,), generator, self._device) < self.config.label_dropout
            labels = torch.where(drop, self.config.num_classes, labels)
        logits = self._forward(torch.where(mask, self.mask_id, codes), labels)
        picked, target = logits[mask].float(), codes[mask]
        loss = F.cross_entropy(picked, target)
        with torch.no_grad():
            acc = (picked.argmax(-1) == target).float().mean()
        return loss, {"train/ce": float(loss.detach()), "train/accuracy": float(acc),
                      "train/mask_ratio": float(mask.float().mean())}

    # ------------------------------------------------------------ sampling
    def _sampling_args(self, method, steps_per_block, steps, temperature, choice_temperature, order,
                       guidance_scale):
        where, c = self._where(method), self.config
        if steps is not None and steps_per_block is not None and steps != steps_per_block:
            raise ValueError(f"{where}: arguments 'steps' ({steps}) and 'steps_per_block' ({steps_per_block}) "
                             f"disagree ('steps' is the Prior contract's name for 'steps_per_block')")
        spb = steps_per_block if steps_per_block is not None else steps
        spb = c.steps_per_block if spb is None else check_int("steps_per_block", spb, where=where, minimum=1)
        temp = c.temperature if temperature is None else check_float(
            "temperature", temperature, where=where, low=0.0, high=math.inf, high_open=True)
        choice = c.choice_temperature if choice_temperature is None else check_float(
            "choice_temperature", choice_temperature, where=where, low=0.0, high=math.inf, high_open=True)
        check_choice("order", order, ORDERS, where=where)
        gs = check_float("guidance_scale", guidance_scale, where=where, low=-math.inf, high=math.inf,
                         high_open=True, low_open=True)
        if gs != 1.0 and c.num_classes == 0:
            raise ValueError(f"{where}: argument 'guidance_scale' must be 1.0 for an unconditional model "
                             f"(num_classes=0), got {gs}")
        return spb, temp, choice, gs

    def _block_order(self, order: str, generator) -> list[int]:
        c = self.config
        H, W = c.grid
        ws = c.block_size
        nbh, nbw = H // ws, W // ws
        if order == "random":
            dev = generator_device(generator, self._device)
            return torch.randperm(nbh * nbw, generator=generator, device=dev).tolist()
        if order == "center_out":
            def dist(b):
                return ((b // nbw + 0.5) * ws - H / 2) ** 2 + ((b % nbw + 0.5) * ws - W / 2) ** 2
            return sorted(range(nbh * nbw), key=lambda b: (dist(b), b))
        return list(range(nbh * nbw))

    def _block_positions(self, b: int) -> torch.Tensor:
        """Flat grid positions (Ws^2,) of block ``b``, row-major."""
        H, W = self.code_shape
        ws = self.config.block_size
        nbw = W // ws
        rows = (b // nbw) * ws + torch.arange(ws)
        cols = (b % nbw) * ws + torch.arange(ws)
        return (rows[:, None] * W + cols[None, :]).flatten().to(self._device)

    def _guided_logits(self, tokens, labels, positions, guidance: float) -> torch.Tensor:
        """(B, P, K) float32 logits at ``positions``; with guidance s != 1,
        one batched pass of the conditional and null-class inputs and
        ``uncond + s (cond - uncond)``."""
        if guidance == 1.0 or labels is None:
            return self._forward(tokens, labels, positions).float()
        B = tokens.shape[0]
        null = torch.full_like(labels, self.config.num_classes)
        both = self._forward(tokens.repeat(2, 1, 1), torch.cat([labels, null]), positions).float()
        cond, uncond = both[:B], both[B:]
        return uncond + guidance * (cond - uncond)

    def _decode(self, tokens: torch.Tensor, labels, *, steps_per_block: int, temperature: float,
                choice_temperature: float, order: str, guidance: float, generator, progress: bool,
                desc: str) -> torch.Tensor:
        """Fill the [MASK] tokens of ``tokens`` (B, H, W) block by block;
        the other tokens are never written."""
        B, H, W = tokens.shape
        flat = tokens.reshape(B, H * W).clone()
        dev = self._device
        blocks = self._block_order(order, generator)
        with self._eval_mode():
            for b in self._progress(blocks, progress, desc):
                pos = self._block_positions(b)
                unknown = flat[:, pos] == self.mask_id  # (B, P)
                counts = unknown.sum(1).tolist()
                if max(counts) == 0:
                    continue  # nothing to generate in this block
                plans = [mask_schedule(m, min(steps_per_block, m)) if m else [] for m in counts]
                left = list(counts)
                for t in range(max(len(p) for p in plans)):
                    logits = self._guided_logits(flat.view(B, H, W), labels, pos, guidance)  # (B, P, K)
                    log_probs = torch.log_softmax(logits, dim=-1)
                    if temperature == 0:
                        drawn = logits.argmax(-1)
                    else:
                        drawn = gumbel_argmax(torch.log_softmax(logits / temperature, -1).transpose(1, 2), generator)
                    conf = log_probs.gather(-1, drawn[..., None])[..., 0]  # log p of the drawn token, (B, P)
                    if choice_temperature > 0:
                        u = rand(conf.shape, generator, dev).clamp_(min=torch.finfo(torch.float32).tiny)
                        anneal = [choice_temperature * (1 - (t + 1) / len(p)) if t < len(p) else 0.0
                                  for p in plans]
                        conf = conf - torch.tensor(anneal, device=dev)[:, None] * torch.log(-torch.log(u))
                    masked = flat[:, pos] == self.mask_id
                    conf = conf.masked_fill(~masked, -math.inf)
                    rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
                    fix_counts = []
                    for i, p in enumerate(plans):
                        target = p[t] if t < len(p) else 0
                        fix_counts.append(left[i] - target)
                        left[i] = target
                    fix = masked & (rank < torch.tensor(fix_counts, device=dev)[:, None])
                    flat[:, pos] = torch.where(fix, drawn, flat[:, pos])
        return flat.view(B, H, W)

    @torch.no_grad()
    def sample(self, n: int, *, labels=None, steps_per_block: int | None = None, steps: int | None = None,
               temperature: float | None = None, order: str = "raster", guidance_scale: float = 1.0,
               choice_temperature: float | None = None, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        """``n`` code maps, block by block (the module docstring).

        Args:
            n: number of maps, >= 1.
            labels: None, an int or an (n,) tensor of classes (as in
                ``logits``); None samples from the null class.
            steps_per_block: decoding steps per block, T = min(this, Ws^2)
                (default: the config's); ``steps`` is the same (the Prior
                contract's name).
            temperature: of the token draws, >= 0 (0: argmax; default: the
                config's).
            order: block order, one of ``ORDERS``.
            guidance_scale: classifier-free guidance s (conditional models):
                logits ``uncond + s (cond - uncond)``; 1 is the plain
                conditional model (one pass), other values batch both inputs
                into one pass of 2n maps.
            choice_temperature: MaskGIT's annealed Gumbel noise on the
                confidences (0: none; default: the config's).
            generator: for every draw (per step: one Gumbel draw (n, K, Ws^2),
                then with choice noise one (n, Ws^2); ``"random"`` order: one
                permutation first); equal generator states give equal maps.
            progress: a tqdm bar over the blocks.

        Returns (n, H, W) int64 codes in [0, K). A pass is one call of the
        network (``head``): G * min(T, Ws^2) of them.
        """
        n = check_int("n", n, where=self._where("sample"), minimum=1)
        spb, temp, choice, gs = self._sampling_args("sample", steps_per_block, steps, temperature,
                                                    choice_temperature, order, guidance_scale)
        labels = self._labels(labels, n, "sample")
        tokens = torch.full((n, *self.code_shape), self.mask_id, dtype=torch.int64, device=self._device)
        return self._decode(tokens, labels, steps_per_block=spb, temperature=temp, choice_temperature=choice,
                            order=order, guidance=gs, generator=generator, progress=progress, desc="sampling")

    @torch.no_grad()
    def inpaint(self, codes: torch.Tensor, keep: torch.Tensor, *, labels=None, steps_per_block: int | None = None,
                steps: int | None = None, temperature: float | None = None, order: str = "raster",
                guidance_scale: float = 1.0, choice_temperature: float | None = None,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Generate the codes where ``keep`` is False (Sec. 4.3).

        The known codes stay in place as input from the start and are never
        written; blocks are visited in ``order`` and a block whose codes are
        all known is skipped. A block with M unknown codes takes
        T = min(steps_per_block, M) passes (the largest T over the batch).

        Args:
            codes: (B, H, W) integer codes in [0, K) (values where ``keep``
                is False are ignored but must be in range).
            keep: bool, broadcastable to (B, H, W), True where known.
            labels, steps_per_block, steps, temperature, order,
            guidance_scale, choice_temperature, generator, progress: as in
                ``sample``.

        Returns (B, H, W) int64, equal to ``codes`` where ``keep``.
        """
        codes = self._check_codes(codes, "codes", "inpaint")
        keep = self._check_keep(keep, codes, "inpaint")
        spb, temp, choice, gs = self._sampling_args("inpaint", steps_per_block, steps, temperature,
                                                    choice_temperature, order, guidance_scale)
        labels = self._labels(labels, codes.shape[0], "inpaint")
        tokens = torch.where(keep, codes, self.mask_id)
        out = self._decode(tokens, labels, steps_per_block=spb, temperature=temp, choice_temperature=choice,
                           order=order, guidance=gs, generator=generator, progress=progress, desc="inpainting")
        return torch.where(keep, codes, out)

    def outpaint(self, codes: torch.Tensor, border, **kwargs) -> torch.Tensor:
        """``inpaint`` with the known region in the centre: a frame of
        ``border`` tokens (an int or (top, left, bottom, right)) is
        generated around ``codes``' centre (``outpaint_keep``); keyword
        arguments as in ``inpaint`` (``order="center_out"`` grows the image
        outwards)."""
        return self.inpaint(codes, outpaint_keep(self.code_shape, border), **kwargs)

    def edit_box(self, codes: torch.Tensor, box, label=None, **kwargs) -> torch.Tensor:
        """Regenerate ``box`` = (y0, x0, y1, x1) (latent coordinates,
        half-open; ``box_keep``) of ``codes``, conditioned on the class
        ``label`` (an int or a (B,) tensor; None: the null class, and the
        only choice for an unconditional model); the codes outside the box
        never change. Keyword arguments as in ``inpaint``."""
        if "labels" in kwargs:
            raise ArgumentTypeError(f"{self._where('edit_box')}: pass the class as 'label', not 'labels'")
        return self.inpaint(codes, box_keep(self.code_shape, box), labels=label, **kwargs)


# The paper's f = 16 setting: 16 x 16 codes of a K = 1024 tokenizer, blocks
# of Ws = 8 (2 x 2 blocks, G = 4), halo Es = 2. The paper does not list the
# transformer's width; 512 x 12 layers, 8 heads, MLP x4 (81.0M parameters
# with the separate global MLPs and the global conv) is MaskGIT-base-like
# at two thirds of its width. Unconditional (codes folders carry
# no labels): set num_classes (e.g. 1000 for ImageNet) for class-conditional
# training.
register_preset("mgt_f16_16x16", MultiGrainedTransformerConfig())
# The same transformer at 32 x 32 and 64 x 64 codes (the memory table, Table 6).
register_preset("mgt_32x32", MultiGrainedTransformerConfig(latent_size=32))
register_preset("mgt_64x64", MultiGrainedTransformerConfig(latent_size=64))
# A toy for tests and the CPU workflow: K = 256 and 8 x 8 codes (vqgan_tiny at
# 32 px; build_prior resizes both from a codes folder, e.g. 4 x 4 for
# effvqgan_tiny at 32 px), blocks of 2 with halo 1 so that both grids have
# several blocks.
register_preset(
    "mgt_tiny",
    MultiGrainedTransformerConfig(num_codes=256, latent_size=8, block_size=2, halo=1, width=64, depth=2, heads=4,
                                  mlp_ratio=2.0, dropout=0.0, steps_per_block=4),
)
