"""Reusable parts: routed attention, the transformer block, cross-attention and the output decoder, patch embeddings.

One block serves Zorro-ViT (every masking) and the fusion streams of the other backbones. Routed attention
has three exact implementations of the same routing table (see routing.py and RoutedAttention):
`sdpa_slices` (one `F.scaled_dot_product_attention` per contiguous query group, no mask tensor),
`flex` (one FlexAttention call per layer with a block mask built from the table: the cross-modal blocks are
skipped inside one fused kernel) and `dense_mask` (one SDPA call with the N x N boolean mask).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp
from torch import nn

from .routing import GROUPS, OUTPUTS, Routing, TokenLayout


class Groupwise(nn.Module):
    """One module for all tokens, or one per token group (`separate_weights`, section 3.1 / MBT).

    With separate weights each group's contiguous slice goes through its own copy and the results are
    concatenated back in sequence order (paper: 98M -> 267M parameters for ViT-B).
    """

    def __init__(self, factory: Callable[[], nn.Module], *, separate: bool, groups: Sequence[str] = GROUPS):
        super().__init__()
        self.separate = separate
        self.groups = tuple(groups) if separate else None
        if separate:
            self.parts = nn.ModuleDict({g: factory() for g in groups})
        else:
            self.shared = factory()

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if not self.separate:
            return self.shared(x)
        pieces = [self.parts[g](x[:, s:e]) for g, s, e in layout.spans()]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


ATTENTION_BACKENDS = ("auto", "sdpa_slices", "flex", "dense_mask")
FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile; blocks wholly inside a read group are "full" (no mask_mod)


class RoutedAttention(nn.Module):
    """Multi-head self-attention in which each query group reads only the key groups its routing allows.

    attention_backend (all exact, same parameters, chosen per call):
        sdpa_slices: one SDPA call per contiguous query group on its key slice, the pieces concatenated
            straight into the projection's token-major layout (no mask tensor; needs every read set to be
            contiguous in token order).
        flex: one FlexAttention call per layer with a block mask built from the routing table, compiled
            (tiles that no query of the tile may read are skipped). CUDA; on CPU torch runs it eagerly and
            without a backward pass (inference and tests only). No attention dropout.
        dense_mask: one SDPA call with the N x N boolean mask (the fair baseline; any table).
        auto: one SDPA call when one call covers every token (input_level, single-group streams); otherwise
            flex on CUDA, and on CPU sdpa_slices (measured fastest there, docs/benchmarks.md), or dense_mask
            for a non-contiguous table or with attention dropout.
    """

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, separate_weights: bool = False, groups: Sequence[str] = GROUPS,
                 attention_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        if attention_backend == "flex" and attn_drop > 0:
            raise ValueError("attention_backend 'flex' has no attention dropout; use attn_drop=0 or another backend")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.attention_backend = attention_backend
        self.qkv = Groupwise(lambda: nn.Linear(dim, 3 * dim, bias=qkv_bias), separate=separate_weights, groups=groups)
        self.proj = Groupwise(lambda: nn.Linear(dim, dim), separate=separate_weights, groups=groups)
        self.proj_drop = nn.Dropout(proj_drop)

    def backend(self, device: torch.device | str, layout: TokenLayout, routing: Routing) -> str:
        """The implementation a call on `device` with this layout runs (resolves "auto")."""
        if self.attention_backend != "auto":
            return self.attention_backend
        cuda = torch.device(device).type == "cuda"
        if not routing.is_contiguous(layout):
            return "flex" if cuda and not self._dropping else "dense_mask"
        if len(routing.attention_calls(layout)) == 1 or not cuda or self._dropping:
            return "sdpa_slices"
        return "flex"

    @property
    def _dropping(self) -> bool:
        return self.training and self.attn_drop > 0

    def forward(self, x: torch.Tensor, layout: TokenLayout, routing: Routing) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x, layout).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = routed_attention(q, k, v, layout, routing, backend=self.backend(x.device, layout, routing),
                               dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.reshape(B, N, C), layout))


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, routing: Routing, *,
                     backend: str, dropout_p: float = 0.0) -> torch.Tensor:
    """The attention core: q, k, v (B x heads x N x d) -> B x N x heads x d (the layout the output projection
    reads), each query reading the keys `routing` allows, with one of the concrete backends (see RoutedAttention)."""
    if backend == "sdpa_slices":
        calls = routing.attention_calls(layout)
        if len(calls) == 1:  # one call covers every token: nothing to slice
            (qs, qe), (ks, ke) = calls[0]
            out = F.scaled_dot_product_attention(q, k[:, :, ks:ke], v[:, :, ks:ke], dropout_p=dropout_p)
            return out.transpose(1, 2)
        # Concatenating the transposed pieces along the tokens is the one copy the projection's B x N x C layout
        # needs anyway (cat on heads-first outputs, then transposing, copied twice). Writing into a preallocated
        # buffer instead measured slower: autograd clones the whole buffer's gradient per in-place write.
        return torch.cat([F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke],
                                                         dropout_p=dropout_p).transpose(1, 2)
                          for (qs, qe), (ks, ke) in calls], dim=1)
    if backend == "dense_mask":
        mask = _cached(("dense", routing.key, layout, q.device), lambda: routing.dense_mask(layout, q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p).transpose(1, 2)
    if backend != "flex":
        raise ValueError(f"unknown attention backend {backend!r}; use one of {ATTENTION_BACKENDS[1:]}")
    if dropout_p:
        raise ValueError("attention_backend 'flex' has no attention dropout")
    mask = _cached(("flex", routing.key, layout, q.device), lambda: flex_block_mask(routing, layout, q.device))
    if q.device.type == "cpu" and torch.compiler.is_compiling():  # inductor's CPU flex refuses views of one buffer
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _flex_attention(q.device)(q, k, v, block_mask=mask).transpose(1, 2)


_MASKS: dict = {}


def _cached(key, build):
    """Masks depend only on (routing, layout, device): build once per shape in eager mode. Under torch.compile the
    build is traced into the graph instead (pure tensor ops on constants, so no guard on this dict)."""
    if torch.compiler.is_compiling():
        return build()
    if key not in _MASKS:
        if len(_MASKS) > 64:  # many input sizes (evaluation views): keep the cache small
            _MASKS.clear()
        _MASKS[key] = build()
    return _MASKS[key]


_COMPILED_FLEX = None


def _flex_attention(device: torch.device):
    """FlexAttention, compiled (its fused kernel) outside torch.compile on CUDA; eager inside a compiled graph
    (the outer compile fuses it) and on CPU (torch's CPU path has no backward; eager is the reference math)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if torch.compiler.is_compiling() or device.type == "cpu":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_block_mask(routing: Routing, layout: TokenLayout, device, block_size: int = FLEX_BLOCK_SIZE):
    """The routing table as a FlexAttention BlockMask.

    mask_mod(b, h, q, k) = reads[group[q], group[k]] with a per-token group id and a (groups + 1)^2 table (the
    extra group pads the sequence to whole tiles and reads nothing). Tiles are classified from the same table:
    empty tiles are skipped, full ones run without mask_mod, only tiles on a group boundary evaluate it.
    Built from tensor ops on Python constants, so torch.compile can trace it.
    """
    from torch.nn.attention.flex_attention import BlockMask

    routing.check_layout(layout)
    G, n = len(GROUPS), layout.total
    nb = -(-n // block_size)
    group = torch.full((nb * block_size,), G, dtype=torch.long, device=device)
    for g, s, e in layout.spans():
        group[s:e] = GROUPS.index(g)
    table = torch.zeros(G + 1, G + 1, dtype=torch.bool, device=device)
    for q, keys in routing.reads.items():
        for k in keys:
            table[GROUPS.index(q), GROUPS.index(k)] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return table[group[q_idx], group[kv_idx]]

    tiles = table[group[:, None], group[None, :]].view(nb, block_size, nb, block_size).transpose(1, 2).flatten(2)
    full = tiles.all(-1)
    partial = tiles.any(-1) & ~full

    def sparse(m):  # nb x nb bool -> (count per query tile, key tile indices with the used ones first)
        counts = m.sum(-1, dtype=torch.int32)
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    return BlockMask.from_kv_blocks(*sparse(partial), *sparse(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


class Block(nn.Module):
    """Pre-norm transformer block (ViT) with routed attention and optional per-group weights."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 separate_weights: bool = False, groups: Sequence[str] = GROUPS,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
                 attention_backend: str = "auto"):
        """groups: the token groups the block sees; with separate weights, one copy per group (no unused copies,
        which DDP without find_unused_parameters refuses)."""
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = Groupwise(lambda: norm_layer(dim), separate=separate_weights, groups=groups)
        self.attn = RoutedAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop, separate_weights=separate_weights, groups=groups,
                                    attention_backend=attention_backend)
        self.norm2 = Groupwise(lambda: norm_layer(dim), separate=separate_weights, groups=groups)
        self.mlp = Groupwise(lambda: Mlp(in_features=dim, hidden_features=hidden, act_layer=act_layer, drop=drop),
                             separate=separate_weights, groups=groups)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, layout: TokenLayout, routing: Routing) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x, layout), layout, routing))
        return x + self.drop_path(self.mlp(self.norm2(x, layout), layout))


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention: queries (width `dim`) read a context (width `context_dim`) through
    q/k/v of width `attn_dim`; the output projection returns to `dim`. One module serves the output decoder,
    Zorro-Swin's fusion stages and HiP's latents (there qk width = input width, HiP's qk_channels).

    `forward(x, context)` is the whole call; `keys_values`, `query_heads` and `attend` are its steps, for callers
    that compute keys once and slice them per reader (decoder, HiP).
    """

    def __init__(self, *, dim: int, num_heads: int, context_dim: int | None = None, attn_dim: int | None = None,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        context_dim, attn_dim = context_dim or dim, attn_dim or dim
        if attn_dim % num_heads:
            raise ValueError(f"attention width {attn_dim} is not divisible by {num_heads} cross-attention heads")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.norm_q, self.norm_kv = norm_layer(dim), norm_layer(context_dim)
        self.q = nn.Linear(dim, attn_dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * attn_dim, bias=qkv_bias)  # projects the context to the attention width
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x n x context_dim -> keys, values (B x heads x n x d each)."""
        B, n, _ = context.shape
        return self.kv(self.norm_kv(context)).view(B, n, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)

    def query_heads(self, x: torch.Tensor) -> torch.Tensor:
        """... x N x dim -> ... x heads x N x d."""
        q = self.q(self.norm_q(x))
        return q.view(*q.shape[:-1], self.num_heads, -1).transpose(-3, -2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """B x heads x N x d queries on B x heads x n x d keys / values -> B x N x dim (projected)."""
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).flatten(2)))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(self.query_heads(x), *self.keys_values(context), mask)


class OutputDecoder(CrossAttention):
    """Learned queries cross-attend to the last layer's tokens (PerceiverIO-style; section 3.1), then an MLP.

    Each query reads the token groups `OUTPUTS[name]` allows, so the audio/video outputs stay unimodal.
    Returns {name: B x dim}. The paper's decoder width is lost in our copies; we use the model width.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, names: Sequence[str] = tuple(OUTPUTS),
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        # drawn before the layers below are built: a seed's initial weights depend on the order of the draws, which
        # benchmarks/compare_backbones.py holds fixed across refactorings
        queries = nn.init.trunc_normal_(torch.zeros(len(names), dim), std=0.02)
        super().__init__(dim=dim, num_heads=num_heads, norm_layer=norm_layer)
        self.names = tuple(names)
        self.queries = nn.Parameter(queries)
        self.norm_mlp = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.norm_out = norm_layer(dim)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
        B = x.shape[0]
        k, v = self.keys_values(x)
        q = self.query_heads(self.queries)  # heads x outputs x d
        present = set(layout.present())
        out = {}
        for i, name in enumerate(self.names):
            if not present.intersection(OUTPUTS[name]):
                continue  # e.g. no fusion output under two_streams, no audio output when audio is dropped
            ks, ke = layout.key_span(OUTPUTS[name])
            qi = q[:, i : i + 1].unsqueeze(0).expand(B, -1, -1, -1)
            o = self.queries[i] + self.attend(qi, k[:, :, ks:ke], v[:, :, ks:ke])[:, 0]
            out[name] = self.norm_out(o + self.mlp(self.norm_mlp(o)))
        return out


def concat_groups(tokens: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, TokenLayout]:
    """{group: B x n_g x C} -> the B x N x C sequence in GROUPS order and its layout."""
    layout = TokenLayout.of(**{g: t.shape[1] for g, t in tokens.items()})
    return torch.cat([tokens[g] for g in GROUPS if g in tokens], dim=1), layout


def split_groups(x: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    return {g: x[:, s:e] for g, s, e in layout.spans()}


class PatchGrid:
    """The token grid of non-overlapping square `patch_size` patches (PatchEmbed, HiP's ConvStem)."""

    patch_size: int

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p


class PatchEmbed(PatchGrid, nn.Module):
    """Non-overlapping square patches of a B x C x H x W map -> B x (H/p * W/p) x dim (ViT, 2D convolution)."""

    def __init__(self, *, in_chans: int, dim: int, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(*x.shape[-2:])
        return self.proj(x).flatten(2).transpose(1, 2)


def resample_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Interpolate a 1 x prod(old_grid) x D learned position embedding to a new 2D/3D grid.

    Used when the input differs from the configured size (longer audio, more frames, other resolution)
    and when loading checkpoints trained at another size.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos
    if pos.shape[1] != math.prod(old_grid):
        raise ValueError(f"position embedding has {pos.shape[1]} entries, grid {old_grid} needs {math.prod(old_grid)}")
    dim = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, dim).movedim(-1, 1).float()
    mode = {2: "bicubic", 3: "trilinear"}[len(old_grid)]
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    return grid.movedim(1, -1).reshape(1, math.prod(new_grid), dim).to(pos.dtype)


def maybe_checkpoint(fn: Callable, *args, enabled: bool):
    """fn(*args), recomputing its activations in the backward pass (activation checkpointing) when `enabled`
    and gradients are being recorded: the backbones' `grad_checkpointing` option."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
