"""Zorro-HiP (Recasens et al. 2023, section 3.2, appendix A) on the Hierarchical Perceiver (HiP, Carreira et al. 2022).

audio -> log-mel -> conv stem -> + Fourier + learned positions ─ block 0 ─ block 1 ─ ... ─ block n ─┐ audio latents
video -> frames  -> conv stem -> + Fourier + learned positions ─ block 0 ─ block 1 ─ ... ─ block n ─┤ video latents
fusion: 6 learned embeddings (the fusion stream skips block 0) ───────── block 1 ─ ... ─ block n ─┘ fusion latents
    -> OutputDecoder: 4 learned queries -> {"audio", "video", "fusion", "global"} (B x output_dim each)

One set of HiP blocks serves the three streams (appendix A: "the three HiP models are sharing the same weights
and architecture"). A block (HiP's PerceiverBlock) splits its input into G groups; per group, L learned latents
cross-attend to the group's tokens, then self-attention layers run on the latents; its output is the G x L latents.

How we read the appendix where it is ambiguous:
- "After the three blocks are processed, we concatenate all of them together in order to create the input for
  the next level of the fusion stream, which splits the input in groups and cross attend to them all together":
  block i's fusion input is block i-1's audio, fusion and video outputs. Each stream's latents are split into
  G_i groups (HiP's reshape regrouping) and fusion group g reads [audio_g | fusion_g | video_g]. Concatenating
  first and splitting after would give the early levels single-modality groups (with G = 4, group 0 would
  hold only audio), which is not fusion. Who reads whom is the routing table (routing.py, masking "zorro"):
  audio and video latents read only their own stream, fusion latents read all three.
- Shared weights include the learned latent queries, so all streams' latents have the same shape per level.
- "we skip the initial block of HiP for the fusion latents as these operations would only be applied to learned
  embeddings": the fusion stream starts from learned embeddings of block 0's output width C_0 that stand in for
  block 0's output. Their count is lost in the appendix; we take n_fusion = 6, which the paper finds best "in
  all models". From block 1 on, the fusion latents have the unimodal latents' shape (shared queries). With
  the decoder, the fusion stream gets no U-Net skip from block 0, which it never ran.
- HiP-16's last three blocks are its decoder (groups back up to 16, U-Net skips), built for MAE reconstruction.
  `decoder=False` (our default, a choice) keeps blocks 0..3 (encoder + processor): HiP's own classification
  template reads labels out of the processor block, whose 64 x 1024 latents are the widest and most global;
  `decoder=True` builds all seven blocks as the appendix lists them, with HiP's U-Net skips.

No public ImageNet (or other) HiP weights exist in timm, so there is no `load_pretrained`; it trains from scratch
as in the paper's Table 1 / 3.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from .base import AVBackbone
from .embedding import InputEmbed
from .frontends import AudioFrontend, VideoFrontend
from .layers import CrossAttention, OutputDecoder, PatchGrid, concat_groups
from .routing import GROUPS, Routing, TokenLayout
from .variants import variant


class SquaredReLU(nn.Module):
    """relu(x)^2, HiP's default MLP activation ('sq_relu')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


ACTIVATIONS = {"sq_relu": SquaredReLU, "gelu": nn.GELU}


# -- input side ------------------------------------------------------------------------------------------------
class ConvStem(PatchGrid, nn.Module):
    """Patches from a small conv net (appendix A, after Touvron et al. 2022's hMLP stem): (conv + LayerNorm + GELU)
    for every stride but the last, then (conv + LayerNorm). Kernel = stride, so a token is a non-overlapping
    prod(strides)^2 patch, like a ViT patch but embedded in stages. B x C x H x W -> B x (H/p * W/p) x dim."""

    def __init__(self, *, in_chans: int, dim: int, hidden_dim: int, strides: Sequence[int] = (4, 2, 2)):
        super().__init__()
        self.patch_size = math.prod(strides)
        chans = [in_chans] + [hidden_dim] * (len(strides) - 1)
        self.hidden = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=s, stride=s), LayerNorm2d(hidden_dim), nn.GELU())
            for c, s in zip(chans[:-1], strides[:-1])))
        self.proj = nn.Conv2d(chans[-1], dim, kernel_size=strides[-1], stride=strides[-1])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(*x.shape[-2:])
        return self.norm(self.proj(self.hidden(x)).flatten(2).transpose(1, 2))


