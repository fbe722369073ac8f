"""Video Swin (Liu et al. 2022) in timm's style: the video stream of Zorro-Swin.

Windows in time, height and width with a 3D relative position bias (`WindowAttention3d`), shifted by half a
window every other block (`SwinBlock3d`), tube patches (`PatchEmbed3d`) and spatial-only patch merging
(`PatchMerging3d`). Module and parameter names follow timm's 2D Swin, so a timm Swin checkpoint inflates into
it (pretrained.py).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.swin_transformer import PatchMerging
from torch import nn

SHIFT_MASK = -100.0  # Swin's additive mask between tokens that the cyclic shift made neighbours


def relative_position_index(window: Sequence[int], table_window: Sequence[int], device=None) -> torch.Tensor:
    """N x N index into a relative-position-bias table built for `table_window` (any number of dims).

    Offsets are flattened with the first dim (time) outermost, as Video Swin does, so a 2D table repeated
    2*Wt-1 times is a valid 3D table (inflation). `window` may be smaller than `table_window` (a window
    clamped to a small grid): it reads the table's central part, i.e. the same offsets.
    """
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in window], indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # dims x N x N
    index = torch.zeros_like(rel[0])
    for offsets, size in zip(rel, table_window):
        index = index * (2 * size - 1) + offsets + size - 1
    return index


def shift_mask(grid: Sequence[int], window: Sequence[int], shift: Sequence[int], device=None) -> torch.Tensor:
    """nW x N x N additive mask for shifted windows on a padded `grid` (Swin's, in any number of dims)."""
    labels = torch.zeros(*grid, device=device)
    regions = [(slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),) for w, s in zip(window, shift)]
    for i, region in enumerate(itertools.product(*regions)):
        labels[region] = i
    labels = _partition(labels[None, ..., None], window).squeeze(-1)  # nW x N
    return (labels[:, None, :] != labels[:, :, None]).float() * SHIFT_MASK


def _partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """B x T x H x W x C -> (B * nW) x (wt * wh * ww) x C."""
    B, T, H, W, C = x.shape
    wt, wh, ww = window
    x = x.view(B, T // wt, wt, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wt * wh * ww, C)


def _reverse(windows: torch.Tensor, window: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Inverse of `_partition`: (B * nW) x N x C -> B x T x H x W x C."""
    (wt, wh, ww), (T, H, W) = window, grid
    x = windows.view(-1, T // wt, H // wh, W // ww, wt, wh, ww, windows.shape[-1]).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, T, H, W, windows.shape[-1])


class WindowAttention3d(nn.Module):
    """timm's WindowAttention with a (T, H, W) window and a 3D relative position bias (Video Swin)."""

    def __init__(self, *, dim: int, num_heads: int, window_size: Sequence[int] = (8, 7, 7),
                 attn_window: Sequence[int] | None = None, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = tuple(window_size)  # the table's window
        self.attn_window = tuple(attn_window or window_size)  # the window at the configured grid (may be clamped)
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in self.window_size), num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.attn_window, self.window_size),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, window: Sequence[int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW) x N x C windows of size `window` (<= window_size); mask: nW x N x N or None."""
        B_, N, C = x.shape
        q, k, v = self.qkv(x).view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index if tuple(window) == self.attn_window else \
            relative_position_index(window, self.window_size, device=x.device)
        bias = self.relative_position_bias_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # heads x N x N
        bias = bias.unsqueeze(0).to(q.dtype)
        if mask is not None:  # per-window shift mask, the same for every clip in the batch
            nW = mask.shape[0]
            bias = (bias + mask.unsqueeze(1).to(q.dtype)).unsqueeze(0).expand(B_ // nW, -1, -1, -1, -1)
            bias = bias.reshape(B_, self.num_heads, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


class SwinBlock3d(nn.Module):
    """Video Swin block on B x T x H x W x C: (shifted) 3D window attention + MLP, pre-norm, timm's names.

    Like Video Swin, a window larger than the grid is clamped to it (and not shifted along that dim), and a
    grid that is not a multiple of the window is zero-padded after the norm, before the shift. As timm does,
    the shift mask and position index for `input_resolution` (T, H, W) are built once; other grids build
    their own on the fly.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: Sequence[int] = (8, 7, 7), shift: bool = False,
                 input_resolution: Sequence[int] | None = None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(w // 2 for w in window_size) if shift else (0,) * len(window_size)
        self.input_resolution = tuple(input_resolution or window_size)
        self._static = self._windows(self.input_resolution)
        window, shift, padded = self._static
        self.register_buffer("attn_mask", shift_mask(padded, window, shift) if any(shift) else None, persistent=False)
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention3d(dim=dim, num_heads=num_heads, window_size=window_size, attn_window=window,
                                      qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _windows(self, grid: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(window, shift, padded grid) for a T x H x W grid."""
        window = tuple(min(n, w) for n, w in zip(grid, self.window_size))
        shift = tuple(0 if n <= w else s for n, w, s in zip(grid, self.window_size, self.shift_size))
        return window, shift, tuple(math.ceil(n / w) * w for n, w in zip(grid, window))

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, W, C = x.shape
        window, shift, padded = static = self._windows((T, H, W))
        x = F.pad(x, (0, 0, 0, padded[2] - W, 0, padded[1] - H, 0, padded[0] - T))
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=[-s for s in shift], dims=(1, 2, 3))
            mask = self.attn_mask if static == self._static else shift_mask(padded, window, shift, device=x.device)
        x = _reverse(self.attn(_partition(x, window), window, mask), window, padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :T, :H, :W].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging3d(PatchMerging):
    """Video Swin merges 2x2 spatial neighbours and keeps time: timm's PatchMerging applied frame by frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        x = super().forward(x.flatten(0, 1))
        return x.view(B, T, *x.shape[1:])


class PatchEmbed3d(nn.Module):
    """B x 3 x T x H x W -> B x T' x H' x W' x dim: non-overlapping (t, p, p) tubes, zero-padded to fit,
    then LayerNorm (Video Swin's patch_norm)."""

    def __init__(self, *, in_chans: int = 3, dim: int, patch_size: Sequence[int] = (2, 4, 4)):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, H, W = x.shape[-3:]
        pt, ph, pw = self.patch_size
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))
