"""MBT: Attention Bottlenecks for Multimodal Fusion (Nagrani et al. 2021), the baseline of Zorro's Table 2.

Two ViTs with separate weights, one per modality. Up to the fusion layer L_f they run independently; from
L_f on, B shared bottleneck tokens join each stream: every layer updates the bottleneck once through the
audio ViT's layer and once through the video ViT's layer, and the two updates are averaged (MBT eq. 8-9).
So cross-modal information passes only through the B bottleneck tokens.

    audio  [CLS_a | spectrogram patches] ── layers < L_f ──┬─ [.. | z] ─ audio layer ─┐
                                                           │          z = mean(z_a, z_v)
    video  [CLS_v | frame patches     ] ── layers < L_f ──┴─ [.. | z] ─ video layer ─┘
    -> {"audio": CLS_a, "video": CLS_v}; MBT passes both to the same linear classifier and averages the
       pre-softmax logits: SupervisedTask(shared_head=True, combine="logits"), set by experiment=mbt_as500k.

This differs from Zorro-ViT's `bottleneck` masking (routing.py), which keeps ONE set of weights and lets the
fusion tokens read everything from the first layer on; both stay. `num_bottleneck=0` (or
`fusion_layer=depth`) gives MBT's late-fusion baseline: two independent ViTs with averaged predictions.

Unlike Zorro's unimodal outputs, MBT's CLS outputs after L_f carry the other modality (through z), so the
"audio" output is not audio-only; the perturbation test in tests/models/test_mbt.py pins this down.

What follows scenic (google-research/scenic, projects/mbt, the code the paper's numbers come from) and what
follows the paper where the two differ (benchmarks/equivalence/mbt.py compares this model with scenic's):
- GELU: tanh-approximated, as flax's `nn.gelu` in scenic's blocks (and the JAX ViT the in21k weights come from).
- One final LayerNorm for both streams (scenic's `encoder_norm` runs on the concatenated tokens).
- ImageNet loading (`load_pretrained`) computes scenic's `initialise_from_train_state` function: the ViT's CLS
  position, which scenic keeps in the table and adds to the CLS token, is added to our CLS token (our tables hold
  patches only: the same sum). scenic restores the ViT's CLS token into the video stream only (it looks for
  `cls_spectrogram`, the parameter is `clsspectrogram`), so the audio CLS token starts as the CLS position alone,
  here too. Position grids are resized as scenic's `scipy.ndimage.zoom(order=1)` (bilinear, corners aligned), not
  timm's bicubic; scenic's spectrogram is a (time x mel) image, so the ViT's rows and the position grid's rows go
  to time (our (mel x time) layout takes the transposed kernel and grid).
- Bottleneck: B = 4 tokens drawn from N(0, 0.02), as the paper says. scenic adds one token when the classifier
  is a CLS token (n_bottlenecks + 1) and, when loading ImageNet weights, overwrites them with the ViT's resized
  position embeddings; we follow the paper's B and initialisation (the loaded weights leave them as drawn).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from timm.models.vision_transformer import Block
import torch.nn.functional as F
from torch import nn

from .base import AVBackbone
from .embedding import InputEmbed, input_module_key
from .frontends import AudioFrontend, VideoFrontend
from .layers import PatchEmbed
from .pretrained import LoadReport, load_into, load_state, vit_into_streams
from .variants import variant


class _ViTStream(nn.Module):
    """One modality's ViT after its input module: CLS token and blocks (timm names); the final norm is MBT's,
    shared by both streams."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path: list[float], act_layer: type):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                          drop_path=drop_path[i], act_layer=act_layer) for i in range(depth))

    def with_cls(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class MBT(AVBackbone):
    """MBT with ViT-B streams. Defaults follow the MBT paper's best AudioSet model (NUMBERS.md, "MBT").

    Args (keyword-only):
        num_bottleneck: B bottleneck tokens (paper: 4), initialised N(0, 0.02).
        fusion_layer: L_f, the first layer that sees the bottleneck (paper: 8 of 12).
        sample_rate, n_mels, audio_seconds, window, win_ms, hop_ms: MBT's audio is 16 kHz, 128-bin log-mel
            with a 25 ms Hamming window and 10 ms hop, t = 8 s in the best model.
        freq_mask, time_mask, num_masks, freq_jitter: SpecAugment "as AST": one frequency mask of at most 48 mel
            bins and one time mask of at most 192 frames; no frequency jitter (Zorro's augmentation, not MBT's).
        num_frames, image_size: 8 frames of 224^2 (16x16 patches: 8 x 14 x 14 = 1568 tokens).
        video_mean, video_std: frame normalisation (0-1 scale): 0.5 / 0.5 maps frames to [-1, 1], scenic's
            `zero_centering` and what the in21k ViT weights (timm `augreg_in21k`) expect.
        gelu: "tanh" (scenic's flax `nn.gelu`) or "none" (exact, torch's default).
    """

    def __init__(self, *, dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 patch_size: int = 16, qkv_bias: bool = True, num_bottleneck: int = 4, fusion_layer: int = 8,
                 drop_path_rate: float = 0.3, num_frames: int = 8, image_size: int = 224, sample_rate: int = 16_000,
                 n_mels: int = 128, audio_seconds: float = 8.0, window: str = "hamming", spec_augment: bool = True,
                 freq_mask: int = 48, time_mask: int = 192, num_masks: int = 1, freq_jitter: int = 0,
                 win_ms: float = 25.0, hop_ms: float = 10.0, video_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 video_std: tuple[float, ...] = (0.5, 0.5, 0.5), gelu: str = "tanh", grad_checkpointing: bool = False):
        super().__init__()
        if not 0 <= fusion_layer <= depth:
            raise ValueError(f"fusion_layer must be in [0, depth={depth}], got {fusion_layer}")
        if gelu not in ("tanh", "none"):
            raise ValueError(f"gelu must be 'tanh' or 'none', got {gelu!r}")
        self.fusion_layer = fusion_layer if num_bottleneck else depth
        self.grad_checkpointing = grad_checkpointing
        self.output_dim = dim
        self.output_names = ("audio", "video")

        audio_frontend = AudioFrontend(sample_rate=sample_rate, n_mels=n_mels, spec_augment=spec_augment,
                                       clip_seconds=audio_seconds, window=window, freq_mask=freq_mask,
                                       time_mask=time_mask, num_masks=num_masks, freq_jitter=freq_jitter,
                                       win_ms=win_ms, hop_ms=hop_ms)
        video_frontend = VideoFrontend(mean=tuple(video_mean), std=tuple(video_std))
        audio_frames = audio_frontend.num_frames(round(audio_seconds * sample_rate))
        audio_grid = (n_mels // patch_size, audio_frames // patch_size)
        video_grid = (num_frames, image_size // patch_size, image_size // patch_size)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        common = dict(dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop_path=dpr, act_layer=functools.partial(nn.GELU, approximate=gelu))
        # built in the order a seed draws them: each stream's patch embedding, then its blocks
        audio_patch = PatchEmbed(in_chans=1, dim=dim, patch_size=patch_size)
        audio = _ViTStream(**common)
        video_patch = PatchEmbed(in_chans=3, dim=dim, patch_size=patch_size)
        video = _ViTStream(**common)
        p = patch_size
        self.audio_embed = InputEmbed(frontend=audio_frontend, patch=audio_patch, grid=audio_grid, dim=dim,
                                      input_shape=(1, audio_grid[0] * p, audio_grid[1] * p), pos="learned",
                                      time_axis=1, trim=p)  # positions for the patches only; CLS needs none
        self.audio = audio
        self.video_embed = InputEmbed(frontend=video_frontend, patch=video_patch, grid=video_grid, dim=dim,
                                      input_shape=(num_frames, 3, video_grid[1] * p, video_grid[2] * p),
                                      pos="learned", time_axis=0)
        self.video = video
        self.bottleneck = nn.Parameter(torch.zeros(1, num_bottleneck, dim)) if num_bottleneck else None
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # scenic's encoder_norm: one LayerNorm over both streams' tokens
        self.init_vit_weights()
        for p in (self.audio_embed.pos, self.video_embed.pos, self.audio.cls_token, self.video.cls_token,
                  self.bottleneck):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None, *,
                has_audio: torch.Tensor | None = None, has_video: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        batch = self.batch_size(audio, video)
        a = self.audio.with_cls(self.audio_embed(audio, has_audio, batch))
        v = self.video.with_cls(self.video_embed(video, has_video, batch))
        z = None
        for i, (block_a, block_v) in enumerate(zip(self.audio.blocks, self.video.blocks)):
            if i < self.fusion_layer:
                a, v = self.checkpointed(block_a, a), self.checkpointed(block_v, v)
                continue
            if z is None:
                z = self.bottleneck.expand(batch, -1, -1)
            n_a, n_v = a.shape[1], v.shape[1]
            ya = self.checkpointed(block_a, torch.cat([a, z], dim=1))
            yv = self.checkpointed(block_v, torch.cat([v, z], dim=1))
            a, v = ya[:, :n_a], yv[:, :n_v]
            z = (ya[:, n_a:] + yv[:, n_v:]) / 2  # MBT eq. 9: each stream's update of z, averaged
        return {"audio": self.norm(a[:, 0]), "video": self.norm(v[:, 0])}

    def no_weight_decay(self) -> set[str]:
        return {"audio_embed.pos", "video_embed.pos", "audio.cls_token", "video.cls_token", "bottleneck"}

    # -- ImageNet initialisation (MBT: ViT-B from ImageNet-21k) -------------------------------------------
    def load_pretrained(self, path: str | Path) -> LoadReport:
        """timm ViT weights (local file) into both streams, as scenic's MBT loads a ViT (module docstring): the
        CLS position added to the CLS token; the RGB patch kernel summed for the 1-channel spectrogram (scenic tiles
        it to 3 channels) with its rows on time; the 14 x 14 position grid resized bilinearly (corners aligned) to
        the (time x mel) grid, and to each frame's grid repeated over the frames."""
        state = dict(load_state(path))
        state, resized = vit_as_scenic_mbt(state, audio_grid=self.audio_embed.grid, video_grid=self.video_embed.grid)
        shared = vit_into_streams(("audio", "video"))  # what both streams take as it is

        def rename(key: str):
            return key if key.startswith(("audio.", "video.", "norm.")) else shared(key)

        report = load_into(self, state, rename=rename)
        resized = [(input_module_key(key), *rest) for key, *rest in resized]
        report.resized += [r for r in resized if r[0] in report.loaded]
        return report


def vit_as_scenic_mbt(state: dict[str, torch.Tensor], *, audio_grid: tuple[int, int], video_grid: tuple[int, ...]):
    """A timm ViT state dict -> the same keys for MBT's streams, adapted as scenic's `initialise_from_train_state`
    (`resize_tile` positions) adapts a ViT: per-stream keys `audio.*` / `video.*` where the streams differ, and the
    list of (key, from, to, how) it changed. Keys it does not touch pass unchanged."""
    out, resized = dict(state), []
    pos, cls = state.get("pos_embed"), state.get("cls_token")
    if pos is not None and cls is not None:
        side = math.isqrt(pos.shape[1])
        extra = pos.shape[1] - side * side  # the CLS position (and any register tokens) in front of the grid
        if extra:
            out.pop("cls_token")
            out["video.cls_token"] = cls + pos[:, :1]
            out["audio.cls_token"] = pos[:, :1].clone()
            resized.append(("video.cls_token", tuple(cls.shape), tuple(cls.shape), "+ the ViT's CLS position"))
            resized.append(("audio.cls_token", tuple(cls.shape), tuple(cls.shape),
                            "the ViT's CLS position alone (scenic's spectrogram CLS keeps its zero init)"))
        grid = pos[0, extra:].reshape(side, side, -1)
        freq, time = audio_grid
        audio = _zoom_linear(grid, (time, freq)).transpose(0, 1)  # scenic's (time x mel) grid, in our (mel x time)
        frame = _zoom_linear(grid, tuple(video_grid[-2:]))
        out.pop("pos_embed")
        out["audio.pos_embed"] = audio.reshape(1, freq * time, -1)
        out["video.pos_embed"] = frame.reshape(1, 1, -1, grid.shape[-1]).expand(1, video_grid[0], -1, -1).reshape(
            1, math.prod(video_grid), -1)
        resized += [("audio.pos_embed", tuple(pos.shape), tuple(out["audio.pos_embed"].shape),
                     f"position grid {side}x{side} -> {time}x{freq} (time x mel), bilinear, corners aligned"),
                    ("video.pos_embed", tuple(pos.shape), tuple(out["video.pos_embed"].shape),
                     f"position grid {side}x{side} -> {'x'.join(map(str, video_grid[-2:]))}, bilinear, corners "
                     f"aligned, repeated over {video_grid[0]} frames")]
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.ndim == 4:
        out["audio.patch_embed.proj.weight"] = kernel.sum(1, keepdim=True).transpose(-1, -2)
        resized.append(("audio.patch_embed.proj.weight", tuple(kernel.shape),
                        tuple(out["audio.patch_embed.proj.weight"].shape),
                        "RGB kernel summed to 1 channel, rows on time (scenic's time x mel spectrogram)"))
        out["video.patch_embed.proj.weight"] = kernel
        out["audio.patch_embed.proj.bias"] = out["video.patch_embed.proj.bias"] = state.get("patch_embed.proj.bias")
        out.pop("patch_embed.proj.weight")
        if out["audio.patch_embed.proj.bias"] is None:
            del out["audio.patch_embed.proj.bias"], out["video.patch_embed.proj.bias"]
        else:
            out.pop("patch_embed.proj.bias")
    return out, resized


def _zoom_linear(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An h x w x D grid resized to `size` as scipy.ndimage.zoom(order=1) (scenic's
    `interpolate_positional_embeddings`): bilinear with the corner entries kept."""
    if tuple(grid.shape[:2]) == tuple(size):
        return grid
    x = grid.permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)[0].permute(1, 2, 0).to(grid.dtype)


# -- named variants (timm-style factories): each builds the model its conf/model/ YAML builds, whose comments give the
# sources; tests/models/test_model_configs.py holds them equal. The class defaults are the paper's model.
@variant(MBT)
def mbt_base(**kwargs) -> MBT:
    """MBT's best AudioSet model: ViT-B streams, B = 4, L_f = 8, 8 s of 16 kHz audio, 8 x 224^2 frames."""


@variant(mbt_base, dim=64, depth=4, num_heads=4, fusion_layer=2, drop_path_rate=0.0, num_frames=4, image_size=64,
         sample_rate=16_000, n_mels=64, audio_seconds=1.28, freq_mask=24, time_mask=24)
def mbt_tiny(**kwargs) -> MBT:
    """A CPU-sized MBT for tests and demos (the inputs of zorro_vit_tiny)."""
