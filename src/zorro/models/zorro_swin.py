"""Zorro-Swin (Recasens et al. 2023, section 3.2 and appendix A), readable top to bottom.

Each modality has its own Swin; a small fusion stream reads both and writes to neither:

    audio waveform -> log-mel -> 4x4 patches     -> 2D Swin stage 1 -> stage 2 -> stage 3 -> stage 4 ──┐
                                                             │           │           │           │        │
    fusion latents (6, stage width) ─────────── cross-attn + ViT block after every stage (reads a|f|v) ──┤
                                                             │           │           │           │        │
    video frames -> normalise -> 2x4x4 patches   -> 3D Swin stage 1 -> stage 2 -> stage 3 -> stage 4 ──┘
        -> OutputDecoder: 4 learned queries -> {"audio", "video", "fusion", "global"} (B x final width each)

The unimodal streams never read the fusion latents, so no multimodal information flows into them (the
paper's "similarly to Zorro-ViT, no multimodal information flows into the unimodal streams"); the
perturbation test in tests/models/test_zorro_swin.py checks it bitwise. The audio stream is timm's 2D Swin
(block, window attention, patch merging); the video stream is a compact 3D Swin after Video Swin (Liu et al.
2022): windows in time, height and width, a 3D relative position bias, spatial-only patch merging.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from torch import nn

from .frontends import AudioFrontend, VideoFrontend, frames_or_zeros, spectrogram_or_zeros
from .layers import Block, OutputDecoder, init_vit_weights, maybe_checkpoint
from .pretrained import LoadReport, load_into, load_state
from .routing import GROUPS, Routing, TokenLayout, output_names

SHIFT_MASK = -100.0  # Swin's additive mask between tokens that the cyclic shift made neighbours


# -- 2D (audio): timm's Swin block, padded before the shift --------------------------------------------------
class SwinBlock2d(SwinTransformerBlock):
    """timm's SwinTransformerBlock, padding the grid *before* the cyclic shift as the original Swin does.

    timm pads after the shift, so when the grid is not a multiple of the window, tokens that wrapped around
    the edge attend to the far side of the spectrogram (huggingface/pytorch-image-models#2438). Padding first
    makes timm's own shift mask (built for the padded grid) exact. Everything else is timm's.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        (wh, ww), shift = self.window_size, self.shift_size
        x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))
        Hp, Wp = x.shape[1:3]
        mask = self.attn_mask
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            if (Hp, Wp) != tuple(math.ceil(n / w) * w for n, w in zip(self.input_resolution, self.window_size)):
                mask = self.get_attn_mask(x)  # an input size other than the configured one
        windows = window_partition(x, self.window_size).view(-1, self.window_area, C)
        windows = self.attn(windows, mask=mask).view(-1, wh, ww, C)
        x = window_reverse(windows, self.window_size, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].contiguous()


# -- 3D (video): Video Swin's window attention in timm's style ------------------------------------------------
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


