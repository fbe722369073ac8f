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
(block, window attention, patch merging); the video stream is Video Swin (Liu et al. 2022, video_swin.py):
windows in time, height and width, a 3D relative position bias, spatial-only patch merging. Who the fusion
latents read is the model's routing table (routing.py), not this file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from torch import nn

from .base import AVBackbone
from .embedding import InputEmbed
from .frontends import AudioFrontend, VideoFrontend
from .layers import Block, CrossAttention, OutputDecoder, concat_groups, maybe_checkpoint
from .pretrained import LoadReport, load_into, load_state, swin_into_streams
from .routing import Routing, TokenLayout
from .variants import variant
from .video_swin import PatchEmbed3d, PatchMerging3d, SwinBlock3d


# -- 2D (audio): timm's Swin block, padded before the shift --------------------------------------------------
class SwinBlock2d(SwinTransformerBlock):
    """timm's SwinTransformerBlock, padding the grid *before* the cyclic shift as the original Swin does.

    timm pads after the shift, so when the grid is not a multiple of the window, tokens that wrapped around
    the edge attend to the far side of the spectrogram (huggingface/pytorch-image-models#2438). Padding first
    makes timm's own shift mask (built for the padded grid) exact. Attention runs as F.scaled_dot_product_attention
    (timm's `fused_attn`), as everywhere else here. Everything else is timm's.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attn.fused_attn = True

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
    """One modality's Swin after its input module, without a head: layers (stages), norm; channels-last grids."""

    def __init__(self, *, stages: Sequence[Stage], dim: int):
        super().__init__()
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dim)


class FusionStage(nn.Module):
    """The fusion stream's update at the end of a stage (section 3.2): widen the latents to the stage width
    (LayerNorm + Linear, like patch merging), cross-attend to the groups the routing lets fusion read (zorro:
    [audio | fusion | video]), then one ViT block ("the same self-attention as in Zorro-ViT")."""

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

    def forward(self, fusion: torch.Tensor, audio: torch.Tensor, video: torch.Tensor,
                routing: Routing) -> torch.Tensor:
        fusion = self.widen(fusion)
        groups = {"audio": audio, "fusion": fusion, "video": video}
        context, _ = concat_groups({g: groups[g] for g in routing.reads["fusion"]})
        fusion = fusion + self.drop_path(self.cross(fusion, context))
        return self.block(fusion, TokenLayout.of(fusion=fusion.shape[1]), routing)  # the latents read each other


