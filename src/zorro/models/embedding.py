"""One modality's input side, the same module in every backbone: `InputEmbed` (timm's `PatchEmbed` + `pos_embed`).

    raw batch tensor (B x S waveform | B x T x 3 x H x W uint8 frames)
        -> front end (log-mel, kaldi fbank, normalised frames; zeros of the configured shape where absent)
        -> patch embedding (ViT's PatchEmbed, HiP's ConvStem, Swin's PatchEmbed / PatchEmbed3d)
        -> + positions of the configured grid resampled to the input's grid (+ HiP's Fourier features)
        -> + a modality-type embedding (CAV-MAE's E_a / E_v)

Every backbone owns `audio_embed` and `video_embed`, both `InputEmbed`. The suite's checkpoints of the earlier
per-backbone layout (`audio_pos`, MBT's `audio.patch_embed.*`, ...) and the official layouts the converters read
(CAV-MAE's `patch_embed_a.*`) name the same tensors differently; `input_module_key` is the one table that maps them
to the module's names (pretrained.load_into and pretrained.upgrade_state_dict read every key through it).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
from torch import nn

from .frontends import zero_absent
from .layers import resample_pos_embed

POSITIONS = (None, "learned", "sincos", "sincos_learned")


class InputEmbed(nn.Module):
    """One modality's input side: front end, patch embedding, positions and an optional type embedding.

    Args (keyword-only; the modules are built by the backbone, so that a seed draws their weights in its order):
        frontend: raw batch tensor -> model input (frontends.AudioFrontend / KaldiFbank / VideoFrontend).
        patch: model input -> tokens. With `flatten` a 2D patch module with `grid(h, w)` (layers.PatchEmbed, HiP's
            ConvStem) giving B x N x dim, applied frame by frame to B x T x 3 x H x W frames (grid (T, h, w));
            without, a module giving a channels-last grid (Swin's timm PatchEmbed, video_swin.PatchEmbed3d, which
            takes the frames as B x 3 x T x H x W).
        grid: the configured token grid (the position table's).
        input_shape: the configured per-sample model input (C x F x T spectrogram, T x 3 x H x W frames), the
            zero input of a modality passed as None.
        dim: token width.
        pos: None, "learned" (a table of zeros, the backbone draws it), "sincos" (MAE's fixed 2-D table, a buffer
            rebuilt for another grid) or "sincos_learned" (a learned table that starts from it).
        time_axis: the grid's time axis, along which pretrained.load_into resamples a learned table of another
            length (position_tables); None: tables of another length are not resampled.
        fourier: HiP's projection of the Fourier position features (fourier_bands bands per axis), or None.
        type_embed: add a learned modality-type embedding (CAV-MAE's E_a / E_v; the backbone draws it).
        trim: cut the spectrogram's frames to a multiple of this (the patch width) before embedding.
    """

    def __init__(self, *, frontend: nn.Module, patch: nn.Module, grid: Sequence[int], input_shape: Sequence[int],
                 dim: int, pos: str | None = None, time_axis: int | None = None, fourier: nn.Module | None = None,
                 fourier_bands: int = 0, type_embed: bool = False, flatten: bool = True, trim: int = 1):
        super().__init__()
        if pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {pos!r}")
        if not flatten and (pos or fourier is not None or type_embed):
            raise ValueError("a channels-last grid (flatten=False) takes no position or type embedding")
        self.grid, self.input_shape = tuple(grid), tuple(input_shape)
        self.dim, self.time_axis, self.flatten, self.trim = dim, time_axis, flatten, trim
        self.pos_kind, self.fourier_bands = pos, fourier_bands
        self.frontend = frontend
        self.patch = patch
        if pos == "learned":
            self.pos = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim))
        elif pos == "sincos_learned":
            self.pos = nn.Parameter(sincos_pos_embed(dim, self.grid))
        elif pos == "sincos":  # rebuilt rather than saved
            self.register_buffer("pos", sincos_pos_embed(dim, self.grid), persistent=False)
        else:
            self.pos = None
        self.fourier = fourier
        self.type_embed = nn.Parameter(torch.zeros(1, 1, dim)) if type_embed else None

    @property
    def patch_size(self) -> int:
        return self.patch.patch_size

    @property
    def learned_positions(self) -> bool:
        return isinstance(self.pos, nn.Parameter)

    def inputs(self, x: torch.Tensor | None, present: torch.Tensor | None, batch: int, **options) -> torch.Tensor:
        """The model input: the front end's output (`options` go to it), zeroed for absent samples (B bool
        `present`); with x None (the modality missing from the batch), zeros of the configured `input_shape`."""
        if x is None:
            return next(self.patch.parameters()).new_zeros(batch, *self.input_shape)
        x = self.frontend(x, **options)
        if self.trim > 1:
            x = x[..., : x.shape[-1] // self.trim * self.trim]
        return zero_absent(x, present)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> tokens: B x N x dim with positions (flatten), else the patch module's channels-last grid.
        A 4-D input is one image (spectrogram, frame) per sample, a 5-D one B x T x 3 x H x W frames."""
        if not self.flatten:
            return self.patch(x.transpose(1, 2) if x.ndim == 5 else x)
        if x.ndim == 5:
            B, T = x.shape[:2]
            grid = (T, *self.patch.grid(*x.shape[-2:]))
            tokens = self.patch(x.flatten(0, 1)).reshape(B, math.prod(grid), -1)
        else:
            grid = self.patch.grid(*x.shape[-2:])
            tokens = self.patch(x)
        return self.add_positions(tokens, grid, x)

    def add_positions(self, tokens: torch.Tensor, grid: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        """tokens (+ Fourier features) + the position table resampled to `grid` (+ the type embedding)."""
        if self.fourier is not None:
            features = fourier_features(grid, self.grid, self.fourier_bands, device=tokens.device)
            tokens = tokens + self.fourier(features.to(tokens.dtype))
        if self.pos is not None:
            tokens = tokens + self.position_table(grid, x)
        if self.type_embed is not None:
            tokens = tokens + self.type_embed
        return tokens

    def position_table(self, grid: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        """The table for `grid`: the configured one, a fixed sin-cos table rebuilt (in the input's dtype), or the
        learned table resampled."""
        if tuple(grid) == self.grid:
            return self.pos
        if self.pos_kind == "sincos":
            return sincos_pos_embed(self.dim, grid).to(x)
        return resample_pos_embed(self.pos, self.grid, grid)

    def forward(self, x: torch.Tensor | None, present: torch.Tensor | None, batch: int) -> torch.Tensor:
        return self.tokens(self.inputs(x, present, batch))


def sincos_pos_embed(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table (get_2d_sincos_pos_embed), 1 x (h * w) x dim, in its exact layout so
    official weights see the positions they were trained with."""
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="xy")
    parts = [f(c.reshape(-1, 1) * omega) for c in (gw, gh) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float().unsqueeze(0)


def fourier_features(grid: Sequence[int], max_freqs: Sequence[float], num_bands: int,
                     device: torch.device | None = None) -> torch.Tensor:
    """Perceiver's Fourier position features: per axis, the position in [-1, 1] and sin/cos(pi f pos) for
    num_bands frequencies f from 1 to the configured axis' Nyquist frequency. prod(grid) x A(2 num_bands + 1)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # N x A
    freqs = torch.stack([torch.linspace(1.0, max(m / 2, 1.0), num_bands, device=device) for m in max_freqs])
    angles = math.pi * pos[..., None] * freqs  # N x A x bands
    return torch.cat([pos, angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)


# -- other names of the input modules' tensors ------------------------------------------------------------------
# (pattern on a key's tail, replacement): the names of the same tensors in the suite's checkpoints written before
# the backbones shared InputEmbed, in MBT's and Swin's timm-style streams and in the official CAV-MAE layout.
_NEW = r"(?!(?:patch|frontend|fourier)\.|pos$|type_embed$)"  # what follows `{m}_embed.` in InputEmbed's own names
INPUT_KEYS: tuple[tuple[str, str], ...] = (
    (r"(audio|video)_embed\." + _NEW, r"\1_embed.patch."),  # Zorro-ViT's PatchEmbed, Zorro-HiP's ConvStem
    (r"(audio|video)_pos$", r"\1_embed.pos"),  # Zorro-ViT, Zorro-HiP
    (r"(audio|video)_fourier\.", r"\1_embed.fourier."),  # Zorro-HiP
    (r"(audio|video)_frontend\.", r"\1_embed.frontend."),  # the front ends' saved buffers (torchaudio's)
    (r"(audio|video)\.patch_embed\.", r"\1_embed.patch."),  # MBT's and Zorro-Swin's streams (timm names)
    (r"(audio|video)\.pos_embed$", r"\1_embed.pos"),  # MBT
    (r"patch_embed_a\.", "audio_embed.patch."), (r"patch_embed_v\.", "video_embed.patch."),  # CAV-MAE (official)
    (r"pos_embed_a$", "audio_embed.pos"), (r"pos_embed_v$", "video_embed.pos"),
    (r"modality_a$", "audio_embed.type_embed"), (r"modality_v$", "video_embed.type_embed"),
)
_INPUT_KEYS = [(re.compile(p), r) for p, r in INPUT_KEYS]


def input_module_key(key: str) -> str:
    """A key naming an input module's tensor in an older or official layout -> InputEmbed's name for it; any other
    key unchanged. The layouts' names may follow a prefix (`backbone.` in a task's state dict)."""
    starts = [0] + [i + 1 for i, c in enumerate(key) if c == "."]
    for start in starts:
        tail = key[start:]
        for pattern, new in _INPUT_KEYS:
            m = pattern.match(tail)
            if m:
                return key[:start] + m.expand(new) + tail[m.end():]
    return key
