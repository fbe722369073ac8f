"""Reusable parts: routed attention, the transformer block, the output decoder, patch embeddings.

One block serves Zorro-ViT (every masking) and the fusion streams of the other backbones. Attention goes
through `F.scaled_dot_product_attention` on contiguous token slices chosen by a `Routing` (see routing.py),
so no mask tensor is ever built and the fused kernels (flash / memory-efficient) remain eligible.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

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
        if separate:
            self.parts = nn.ModuleDict({g: factory() for g in groups})
        else:
            self.shared = factory()

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if not self.separate:
            return self.shared(x)
        pieces = [self.parts[g](x[:, s:e]) for g, s, e in layout.spans()]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


class RoutedAttention(nn.Module):
    """Multi-head self-attention in which each query group reads only the key slice its routing allows."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, separate_weights: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = Groupwise(lambda: nn.Linear(dim, 3 * dim, bias=qkv_bias), separate=separate_weights)
        self.proj = Groupwise(lambda: nn.Linear(dim, dim), separate=separate_weights)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, layout: TokenLayout, routing: Routing) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x, layout).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        outs = [
            F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], dropout_p=drop)
            for (qs, qe), (ks, ke) in routing.attention_calls(layout)
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C), layout))


class Block(nn.Module):
    """Pre-norm transformer block (ViT) with routed attention and optional per-group weights."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 separate_weights: bool = False, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = Groupwise(lambda: norm_layer(dim), separate=separate_weights)
        self.attn = RoutedAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop, separate_weights=separate_weights)
        self.norm2 = Groupwise(lambda: norm_layer(dim), separate=separate_weights)
        self.mlp = Groupwise(lambda: Mlp(in_features=dim, hidden_features=hidden, act_layer=act_layer, drop=drop),
                             separate=separate_weights)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, layout: TokenLayout, routing: Routing) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x, layout), layout, routing))
        return x + self.drop_path(self.mlp(self.norm2(x, layout), layout))


class OutputDecoder(nn.Module):
    """Learned queries cross-attend to the last layer's tokens (PerceiverIO-style; section 3.1).

    Each query reads the token groups `OUTPUTS[name]` allows, so the audio/video outputs stay unimodal.
    Returns {name: B x dim}. The paper's decoder width is lost in our copies; we use the model width.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, names: Sequence[str] = tuple(OUTPUTS),
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.names = tuple(names)
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.zeros(len(self.names), dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.norm_q, self.norm_kv = norm_layer(dim), norm_layer(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.norm_out = norm_layer(dim)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        k, v = self.kv(self.norm_kv(x)).view(B, N, 2, h, d).permute(2, 0, 3, 1, 4)
        q = self.q(self.norm_q(self.queries)).view(-1, h, d).transpose(0, 1)  # heads x outputs x d
        present = set(layout.present())
        out = {}
        for i, name in enumerate(self.names):
            if not present.intersection(OUTPUTS[name]):
                continue  # e.g. no fusion output under two_streams, no audio output when audio is dropped
            ks, ke = layout.key_span(OUTPUTS[name])
            qi = q[:, i : i + 1].unsqueeze(0).expand(B, -1, -1, -1)
            o = F.scaled_dot_product_attention(qi, k[:, :, ks:ke], v[:, :, ks:ke]).reshape(B, C)
            o = self.queries[i] + self.proj(o)
            out[name] = self.norm_out(o + self.mlp(self.norm_mlp(o)))
        return out


class PatchEmbed(nn.Module):
    """Non-overlapping square patches of a B x C x H x W map -> B x (H/p * W/p) x dim (ViT, 2D convolution)."""

    def __init__(self, *, in_chans: int, dim: int, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

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


def init_vit_weights(m: nn.Module) -> None:
    """timm's ViT initialisation: truncated-normal linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
