"""Zorro-ViT (Recasens et al. 2023, section 3.1 and appendix A), readable top to bottom.

audio waveform -> log-mel -> 16x16 patches -> + learned positions ┐
                                        learned fusion latents     ├─ [audio | fusion | video] tokens
video frames -> normalise -> 16x16 patches per frame -> + positions┘
    -> depth x Block (self-attention routed by the masking, see routing.py)
    -> OutputDecoder: 4 learned queries -> {"audio", "video", "fusion", "global"} (B x dim each)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .base import AVBackbone
from .embedding import InputEmbed
from .frontends import AudioFrontend, VideoFrontend
from .layers import Block, Groupwise, OutputDecoder, PatchEmbed, concat_groups, split_groups
from .pretrained import LoadReport, load_into, load_state, vit_into_zorro_vit
from .routing import GROUPS, MASKINGS
from .variants import variant

MISSING_MODALITY = ("zeros", "drop")


class ZorroViT(AVBackbone):
    """Zorro-ViT. Defaults are the paper's ViT-B/16 configuration (98M parameters).

    Args (all keyword-only):
        masking: one of routing.MASKINGS (zorro, two_streams, input_level, bottleneck), or "custom" with
            `masking_reads`, any valid routing table {query group: [key groups]} (non-contiguous read sets run
            as one masked call: FlexAttention on CUDA, SDPA with the dense mask on CPU).
        attention_backend: how routed attention runs: "auto", "sdpa_slices", "flex" or "dense_mask"
            (layers.RoutedAttention); every backend computes the same function.
        fusion_level: layer at which the fusion latents join (appendix C); 0 = from the start.
        separate_weights: per-group LayerNorm/QKV/MLP weights (paper: 98M -> 267M).
        num_frames, image_size, audio_seconds, n_mels, sample_rate: the configured input; position
            embeddings are learned for it and interpolated for other input sizes.
        missing_modality: "zeros" (paper: a missing modality's input is zeroed, every stream runs) or
            "drop" (fast path: the absent modality's tokens are left out; the fusion and global outputs
            then differ from the paper's, the unimodal output of the present modality is identical under
            zorro/two_streams).
        grad_checkpointing: recompute each block's activations in the backward pass (activation
            checkpointing): less memory for big models on small GPUs, ~30% more compute.
    """

    maskings: tuple[str, ...] = (*MASKINGS, "custom")  # every row of routing.MASKINGS, or a table of one's own
    can_drop_absent = True
    late_fusion = True

    def __init__(self, *, dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 patch_size: int = 16, num_fusion: int = 6, masking: str = "zorro", fusion_level: int = 0,
                 separate_weights: bool = False, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_frames: int = 8,
                 image_size: int = 224, sample_rate: int = 48_000, n_mels: int = 128, audio_seconds: float = 2.56,
                 spec_augment: bool = True, window: str = "hann",
                 win_ms: float = 25.0, hop_ms: float = 10.0, freq_mask: int | None = None, time_mask: int | None = None,
                 num_masks: int = 2, freq_jitter: int = 4, missing_modality: str = "zeros",
                 grad_checkpointing: bool = False,
                 masking_reads: Mapping[str, Sequence[str]] | None = None, attention_backend: str = "auto"):
        super().__init__()
        self.set_routing(masking, masking_reads, fusion_level=fusion_level)
        if not {"audio", "video"} <= set(self.routing.reads):
            raise ValueError(f"masking {masking!r}: the routing table needs audio and video rows, "
                             f"got {dict(self.routing.reads)}")
        if missing_modality not in MISSING_MODALITY:
            raise ValueError(f"missing_modality must be one of {MISSING_MODALITY}, got {missing_modality!r}")
        if not 0 <= fusion_level < depth:
            raise ValueError(f"fusion_level must be in [0, depth={depth}), got {fusion_level}")
        if self.routing.has_fusion and num_fusion < 1:
            raise ValueError(f"masking {masking!r} needs fusion latents (num_fusion >= 1)")
        self.missing_modality = missing_modality
        self.grad_checkpointing = grad_checkpointing
        self.fusion_level = fusion_level
        self.num_fusion = num_fusion if self.routing.has_fusion else 0
        self.output_dim = dim

        spectrogram = dict(window=window, win_ms=win_ms, hop_ms=hop_ms, freq_mask=freq_mask, time_mask=time_mask,
                           num_masks=num_masks, freq_jitter=freq_jitter)  # the model config's (conf/model/*.yaml)
        audio_frontend = AudioFrontend(sample_rate=sample_rate, n_mels=n_mels, spec_augment=spec_augment,
                                       clip_seconds=audio_seconds, **spectrogram)
        audio_patch = PatchEmbed(in_chans=1, dim=dim, patch_size=patch_size)
        video_patch = PatchEmbed(in_chans=3, dim=dim, patch_size=patch_size)
        audio_frames = audio_frontend.num_frames(round(audio_seconds * sample_rate))
        audio_frames -= audio_frames % patch_size
        audio_grid = audio_patch.grid(n_mels, audio_frames)
        video_grid = (num_frames, *video_patch.grid(image_size, image_size))
        p = patch_size
        self.audio_embed = InputEmbed(frontend=audio_frontend, patch=audio_patch, grid=audio_grid, dim=dim,
                                      input_shape=(1, audio_grid[0] * p, audio_grid[1] * p), pos="learned",
                                      time_axis=1, trim=p)
        self.video_embed = InputEmbed(frontend=VideoFrontend(), patch=video_patch, grid=video_grid, dim=dim,
                                      input_shape=(num_frames, 3, image_size, image_size), pos="learned", time_axis=0)
        self.fusion_latents = nn.Parameter(torch.zeros(1, self.num_fusion, dim)) if self.num_fusion else None

        groups = tuple(g for g in GROUPS if g in self.routing.reads)  # two_streams: no fusion group, so no fusion copy of separate weights
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rises linearly
        self.blocks = nn.ModuleList(
            Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], separate_weights=separate_weights, groups=groups,
                  attention_backend=attention_backend)
            for i in range(depth))
        self.norm = Groupwise(lambda: nn.LayerNorm(dim), separate=separate_weights, groups=groups)
        self.decoder = OutputDecoder(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, names=self.output_names)
        self.init_vit_weights()
        for p in (self.audio_embed.pos, self.video_embed.pos, self.fusion_latents):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None, *,
                has_audio: torch.Tensor | None = None, has_video: torch.Tensor | None = None,
                drop_absent: bool | None = None) -> dict[str, torch.Tensor]:
        """audio: B x S waveform (int16/float); video: B x T x 3 x H x W (uint8/float in [0, 255]).

        has_audio / has_video (B bool): per-sample presence; absent samples get a zero input.
        drop_absent: leave a modality passed as None out of the sequence instead of zero-filling it
            (default: the `missing_modality` setting).
        Returns {output name: B x dim}; outputs that read no tokens are omitted.
        """
        batch = self.batch_size(audio, video)
        drop = self.missing_modality == "drop" if drop_absent is None else drop_absent
        tokens: dict[str, torch.Tensor] = {}
        if audio is not None or not drop:
            tokens["audio"] = self.audio_embed(audio, has_audio, batch)
        if video is not None or not drop:
            tokens["video"] = self.video_embed(video, has_video, batch)
        fusion = self.fusion_latents.expand(batch, -1, -1) if self.fusion_latents is not None else None
        if fusion is not None and self.fusion_level == 0:
            tokens["fusion"] = fusion

        x, layout = concat_groups(tokens)
        for i, block in enumerate(self.blocks):
            if fusion is not None and i == self.fusion_level and i > 0:  # appendix C: fusion joins at layer k
                x, layout = concat_groups({**split_groups(x, layout), "fusion": fusion})
            x = self.checkpointed(block, x, layout, self.routing)
        return self.decoder(self.norm(x, layout), layout)

    def no_weight_decay(self) -> set[str]:
        return {"audio_embed.pos", "video_embed.pos", "decoder.queries",
                *(["fusion_latents"] if self.num_fusion else [])}

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """timm ViT weights (local file, e.g. ImageNet-21k ViT-B/16) into the shared transformer.

        The patch embedding initialises both modalities (RGB kernel summed for the spectrogram), the
        14 x 14 positions are resampled to the spectrogram grid and repeated over frames; with separate
        weights every group's copy starts from the same ImageNet layer. The fusion latents and the output
        decoder have no ImageNet counterpart and keep their initialisation (listed as missing).
        """
        return load_into(self, load_state(path), rename=vit_into_zorro_vit(groups=self.blocks[0].norm1.groups),
                         channels_to_one=("audio_embed.patch.proj.weight",),
                         pos_grids={"audio_embed.pos": self.audio_embed.grid, "video_embed.pos": self.video_embed.grid})


# -- named variants (timm-style factories): each builds the model its conf/model/ YAML builds, whose comments give the
# sources; tests/models/test_model_configs.py holds them equal. The class keeps the plain ViT's drop_path_rate 0.0
# (timm's), so a ZorroViT built by hand is deterministic in train mode; 0.1 is the configs' choice for the paper model.
# The SpecAugment sizes are the YAML's numbers (the front end's rule at this input), not left to the rule.
@variant(ZorroViT, drop_path_rate=0.1, freq_mask=24, time_mask=24)
def zorro_vit_base(**kwargs) -> ZorroViT:
    """The paper's Zorro-ViT: ViT-B/16, 6 fusion latents, 8 x 224^2 frames, 2.56 s of 48 kHz audio."""


@variant(zorro_vit_base, dim=64, depth=4, num_heads=4, drop_path_rate=0.0, num_frames=4, image_size=64,
         sample_rate=16_000, n_mels=64, audio_seconds=1.28, freq_mask=12, time_mask=12)
def zorro_vit_tiny(**kwargs) -> ZorroViT:
    """A CPU-sized variant for tests and demos (same code path, smaller width/depth/input)."""