def init_hip_weights(m: nn.Module) -> None:
    """HiP's initialisation (haiku VarianceScaling(1.0)): linear weights from a normal truncated at 2 std with
    variance 1 / fan_in, zero biases. ViT's fixed std 0.02 would not do here: every block's output is its learned
    queries plus an attention term, and with 0.02-std projections that input-dependent term shrinks ~10x per
    block in narrow (128-d) blocks until the outputs no longer depend on the input (the tiny model then cannot
    fit 4 samples)."""
    if isinstance(m, nn.Linear):
        std = m.in_features ** -0.5 / 0.87962566  # the truncation's variance loss, as haiku corrects it
        nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# -- the HiP block ---------------------------------------------------------------------------------------------
def group_tokens(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """B x N x C -> B x G x ceil(N/G) x C in sequence order (HiP's 'reshape' regrouping), and a G x ceil(N/G)
    validity mask when N is not a multiple of G (then the groups differ by at most one token; None otherwise)."""
    B, N, C = x.shape
    if N < num_groups:
        raise ValueError(f"{N} tokens cannot be split into {num_groups} groups")
    if N % num_groups == 0:
        return x.view(B, num_groups, N // num_groups, C), None
    size = -(-N // num_groups)
    bounds = torch.div(torch.arange(num_groups + 1, device=x.device) * N, num_groups, rounding_mode="floor")
    offset = torch.arange(size, device=x.device)
    valid = offset < (bounds[1:] - bounds[:-1])[:, None]  # G x size
    index = (bounds[:-1, None] + offset).clamp(max=N - 1)
    return x[:, index.flatten()].view(B, num_groups, size, C), valid


class LatentCrossAttention(CrossAttention):
    """HiP's cross-attention: learned latents (queries) read a group's tokens, then an MLP.

    As in HiP's HiPCrossAttention, queries and keys use the input width (qk_channels = input channels), the
    output has the latent width, and the queries are added back after attention (post-attention residual).
    """

    def __init__(self, *, in_dim: int, dim: int, num_heads: int = 1, mlp_ratio: float = 1.0,
                 act_layer: type[nn.Module] = SquaredReLU):
        super().__init__(dim=dim, num_heads=num_heads, context_dim=in_dim, attn_dim=in_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """queries: b x G x L x dim (b = 1 or B); k, v: (B G) x heads x n x d -> B x G x L x dim."""
        G, L = queries.shape[1:3]
        B = k.shape[0] // G
        q = self.query_heads(queries).expand(B, -1, -1, -1, -1).flatten(0, 1)  # (B G) x heads x L x d
        x = self.attend(q, k, v, mask).view(B, G, L, -1) + queries  # one dense call: (B G) is the batch
        return x + self.mlp(self.norm_mlp(x))


class HiPBlock(nn.Module):
    """One HiP level (HiP's PerceiverBlock), applied to every stream with the same weights.

    forward({stream: B x N_s x C_in}) -> {stream: B x (G L) x dim} for the streams given. Stream s's latents read
    the tokens of the streams `routing.reads[s]` (zorro: fusion reads all three, audio / video only
    themselves), group by group. Cross-attention is one call per stream (their key lengths differ); the
    self-attention layers run on the latents of all streams stacked on the batch axis, one call per layer.
    """

    def __init__(self, *, in_dim: int, dim: int, num_groups: int, num_latents: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, cross_heads: int = 1, cross_mlp_ratio: float = 1.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = SquaredReLU, skip_dim: int | None = None):
        super().__init__()
        self.num_groups, self.num_latents, self.dim = num_groups, num_latents, dim
        self.latents = nn.Parameter(torch.zeros(num_groups, num_latents, dim))  # learned queries, per group
        self.cross = LatentCrossAttention(in_dim=in_dim, dim=dim, num_heads=cross_heads, mlp_ratio=cross_mlp_ratio,
                                          act_layer=act_layer)
        # HiP's U-Net skip (decoder blocks): the mirrored encoder block's output is added to the queries.
        self.skip_proj = None
        if skip_dim is not None:
            self.skip_proj = nn.Linear(skip_dim, dim) if skip_dim != dim else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
                  act_layer=act_layer, norm_layer=nn.LayerNorm)
            for _ in range(depth))

    def forward(self, x: dict[str, torch.Tensor], routing: Routing,
                skip: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        streams = [g for g in GROUPS if g in x]
        G, L = self.num_groups, self.num_latents
        B = x[streams[0]].shape[0]
        # Keys: every stream split into G groups, laid side by side within a group: [audio_g | fusion_g | video_g].
        # Keys and values are computed once and sliced per reader: the fusion latents reuse the audio/video ones.
        grouped = {s: group_tokens(x[s], G) for s in streams}
        layout = TokenLayout.of(**{s: t.shape[2] for s, (t, _) in grouped.items()})
        k, v = self.cross.keys_values(torch.cat([t for t, _ in grouped.values()], dim=2).flatten(0, 1))
        mask = None
        if any(m is not None for _, m in grouped.values()):  # only for inputs that do not split evenly
            mask = torch.cat([m if m is not None else torch.ones(G, t.shape[2], dtype=torch.bool, device=t.device)
                              for t, m in grouped.values()], dim=1)
            mask = mask.expand(B, -1, -1).reshape(B * G, 1, 1, -1)
        latents = []
        for s in streams:
            queries = self.latents.unsqueeze(0)
            if skip is not None and s in skip:
                queries = queries + self.skip_proj(skip[s]).view(B, G, L, self.dim)
            ks, ke = layout.key_span(routing.reads[s])
            latents.append(self.cross(queries, k[:, :, ks:ke], v[:, :, ks:ke],
                                      None if mask is None else mask[..., ks:ke]))
        z = torch.cat(latents).flatten(0, 1)  # (S B G) x L x dim: shared weights, so one batch for all streams
        for block in self.blocks:
            z = block(z)
        return {s: z_s.reshape(B, G * L, self.dim) for s, z_s in zip(streams, z.chunk(len(streams)))}


# -- the model -------------------------------------------------------------------------------------------------
class ZorroHiP(AVBackbone):
    """Zorro-HiP. Defaults: the official HiP-16 variant (NUMBERS.md, "Zorro-HiP"), encoder + processor half, with
    28 self-attention layers in block 2 (HiP-16: 18) so that the model has the paper's 136M parameters (choice).

    Args (all keyword-only):
        num_groups, depths, num_latents, dims, num_heads: per HiP block, groups, self-attention layers, latents
            per group, channels and self-attention heads (HiP-16: the appendix's values).
        mlp_ratio: self-attention widening factor (HiP-16's 4). cross_heads, cross_mlp_ratio: HiP-16's 1 and 1.
        decoder: build HiP's decoder half (the blocks after the middle one, with U-Net skips); False keeps the
            encoder + processor, see the module docstring.
        activation: MLP activation, "sq_relu" (HiP) or "gelu".
        drop_path_rate: HiP's stochastic depth, the same rate in every self-attention layer.
        embed_dim, stem_dim, audio_strides, video_strides: the conv stems (appendix A; widths and strides lost).
        fourier_bands: Fourier position feature bands per axis; projected to embed_dim and added, then the
            learned position embedding is added (both, as the paper says, to stay close to the other variants).
        num_fusion: learned embeddings the fusion stream starts from (width dims[0]; it skips block 0).
        masking: "zorro" or "two_streams" (no fusion stream). fusion_level: 0 only.
        grad_checkpointing: recompute each HiP block's activations in the backward pass.
    """

    maskings: tuple[str, ...] = ("zorro", "two_streams")

    def __init__(self, *, num_groups: Sequence[int] = (16, 4, 1, 1, 1, 4, 16),
                 depths: Sequence[int] = (2, 2, 28, 2, 1, 1, 1),
                 num_latents: Sequence[int] = (128, 256, 256, 64, 256, 256, 128),
                 dims: Sequence[int] = (128, 256, 512, 1024, 512, 256, 128),
                 num_heads: Sequence[int] = (4, 8, 16, 32, 16, 8, 4), mlp_ratio: float = 4.0, cross_heads: int = 1,
                 cross_mlp_ratio: float = 1.0, decoder: bool = False, activation: str = "sq_relu",
                 qkv_bias: bool = True, drop_path_rate: float = 0.1, embed_dim: int = 256, stem_dim: int = 64,
                 audio_strides: Sequence[int] = (2, 2, 2), video_strides: Sequence[int] = (4, 2, 2),
                 fourier_bands: int = 16, num_fusion: int = 6, masking: str = "zorro", fusion_level: int = 0,
                 num_frames: int = 8, image_size: int = 224, sample_rate: int = 48_000, n_mels: int = 128,
                 audio_seconds: float = 2.56, spec_augment: bool = True, window: str = "hann",
                 win_ms: float = 25.0, hop_ms: float = 10.0, freq_mask: int | None = None, time_mask: int | None = None,
                 num_masks: int = 2, freq_jitter: int = 4, grad_checkpointing: bool = False):
        super().__init__()
        self.set_routing(masking, fusion_level=fusion_level)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        spec = [tuple(num_groups), tuple(depths), tuple(num_latents), tuple(dims), tuple(num_heads)]
        if len({len(s) for s in spec}) != 1:
            raise ValueError("num_groups, depths, num_latents, dims and num_heads need one entry per HiP block")
        num_groups, depths, num_latents, dims, num_heads = spec
        if decoder and len(dims) % 2 == 0:
            raise ValueError("HiP's decoder needs an odd number of blocks (encoders, a processor, decoders)")
        self.grad_checkpointing = grad_checkpointing
        self.decoder_blocks = decoder
        n = len(dims) if decoder else len(dims) // 2 + 1
        self.output_dim = dims[n - 1]

        spectrogram = dict(window=window, win_ms=win_ms, hop_ms=hop_ms, freq_mask=freq_mask, time_mask=time_mask,
                           num_masks=num_masks, freq_jitter=freq_jitter)  # the model config's (conf/model/*.yaml)
        audio_frontend = AudioFrontend(sample_rate=sample_rate, n_mels=n_mels, spec_augment=spec_augment,
                                       clip_seconds=audio_seconds, **spectrogram)
        audio_stem = ConvStem(in_chans=1, dim=embed_dim, hidden_dim=stem_dim, strides=tuple(audio_strides))
        video_stem = ConvStem(in_chans=3, dim=embed_dim, hidden_dim=stem_dim, strides=tuple(video_strides))
        audio_frames = audio_frontend.num_frames(round(audio_seconds * sample_rate))
        audio_frames -= audio_frames % audio_stem.patch_size
        audio_grid = audio_stem.grid(n_mels, audio_frames)
        video_grid = (num_frames, *video_stem.grid(image_size, image_size))
        audio_fourier = nn.Linear(2 * (2 * fourier_bands + 1), embed_dim, bias=False)
        video_fourier = nn.Linear(3 * (2 * fourier_bands + 1), embed_dim, bias=False)
        pa = audio_stem.patch_size
        self.audio_embed = InputEmbed(frontend=audio_frontend, patch=audio_stem, grid=audio_grid, dim=embed_dim,
                                      input_shape=(1, audio_grid[0] * pa, audio_grid[1] * pa), pos="learned",
                                      time_axis=1, fourier=audio_fourier, fourier_bands=fourier_bands, trim=pa)
        self.video_embed = InputEmbed(frontend=VideoFrontend(), patch=video_stem, grid=video_grid, dim=embed_dim,
                                      input_shape=(num_frames, 3, image_size, image_size), pos="learned",
                                      time_axis=0, fourier=video_fourier, fourier_bands=fourier_bands)
        # The fusion stream's stand-in for block 0's output (it skips block 0); at least as many as block 1's groups.
        self.fusion_latents = nn.Parameter(torch.zeros(1, num_fusion, dims[0])) if self.routing.has_fusion else None

        act = ACTIVATIONS[activation]
        middle = len(dims) // 2
        self.skips = [len(dims) - 1 - i if i > middle else None for i in range(n)]  # U-Net: decoder i <- n-1-i
        blocks = []
        for i, skip in enumerate(self.skips):
            if skip is not None and num_groups[skip] * num_latents[skip] != num_groups[i] * num_latents[i]:
                raise ValueError(f"U-Net skip {skip} -> {i} needs equal latent counts (groups x latents)")
            blocks.append(HiPBlock(in_dim=embed_dim if i == 0 else dims[i - 1], dim=dims[i], num_groups=num_groups[i],
                                   num_latents=num_latents[i], depth=depths[i], num_heads=num_heads[i],
                                   mlp_ratio=mlp_ratio, cross_heads=cross_heads, cross_mlp_ratio=cross_mlp_ratio,
                                   qkv_bias=qkv_bias, drop_path=drop_path_rate, act_layer=act,
                                   skip_dim=None if skip is None else dims[skip]))
        self.blocks = nn.ModuleList(blocks)
        self.decoder = OutputDecoder(dim=self.output_dim, num_heads=num_heads[n - 1], mlp_ratio=mlp_ratio,
                                     names=self.output_names)
        self.apply(init_hip_weights)
        for p in (self.audio_embed.pos, self.video_embed.pos, self.fusion_latents, *(b.latents for b in self.blocks)):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None, *,
                has_audio: torch.Tensor | None = None,
                has_video: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """audio: B x S waveform (int16/float); video: B x T x 3 x H x W (uint8/float in [0, 255]).

        has_audio / has_video (B bool): per-sample presence; absent samples get a zero input.
        Returns {output name: B x output_dim}.
        """
        batch = self.batch_size(audio, video)
        x = {"audio": self.audio_embed(audio, has_audio, batch), "video": self.video_embed(video, has_video, batch)}
        hidden = []
        for i, (block, skip) in enumerate(zip(self.blocks, self.skips)):
            skip_x = None if skip is None else {s: t for s, t in hidden[skip].items() if skip or s != "fusion"}
            x = self.checkpointed(block, x, self.routing, skip_x)
            if i == 0 and self.fusion_latents is not None:  # the fusion stream skips block 0
                x["fusion"] = self.fusion_latents.expand(batch, -1, -1)
            hidden.append(x)
        return self.decoder(*concat_groups(x))

    def no_weight_decay(self) -> set[str]:
        names = {"audio_embed.pos", "video_embed.pos", "decoder.queries",
                 *(f"blocks.{i}.latents" for i in range(len(self.blocks)))}
        return names | ({"fusion_latents"} if self.fusion_latents is not None else set())


# -- named variants (timm-style factories): each builds the model its conf/model/ YAML builds, whose comments give the
# sources; tests/models/test_model_configs.py holds them equal. The SpecAugment sizes are the YAML's numbers.
@variant(ZorroHiP, freq_mask=24, time_mask=24)
def zorro_hip_base(**kwargs) -> ZorroHiP:
    """Zorro-HiP with HiP-16 (encoder + processor blocks; 28 layers in block 2: the paper's 136M), 8 x 224^2 frames
    and 2.56 s of 48 kHz audio."""


@variant(zorro_hip_base, num_groups=(4, 2, 1, 2, 4), depths=(1, 1, 2, 1, 1), num_latents=(8, 8, 8, 8, 8),
         dims=(32, 48, 64, 64, 32), num_heads=(2, 4, 4, 4, 2), drop_path_rate=0.0, embed_dim=32, stem_dim=16,
         num_frames=4, image_size=64, sample_rate=16_000, n_mels=64, audio_seconds=1.28, freq_mask=12, time_mask=12)
def zorro_hip_tiny(**kwargs) -> ZorroHiP:
    """A CPU-sized variant for tests and demos: five small blocks (three without the decoder), the inputs of
    zorro_vit_tiny (4 x 64^2 frames, 1.28 s of 16 kHz audio)."""