# -- the model -------------------------------------------------------------------------------------------------
class ZorroSwin(AVBackbone):
    """Zorro-Swin. Defaults are Swin-B / Video Swin-B sized (the paper's sizes are lost in our copies).

    Args (all keyword-only):
        embed_dim, depths, num_heads: stage widths are embed_dim * 2^i; Swin-B: 128, (2, 2, 18, 2), (4, 8, 16, 32);
            the default has 10 blocks in stage 3, for the paper's 161M parameters (conf/model/zorro_swin.yaml).
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

    def __init__(self, *, embed_dim: int = 128, depths: Sequence[int] = (2, 2, 10, 2),
                 num_heads: Sequence[int] = (4, 8, 16, 32), window_size: int = 7,
                 video_window_size: Sequence[int] = (8, 7, 7), patch_size: int = 4,
                 video_patch_size: Sequence[int] = (2, 4, 4), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 num_fusion: int = 6, masking: str = "zorro", fusion_level: int = 0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3, num_frames: int = 8,
                 image_size: int = 224, sample_rate: int = 48_000, n_mels: int = 128, audio_seconds: float = 2.56,
                 spec_augment: bool = True, window: str = "hann",
                 win_ms: float = 25.0, hop_ms: float = 10.0, freq_mask: int | None = None, time_mask: int | None = None,
                 num_masks: int = 2, freq_jitter: int = 4, grad_checkpointing: bool = False):
        super().__init__()
        self.set_routing(masking, fusion_level=fusion_level)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        self.grad_checkpointing = grad_checkpointing
        self.fusion_level = fusion_level
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.output_dim = dims[-1]

        spectrogram = dict(window=window, win_ms=win_ms, hop_ms=hop_ms, freq_mask=freq_mask, time_mask=time_mask,
                           num_masks=num_masks, freq_jitter=freq_jitter)  # the model config's (conf/model/*.yaml)
        audio_frontend = AudioFrontend(sample_rate=sample_rate, n_mels=n_mels, spec_augment=spec_augment,
                                       clip_seconds=audio_seconds, **spectrogram)
        audio_shape = (n_mels, audio_frontend.num_frames(round(audio_seconds * sample_rate)))

        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth rises linearly
        stage_dpr = [dpr[sum(depths[:i]):sum(depths[: i + 1])] for i in range(len(depths))]
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate)

        # Audio: timm's 2D Swin on the spectrogram (mel bins x frames), 1 input channel. Each stream's stages are
        # built before its patch embedding, the order in which a seed draws their weights.
        grid = audio_grid = [math.ceil(n / patch_size) for n in audio_shape]
        audio_stages = []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            if i:
                grid = [(n + 1) // 2 for n in grid]
            audio_stages.append(Stage(
                downsample=PatchMerging(dim=dims[i - 1], out_dim=dim) if i else nn.Identity(),
                blocks=[SwinBlock2d(dim=dim, input_resolution=tuple(grid), num_heads=heads, window_size=window_size,
                                    shift_size=0 if j % 2 == 0 else window_size // 2, drop_path=stage_dpr[i][j],
                                    **common) for j in range(depth)]))
        audio_patch = PatchEmbed(img_size=audio_shape, patch_size=patch_size, in_chans=1, embed_dim=embed_dim,
                                 norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False,
                                 dynamic_img_pad=True)  # grids padded to whole patches
        self.audio_embed = InputEmbed(frontend=audio_frontend, patch=audio_patch, grid=audio_grid, dim=embed_dim,
                                      input_shape=(1, *audio_shape), flatten=False)
        self.audio = SwinStream(stages=audio_stages, dim=dims[-1])

        # Video: 3D Swin (Video Swin), windows shifted by half a window every other block.
        grid = video_grid = [math.ceil(n / p) for n, p in zip((num_frames, image_size, image_size), video_patch_size)]
        video_stages = []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            if i:
                grid = [grid[0], (grid[1] + 1) // 2, (grid[2] + 1) // 2]  # Video Swin merges space only
            video_stages.append(Stage(
                downsample=PatchMerging3d(dim=dims[i - 1], out_dim=dim) if i else nn.Identity(),
                blocks=[SwinBlock3d(dim=dim, num_heads=heads, window_size=video_window_size, shift=j % 2 == 1,
                                    input_resolution=grid, drop_path=stage_dpr[i][j], **common)
                        for j in range(depth)]))
        video_patch = PatchEmbed3d(in_chans=3, dim=embed_dim, patch_size=video_patch_size)
        self.video_embed = InputEmbed(frontend=VideoFrontend(), patch=video_patch, grid=video_grid, dim=embed_dim,
                                      input_shape=(num_frames, 3, image_size, image_size), flatten=False)
        self.video = SwinStream(stages=video_stages, dim=dims[-1])

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
        self.init_vit_weights()  # timm's Swin and ViT initialise the same way
        if self.fusion_latents is not None:
            nn.init.trunc_normal_(self.fusion_latents, std=0.02)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None, *,
                has_audio: torch.Tensor | None = None, has_video: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """audio: B x S waveform (int16/float); video: B x T x 3 x H x W (uint8/float in [0, 255]).

        has_audio / has_video (B bool): per-sample presence; absent samples (and a None input) get a zero
        input, as in the paper. Returns {output name: B x output_dim}.
        """
        batch = self.batch_size(audio, video)
        a = self.audio_embed(audio, has_audio, batch)  # B x H x W x C
        v = self.video_embed(video, has_video, batch)  # B x T x H x W x C
        f = self.fusion_latents.expand(batch, -1, -1) if self.num_fusion else None
        ckpt = self.grad_checkpointing and self.training
        for i, (audio_stage, video_stage) in enumerate(zip(self.audio.layers, self.video.layers)):
            a, v = audio_stage(a, ckpt), video_stage(v, ckpt)
            if f is not None:  # the fusion stream reads the streams; nothing reads it back
                f = self.checkpointed(self.fusion_stages[i], f, a.flatten(1, 2), v.flatten(1, 3), self.routing)
        tokens = {"audio": self.audio.norm(a).flatten(1, 2), "video": self.video.norm(v).flatten(1, 3)}
        if f is not None:
            tokens["fusion"] = self.fusion_norm(f)
        return self.decoder(*concat_groups(tokens))

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
        streams = ("audio", "video") if video else ("audio",)
        return load_into(self, swin_into_streams(self, load_state(path), streams),
                         channels_to_one=("audio_embed.patch.proj.weight",))


# -- named variants (timm-style factories): each builds the model its conf/model/ YAML builds, whose comments give the
# sources; tests/models/test_model_configs.py holds them equal. The SpecAugment sizes are the YAML's numbers.
@variant(ZorroSwin, freq_mask=24, time_mask=24)
def zorro_swin_base(**kwargs) -> ZorroSwin:
    """Zorro-Swin with Swin-B / Video Swin-B widths (10 blocks in stage 3: the paper's 161M), 6 fusion latents,
    8 x 224^2 frames, 2.56 s of 48 kHz audio."""


@variant(zorro_swin_base, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0, num_frames=4,
         image_size=64, sample_rate=16_000, n_mels=64, audio_seconds=1.28, freq_mask=12, time_mask=12)
def zorro_swin_tiny(**kwargs) -> ZorroSwin:
    """A CPU-sized variant for tests and demos (same code path and windows, so the small grids get padded)."""
