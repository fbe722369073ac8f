"""The backbone contract: what every model in MODELS promises the tasks, written once.

    forward(audio: B x S waveform | None, video: B x T x 3 x H x W frames | None, *, has_audio, has_video)
        -> {name: B x output_dim for name in output_names}

Every backbone embeds its inputs through two `embedding.InputEmbed` modules, `audio_embed` and `video_embed`
(front end, patch embedding, positions). A missing modality is a zero input, as in the paper (section 4.1): a
modality passed as None, or absent for a sample (has_audio / has_video False), becomes zeros of the configured
input size. Backbones whose fusion is a routing table (Zorro-ViT, -Swin, -HiP) list the maskings they implement in
the class attribute `maskings` (config.check_node reads it); the baselines (MBT, CAV-MAE) have their own fixed
fusion and no `maskings`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from .embedding import InputEmbed
from .layers import maybe_checkpoint
from .routing import MASKINGS, Routing, isolated_outputs, output_names


class AVBackbone(nn.Module):
    """Base of the audio-visual backbones: output names and width, the routing, the input prologue, and what is
    read off their input modules (`audio_embed`, `video_embed`: embedding.InputEmbed)."""

    maskings: tuple[str, ...]  # routed backbones only (see the module docstring), with their `routing`
    routing: Routing
    audio_embed: InputEmbed
    video_embed: InputEmbed
    output_names: tuple[str, ...]
    output_dim: int
    can_drop_absent: bool = False  # forward(drop_absent=True) leaves a missing modality out of the sequence
    grad_checkpointing: bool = False
    late_fusion: bool = False  # the fusion latents can join at a later layer (fusion_level > 0, appendix C)

    def set_routing(self, masking: str, reads: Mapping[str, Sequence[str]] | None = None, *,
                    fusion_level: int = 0) -> Routing:
        """The routing table of `masking` (routing.MASKINGS, or "custom" with `reads`), and the outputs it gives.
        fusion_level > 0 only for a backbone with `late_fusion` (the hierarchical ones fuse after every stage)."""
        if masking not in self.maskings:
            unknown = "" if masking in (*MASKINGS, "custom") else f"unknown masking {masking!r}; "
            raise ValueError(f"{unknown}{type(self).__name__} supports masking in {self.maskings}, got {masking!r}")
        if fusion_level and not self.late_fusion:
            raise ValueError(f"{type(self).__name__} supports fusion_level 0 only (its fusion stream reads every "
                             f"stage), got {fusion_level}")
        self.routing = Routing.from_masking(masking, reads)
        self.output_names = output_names(self.routing)
        return self.routing

    @property
    def isolated_outputs(self) -> tuple[str, ...]:
        """The unimodal outputs that never read the other modality (zorro, two_streams), for a backbone that can
        leave a missing modality out: running it without the other one (`drop_absent=True`) gives exactly the
        same value for them."""
        if not hasattr(self, "routing") or not self.can_drop_absent:
            return ()
        return isolated_outputs(self.routing, self.output_names)

    def batch_size(self, audio: torch.Tensor | None, video: torch.Tensor | None) -> int:
        """The input prologue of every forward: at least one modality, and the batch size it gives."""
        if audio is None and video is None:
            raise ValueError(f"{type(self).__name__} needs at least one of audio / video")
        return (audio if audio is not None else video).shape[0]

    def checkpointed(self, fn, *args):
        """fn(*args), its activations recomputed in the backward pass when `grad_checkpointing` is on and the
        backbone trains (activation checkpointing: less memory, ~30% more compute)."""
        return maybe_checkpoint(fn, *args, enabled=self.grad_checkpointing and self.training)

    def position_tables(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """The learned absolute position tables, by state-dict key: (their configured grid, the grid's time axis).
        `pretrained.load_into` resamples a checkpoint's table along time when its length differs (fine-tuning from
        another audio length), by value, as InputEmbed resamples it for a longer input."""
        return {f"{name}.pos": (m.grid, m.time_axis) for name, m in self.named_modules()
                if isinstance(m, InputEmbed) and m.learned_positions and m.time_axis is not None}

    def init_vit_weights(self) -> None:
        """timm's ViT initialisation (`init_weights_vit_timm`: N(0, 0.02) truncated at +-2, zero bias) of every
        Linear. Other modules keep their construction-time init (LayerNorms ones/zeros, the same as timm resets
        them to); timm's own `needs_reset` would also re-draw convolutions and Swin's bias tables."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_weights_vit_timm(m)