# -- the streams -----------------------------------------------------------------------------------------------
class Stage(nn.Module):
    """timm's stage layout: patch merging at the start (none in stage 0), then blocks; keys match timm's."""

    def __init__(self, *, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = maybe_checkpoint(block, x, enabled=checkpointing)
        return x


class SwinStream(nn.Module):
    """One modality's Swin without a head: patch_embed, layers (stages), norm; channels-last grids."""

    def __init__(self, *, patch_embed: nn.Module, stages: Sequence[Stage], dim: int):
        super().__init__()
        self.patch_embed = patch_embed
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dim)


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention: queries x read a context (whose width `context_dim` may differ)."""

    def __init__(self, *, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(context_dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)  # projects the context to the query width
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(self.norm_q(x)).view(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).view(B, context.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class FusionStage(nn.Module):
    """The fusion stream's update at the end of a stage (section 3.2): widen the latents to the stage width
    (LayerNorm + Linear, like patch merging), cross-attend to [audio | fusion | video], then one ViT block
    ("the same self-attention as in Zorro-ViT")."""

    def __init__(self, *, in_dim: int, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float):
        super().__init__()
        self.widen = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim, bias=False)) \
            if in_dim != dim else nn.Identity()
        self.cross = CrossAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.block = Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                           attn_drop=attn_drop, drop_path=drop_path)
        self.routing = Routing.from_masking("zorro")  # fusion latents read each other (no other tokens here)

    def forward(self, fusion: torch.Tensor, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        fusion = self.widen(fusion)
        fusion = fusion + self.drop_path(self.cross(fusion, torch.cat([audio, fusion, video], dim=1)))
        return self.block(fusion, TokenLayout.of(fusion=fusion.shape[1]), self.routing)


# -- the model -------------------------------------------------------------------------------------------------
class ZorroSwin(nn.Module):
    """Zorro-Swin. Defaults are Swin-B / Video Swin-B sized (the paper's sizes are lost in our copies).

    Args (all keyword-only):
        embed_dim, depths, num_heads: stage widths are embed_dim * 2^i; Swin-B: 128, (2, 2, 18, 2), (4, 8, 16, 32).
        window_size: 2D (audio) window; video_window_size: 3D (time, height, width) window (Video Swin-B).
        patch_size: audio patches (4x4 like Swin); video_patch_size: (2, 4, 4) tubes like Video Swin.
        num_fusion: fusion latents ("n_fusion = 6 in all models").
        masking: "zorro" or "two_streams" (no fusion stream). fusion_level: 0 only (latents join at stage 1).
        drop_path_rate: stochastic depth rising linearly over all blocks of a stream, 0 at the first.
        num_frames, image_size, audio_seconds, n_mels, sample_rate: the configured input (other sizes run too:
            grids are padded to the windows, and the windows of the 2D stream are clamped for this size).
        grad_checkpointing: recompute each block's activations in the backward pass.
    """

    maskings: tuple[str, ...] = ("zorro", "two_streams")

    def __init__(self, *, embed_dim: int = 128, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (4, 8, 16, 32), window_size: int = 7,
                 video_window_size: Sequence[int] = (8, 7, 7), patch_size: int = 4,
                 video_patch_size: Sequence[int] = (2, 4, 4), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 num_fusion: int = 6, masking: str = "zorro", fusion_level: int = 0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3, num_frames: int = 8,
                 image_size: int = 224, sample_rate: int = 48_000, n_mels: int = 128, audio_seconds: float = 2.56,
                 spec_augment: bool = True, grad_checkpointing: bool = False):
        super().__init__()
        if masking not in self.maskings:
            raise ValueError(f"ZorroSwin supports masking in {self.maskings}, got {masking!r}")
        if fusion_level != 0:
            raise ValueError(f"ZorroSwin supports fusion_level 0 only (fusion after every stage), got {fusion_level}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        self.routing = Routing.from_masking(masking)
        self.output_names = output_names(self.routing)
        self.grad_checkpointing = grad_checkpointing
        self.fusion_level = fusion_level
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.output_dim = dims[-1]

        self.audio_frontend = AudioFrontend(sample_rate=sample_rate, n_mels=n_mels, spec_augment=spec_augment,
                                            clip_seconds=audio_seconds)
        self.video_frontend = VideoFrontend()
        self.audio_shape = (n_mels, self.audio_frontend.num_frames(round(audio_seconds * sample_rate)))
        self.video_shape = (num_frames, 3, image_size, image_size)

        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth rises linearly
        stage_dpr = [dpr[sum(depths[:i]):sum(depths[: i + 1])] for i in range(len(depths))]
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate)

        # Audio: timm's 2D Swin on the spectrogram (mel bins x frames), 1 input channel.
        grid = [math.ceil(n / patch_size) for n in self.audio_shape]
        audio_stages = []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            if i:
                grid = [(n + 1) // 2 for n in grid]
            audio_stages.append(Stage(
                downsample=PatchMerging(dim=dims[i - 1], out_dim=dim) if i else nn.Identity(),
                blocks=[SwinBlock2d(dim=dim, input_resolution=tuple(grid), num_heads=heads, window_size=window_size,
                                    shift_size=0 if j % 2 == 0 else window_size // 2, drop_path=stage_dpr[i][j],
                                    **common) for j in range(depth)]))
        self.audio = SwinStream(patch_embed=PatchEmbed(
            img_size=self.audio_shape, patch_size=patch_size, in_chans=1, embed_dim=embed_dim,
            norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True),
            stages=audio_stages, dim=dims[-1])
        for block in self.modules():
            if isinstance(block, SwinBlock2d):
                block.attn.fused_attn = True  # F.scaled_dot_product_attention, as everywhere else here

        # Video: 3D Swin (Video Swin), windows shifted by half a window every other block.
        grid = [math.ceil(n / p) for n, p in zip((num_frames, image_size, image_size), video_patch_size)]
        video_stages = []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            if i:
                grid = [grid[0], (grid[1] + 1) // 2, (grid[2] + 1) // 2]  # Video Swin merges space only
            video_stages.append(Stage(
                downsample=PatchMerging3d(dim=dims[i - 1], out_dim=dim) if i else nn.Identity(),
                blocks=[SwinBlock3d(dim=dim, num_heads=heads, window_size=video_window_size, shift=j % 2 == 1,
                                    input_resolution=grid, drop_path=stage_dpr[i][j], **common)
                        for j in range(depth)]))
        self.video = SwinStream(patch_embed=PatchEmbed3d(in_chans=3, dim=embed_dim, patch_size=video_patch_size),
                                stages=video_stages, dim=dims[-1])

        # Fusion stream: latents of the stage width, updated after every stage; two_streams has none.
        self.num_fusion = num_fusion if self.routing.has_fusion else 0
        if self.num_fusion:
            self.fusion_latents = nn.Parameter(torch.zeros(1, self.num_fusion, dims[0]))
            self.fusion_stages = nn.ModuleList(
                FusionStage(in_dim=dims[max(i - 1, 0)], dim=dim, num_heads=heads, mlp_ratio=mlp_ratio,
                            qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=stage_dpr[i][-1])
                for i, (dim, heads) in enumerate(zip(dims, num_heads)))
            self.fusion_norm = nn.LayerNorm(dims[-1])
        else:
            self.fusion_latents = self.fusion_stages = self.fusion_norm = None

        # Learned queries, as Zorro-ViT's output space (section 3.1): every backbone gives the heads the same
        # kind of output, and "global" weighs the groups by attention, not by their token counts.
        self.decoder = OutputDecoder(dim=dims[-1], num_heads=num_heads[-1], mlp_ratio=mlp_ratio,
                                     names=self.output_names)
        self.apply(init_vit_weights)  # timm's Swin and ViT initialise the same way
        if self.fusion_latents is not None:
            nn.init.trunc_normal_(self.fusion_latents, std=0.02)

    # -- inputs ------------------------------------------------------------------------------------------------
    def audio_input(self, audio: torch.Tensor | None, present: torch.Tensor | None, batch: int) -> torch.Tensor:
        # a missing modality is a zero input, as in the paper
        return spectrogram_or_zeros(self.audio_frontend, audio, present, batch=batch, like=self.decoder.queries,
                                    shape=(1, *self.audio_shape))

    def video_input(self, video: torch.Tensor | None, present: torch.Tensor | None, batch: int) -> torch.Tensor:
        frames = frames_or_zeros(self.video_frontend, video, present, batch=batch, like=self.decoder.queries,
                                 shape=self.video_shape)
        return frames.transpose(1, 2)  # B x 3 x T x H x W for the 3D convolution

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None, *,
                has_audio: torch.Tensor | None = None, has_video: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """audio: B x S waveform (int16/float); video: B x T x 3 x H x W (uint8/float in [0, 255]).

        has_audio / has_video (B bool): per-sample presence; absent samples (and a None input) get a zero
        input, as in the paper. Returns {output name: B x output_dim}.
        """
        if audio is None and video is None:
            raise ValueError("ZorroSwin needs at least one of audio / video")
        batch = (audio if audio is not None else video).shape[0]
        a = self.audio.patch_embed(self.audio_input(audio, has_audio, batch))  # B x H x W x C
        v = self.video.patch_embed(self.video_input(video, has_video, batch))  # B x T x H x W x C
        f = self.fusion_latents.expand(batch, -1, -1) if self.num_fusion else None
        ckpt = self.grad_checkpointing and self.training
        for i, (audio_stage, video_stage) in enumerate(zip(self.audio.layers, self.video.layers)):
            a, v = audio_stage(a, ckpt), video_stage(v, ckpt)
            if f is not None:  # the fusion stream reads the streams; nothing reads it back
                f = maybe_checkpoint(self.fusion_stages[i], f, a.flatten(1, 2), v.flatten(1, 3), enabled=ckpt)
        tokens = {"audio": self.audio.norm(a).flatten(1, 2), "video": self.video.norm(v).flatten(1, 3)}
        if f is not None:
            tokens["fusion"] = self.fusion_norm(f)
        layout = TokenLayout.of(**{g: t.shape[1] for g, t in tokens.items()})
        return self.decoder(torch.cat([tokens[g] for g in GROUPS if g in tokens], dim=1), layout)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n} | \
            ({"fusion_latents"} if self.num_fusion else set()) | {"decoder.queries"}

    # -- pretrained weights ------------------------------------------------------------------------------------
    def load_pretrained(self, path: str | Path, *, video: bool = True) -> LoadReport:
        """A timm 2D Swin checkpoint (local file, e.g. ImageNet Swin-B) into the audio stream and, inflated
        as Video Swin does, into the video stream.

        Audio: the RGB patch kernel is summed to one channel; relative-position-bias tables are cropped to
        windows clamped to a small grid (the same offsets) or resized bicubically to a larger window.
        Video (`video=True`): the 4x4 kernel is repeated over the tube's frames and divided by their number
        (a still video gives the image's response), each 2D bias table (fitted to the 3D window's height
        and width) is repeated for every time offset; patch merging and all linear layers copy as they are.
        Stages must match in number and width. The fusion stream and the output decoder have no ImageNet
        counterpart and keep their initialisation (listed as missing).
        """
        state = load_state(path)
        if "layers.0.downsample.reduction.weight" in state:  # original release: merging at the end of a stage
            state = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k): v
                     for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
        model = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not key.startswith(("patch_embed.", "layers.", "norm.")):
                mapped[key] = value  # e.g. the ImageNet classifier: reported as unused
                continue
            for stream in ("audio", "video") if video else ("audio",):
                dst = f"{stream}.{key}"
                if dst in model:
                    mapped[dst] = _fit_to(dst, value, self.get_submodule(dst.rsplit(".", 1)[0]), model[dst])
        return load_into(self, mapped, channels_to_one=("audio.patch_embed.proj.weight",))


def _fit_to(key: str, value: torch.Tensor, module: nn.Module, want: torch.Tensor) -> torch.Tensor:
    """Adapt a 2D Swin tensor to this model's tensor `want` where a rule applies (else leave it to load_into)."""
    if key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == want.shape[1]:
        window = tuple(module.window_size)
        table = _fit_bias_table(value, window[-2:])
        if len(window) == 3:  # inflate: the same spatial bias for every time offset
            table = table.repeat(2 * window[0] - 1, 1)
        return table
    if key == "video.patch_embed.proj.weight" and value.ndim == 4 and want.ndim == 5:
        frames = want.shape[2]
        return value.unsqueeze(2).expand(-1, -1, frames, -1, -1) / frames
    return value


def _fit_bias_table(table: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """A square (2S-1)^2 x heads table -> (2h-1)(2w-1) x heads: cropped around offset 0 where the window is
    smaller (clamped windows keep the pretrained offsets), resized bicubically where it is larger."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"expected a square 2D relative-position-bias table, got {table.shape[0]} rows")
    grid = table.T.reshape(1, -1, side, side)
    sizes = [2 * w - 1 for w in window]
    if any(s > side for s in sizes):
        grid = F.interpolate(grid.float(), size=[max(s, side) for s in sizes], mode="bicubic",
                             align_corners=False).to(table.dtype)
    centre = [(n - s) // 2 for n, s in zip(grid.shape[-2:], sizes)]
    grid = grid[..., centre[0]: centre[0] + sizes[0], centre[1]: centre[1] + sizes[1]]
    return grid.reshape(table.shape[1], -1).T.contiguous()


# -- named variants (timm-style factories; the Hydra configs in conf/model/ mirror them) -----------------------
def zorro_swin_base(**kwargs) -> ZorroSwin:
    """Zorro-Swin with Swin-B / Video Swin-B streams, 6 fusion latents, 8 x 224^2 frames, 2.56 s of 48 kHz audio."""
    return ZorroSwin(**kwargs)


def zorro_swin_tiny(**kwargs) -> ZorroSwin:
    """A CPU-sized variant for tests and demos (same code path and windows, so the small grids get padded)."""
    cfg = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0, num_frames=4,
               image_size=64, sample_rate=16_000, n_mels=64, audio_seconds=1.28)
    return ZorroSwin(**{**cfg, **kwargs})
