"""CAV-MAE: Contrastive Audio-Visual Masked Autoencoder (Gong et al. 2023, section 2.3), a baseline.

audio waveform -> kaldi fbank (128 x 1024) -> 16x16 patches (8 x 64) + sin-cos positions + E_a ─┐
one video frame (224^2)                  -> 16x16 patches (14 x 14) + sin-cos positions + E_v ─┤
    -> mask 75% of each modality's tokens (pre-training only; eqs. 2-3)                            │
    -> 11 audio layers E_a(.) | 11 video layers E_v(.)                                             │
    -> the joint layer E_j, three passes with shared attention/MLP and per-stream LayerNorms:     │
       audio alone -> c_a (eq. 4), video alone -> c_v (eq. 5), [audio; video] -> x (eq. 6)  <──────┘
pre-training: x + mask tokens -> 8-layer 512-d decoder -> patches (eqs. 8-9); c_a, c_v -> contrastive (eq. 7)
fine-tuning:  head="per_output": {"audio": mean(c_a), "video": mean(c_v), "global": mean(x)}, one task head each;
              head="official" (the official CAVMAEFT): {"global": LayerNorm(mean(x))}, the task's one Linear on it.

Module names follow the official code (github.com/yuangongnd/cav-mae: `blocks_a`, `blocks_u`, `norm_a`, ...),
so its released checkpoints (pre-trained and fine-tuned) load by name (`load_pretrained`, `load_official`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from .base import AVBackbone
from .embedding import InputEmbed, sincos_pos_embed
from .frontends import KaldiFbank, VideoFrontend
from .layers import PatchEmbed
from .pretrained import LoadReport, Unused, is_cav_mae_layout, load_into, load_state, to_model_keys, vit_into_cav_mae
from .variants import variant

MASK_MODES = ("random", "time", "freq", "tf")  # random: the paper's default ("unstructured"); the rest audio only
HEADS = ("per_output", "official")
# The official fine-tuning head's Linear (CAVMAEFT.mlp_head = LayerNorm + Linear): the task's "global" head.
OFFICIAL_CLASSIFIER = ("mlp_head.1.weight", "mlp_head.1.bias")


class JointBlock(Block):
    """E_j: timm's ViT block whose attention and MLP serve three streams, each with its own LayerNorms
    (LN1/LN2 of eqs. 4-6): `norm1/norm2` for the joint sequence, `norm1_a/norm2_a` audio, `norm1_v/norm2_v` video."""

    def __init__(self, *, dim: int, norm_layer=nn.LayerNorm, **kwargs):
        super().__init__(dim=dim, norm_layer=norm_layer, **kwargs)
        self.norm1_a, self.norm2_a = norm_layer(dim), norm_layer(dim)
        self.norm1_v, self.norm2_v = norm_layer(dim), norm_layer(dim)

    def forward(self, x: torch.Tensor, stream: str = "joint") -> torch.Tensor:
        norm1, norm2 = {"joint": (self.norm1, self.norm2), "audio": (self.norm1_a, self.norm2_a),
                        "video": (self.norm1_v, self.norm2_v)}[stream]
        x = x + self.drop_path1(self.ls1(self.attn(norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(norm2(x))))


class CAVMAE(AVBackbone):
    """CAV-MAE. Defaults are the paper's model: ViT-B width, 11 + 1 encoder layers, 8-layer 512-d decoder
    (encoder ~164M and decoder ~27M parameters, section 2.3.1), 10 s of 16 kHz audio, one 224^2 frame.

    Args (all keyword-only):
        modality_depth, joint_depth: layers of E_a / E_v each, and of E_j (paper: 11 and 1).
        decoder_dim, decoder_depth, decoder_heads: the joint decoder D_j (paper: 512, 8, 16, as image MAE).
            decoder_depth=0 builds the encoder only: the fine-tuning model ("we discard the decoder").
        norm_pix_loss: reconstruction targets are per-patch normalised patches (eq. 9: norm(a), norm(v)).
        num_frames, image_size: the frames the data provides per clip (CAV-MAE: 1 per training step). With
            T > 1 frames, `forward` encodes each frame and averages the pooled outputs over frames.
        sample_rate, n_mels, audio_seconds, audio_frames: audio input; the fbank is padded/cut to
            audio_frames (1024 x 10 ms for 10 s, as the official code).
        spec_augment, freq_mask, time_mask: SpecAugment in `forward` while training (fine-tuning only; the
            official fine-tuning uses one mask of <= 48 bins and one of <= 192 frames). As the official data
            loader, the bands are set to 0 in the raw log-mel, before normalisation (0 -> (0 - mean) / std).
        audio_noise: the official training-time audio augmentation (pre-training and fine-tuning): uniform
            noise of amplitude U(0, 0.1) and a random circular time shift of the normalised fbank.
        grad_checkpointing: recompute block activations in the backward pass (less memory, ~30% more compute).
        head: "per_output" (the suite's protocol: outputs audio, video and global, one task head each, predictions
            averaged) or "official" (the official fine-tuning model CAVMAEFT: one output, "global" =
            `head_norm`(mean of the joint tokens), on which the task's one Linear head sits; `head_norm` and that
            Linear are the official `mlp_head`). The official model answers a clip without video as its
            `missingaudioonly` mode: the audio tokens alone through E_j twice, with the joint and with the audio
            LayerNorms, the two pooled outputs averaged (`missingvideoonly` likewise), so the A and V readings of
            Table 3 are that one head on those outputs (protocol.own_head falls back to the average of the heads,
            here the one head).
        trainable_pos: the position tables are learned parameters, initialised to the sin-cos tables (the official
            fine-tuning model, tr_pos=True); False: fixed buffers (official pre-training, tr_pos=False).
    """

    def __init__(self, *, dim: int = 768, modality_depth: int = 11, joint_depth: int = 1, num_heads: int = 12,
                 mlp_ratio: float = 4.0, patch_size: int = 16, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 num_frames: int = 1, image_size: int = 224, sample_rate: int = 16_000, n_mels: int = 128,
                 audio_seconds: float = 10.0, audio_frames: int = 1024, spec_augment: bool = False,
                 freq_mask: int = 48, time_mask: int = 192, audio_noise: bool = True, grad_checkpointing: bool = False,
                 head: str = "per_output", trainable_pos: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.head, self.trainable_pos = head, trainable_pos
        self.patch_size, self.norm_pix_loss, self.num_frames = patch_size, norm_pix_loss, num_frames
        self.grad_checkpointing = grad_checkpointing
        self.audio_seconds = audio_seconds
        self.output_dim = dim
        self.output_names = ("audio", "video", "global") if head == "per_output" else ("global",)

        audio_patch = PatchEmbed(in_chans=1, dim=dim, patch_size=patch_size)
        video_patch = PatchEmbed(in_chans=3, dim=dim, patch_size=patch_size)
        audio_grid = audio_patch.grid(n_mels, audio_frames)  # (frequency, time): 8 x 64
        video_grid = video_patch.grid(image_size, image_size)  # 14 x 14
        # Positions: 2-D sin-cos tables, fixed (official tr_pos=False) or learned from them (tr_pos=True), with no
        # time axis to resample on load: the fbank is always padded or cut to audio_frames. type_embed: E_a, E_v.
        pos = "sincos_learned" if trainable_pos else "sincos"
        self.audio_embed = InputEmbed(
            frontend=KaldiFbank(sample_rate=sample_rate, n_mels=n_mels, frames=audio_frames, spec_augment=spec_augment,
                                freq_mask=freq_mask, time_mask=time_mask, noise=audio_noise),
            patch=audio_patch, grid=audio_grid, dim=dim, input_shape=(1, n_mels, audio_frames), pos=pos,
            type_embed=True)
        self.video_embed = InputEmbed(frontend=VideoFrontend(), patch=video_patch, grid=video_grid, dim=dim,
                                      input_shape=(num_frames, 3, image_size, image_size), pos=pos, type_embed=True)

        depth = modality_depth + joint_depth
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        block = dict(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=nn.LayerNorm)
        self.blocks_a = nn.ModuleList(Block(**block, drop_path=dpr[i]) for i in range(modality_depth))
        self.blocks_v = nn.ModuleList(Block(**block, drop_path=dpr[i]) for i in range(modality_depth))
        self.blocks_u = nn.ModuleList(JointBlock(**block, drop_path=dpr[modality_depth + i])
                                      for i in range(joint_depth))
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        if head == "official":
            self.head_norm = nn.LayerNorm(dim)  # official mlp_head[0]

        self.has_decoder = decoder_depth > 0
        if self.has_decoder:
            self.decoder_embed = nn.Linear(dim, decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, decoder_dim))  # E'_a, E'_v (eq. 8)
            self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            for name, grid in (("decoder_pos_embed_a", audio_grid), ("decoder_pos_embed_v", video_grid)):
                self.register_buffer(name, sincos_pos_embed(decoder_dim, grid), persistent=False)
            self.decoder_blocks = nn.ModuleList(
                Block(dim=decoder_dim, num_heads=decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      norm_layer=nn.LayerNorm) for _ in range(decoder_depth))
            self.decoder_norm = nn.LayerNorm(decoder_dim)
            # D_j shares every weight between modalities except these last projections (section 2.3)
            self.decoder_pred_a = nn.Linear(decoder_dim, patch_size**2)
            self.decoder_pred_v = nn.Linear(decoder_dim, patch_size**2 * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation (as the official code): xavier-uniform linears and patch kernels, N(0, 0.02) tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for embed in (self.audio_embed, self.video_embed):
            kernel = embed.patch.proj.weight
            nn.init.xavier_uniform_(kernel.view(kernel.shape[0], -1))
        for p in (self.audio_embed.type_embed, self.video_embed.type_embed,
                  *(getattr(self, n, None) for n in ("mask_token", "decoder_modality_a", "decoder_modality_v"))):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    # -- encoders -------------------------------------------------------------------------------------------
    def encode_audio(self, spec: torch.Tensor, mask_ratio: float = 0.0, mask_mode: str = "random"):
        """Eq. 2 and E_a: (tokens after the audio layers, mask B x L (1 = hidden), ids_restore)."""
        x = self.audio_embed.tokens(spec)
        noise = structured_noise(x.shape[0], self.audio_embed.grid, mask_ratio, mask_mode, x.device)
        x, mask, restore = random_masking(x, mask_ratio, noise)
        for blk in self.blocks_a:
            x = self.checkpointed(blk, x)
        return x, mask, restore

    def encode_video(self, frames: torch.Tensor, mask_ratio: float = 0.0):
        """Eq. 3 and E_v on frames N x 3 x H x W."""
        x = self.video_embed.tokens(frames)
        x, mask, restore = random_masking(x, mask_ratio)
        for blk in self.blocks_v:
            x = self.checkpointed(blk, x)
        return x, mask, restore

    def joint(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """E_j and the stream's final LayerNorm (eqs. 4-6), before pooling."""
        for blk in self.blocks_u:
            x = self.checkpointed(blk, x, stream)
        return {"joint": self.norm, "audio": self.norm_a, "video": self.norm_v}[stream](x)

    # -- fine-tuning / evaluation: the backbone contract ------------------------------------------------------
    def forward(self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None, *,
                has_audio: torch.Tensor | None = None, has_video: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean-pooled outputs of E_j on audio alone, video alone and [audio; video] (no masking).

        With T > 1 frames each frame is its own pass (the audio stream runs once) and the outputs are
        averaged over frames; the paper averages predictions of single-frame views, which the data's
        evaluation views give exactly (several views per clip key, one frame each).
        """
        batch = self.batch_size(audio, video)
        a, _, _ = self.encode_audio(self.audio_embed.inputs(audio, has_audio, batch))
        frames = self.video_embed.inputs(video, has_video, batch)
        T = frames.shape[1]
        v, _, _ = self.encode_video(frames.flatten(0, 1))

        def pooled_over_frames(x: torch.Tensor) -> torch.Tensor:  # (B*T) x N x D -> B x D
            return x.mean(1).view(batch, T, -1).mean(1)

        if self.head == "official":
            return {"global": self.head_norm(self.official_pooled(a, v, pooled_over_frames, *self.presence(
                audio, video, has_audio, has_video, batch)))}
        return {"audio": self.joint(a, "audio").mean(1),
                "video": pooled_over_frames(self.joint(v, "video")),
                "global": pooled_over_frames(self.joint(torch.cat([a.repeat_interleave(T, 0), v], dim=1), "joint"))}

    @staticmethod
    def presence(audio, video, has_audio, has_video, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(has_audio, has_video) B bool: the flags, or whether the modality was passed at all."""
        ref = audio if audio is not None else video
        flags = []
        for x, has in ((audio, has_audio), (video, has_video)):
            flags.append(has.bool() if has is not None else torch.full((batch,), x is not None, device=ref.device))
        return flags[0], flags[1]

    def official_pooled(self, a: torch.Tensor, v: torch.Tensor, pooled_over_frames, has_audio: torch.Tensor,
                        has_video: torch.Tensor) -> torch.Tensor:
        """The official CAVMAEFT's pooled output before `mlp_head`, per sample by the modalities it has:
        both: mean(norm(E_j([a; v]))) ("multimodal"); audio only: (mean(norm(E_j(a))) + mean(norm_a(E_j(a)))) / 2
        ("missingaudioonly"); video only: the same with the video LayerNorms ("missingvideoonly"). Each mode is
        computed only for a batch that has a sample in it."""
        T = v.shape[0] // a.shape[0]
        both = has_audio & has_video
        out = None
        if both.any() or not (has_audio | has_video).any():
            out = pooled_over_frames(self.joint(torch.cat([a.repeat_interleave(T, 0), v], dim=1), "joint"))
        for alone, x, stream, pool in ((has_audio & ~has_video, a, "audio", lambda t: t.mean(1)),
                                       (has_video & ~has_audio, v, "video", pooled_over_frames)):
            if alone.any():
                missing = (pool(self.joint(x, "joint")) + pool(self.joint(x, stream))) / 2
                out = missing if out is None else torch.where(alone[:, None], missing, out)
        return out

    # -- pre-training ------------------------------------------------------------------------------------------
    def pretrain_forward(self, audio: torch.Tensor | None, video: torch.Tensor | None, *,
                         has_audio: torch.Tensor | None = None, has_video: torch.Tensor | None = None,
                         mask_ratio: float = 0.75, mask_mode: str = "random") -> dict[str, torch.Tensor]:
        """Masked encoding and reconstruction of one frame per clip (a random frame of T while training, the
        middle one in eval mode). Returns, with L_a / L_v the audio / video patch counts:

            audio, video:                   B x dim, mean-pooled c_a and c_v of the visible tokens (eq. 7)
            audio_pred, audio_target:       B x L_a x p*p (target: the normalised patches when norm_pix_loss)
            audio_mask:                     B x L_a, 1 where a patch was hidden from the encoder
            audio_patches:                  B x L_a x p*p, the input patches (for pictures)
            video_pred/target/mask/patches: the same for the frame, p*p*3 values per patch
        """
        if not self.has_decoder:
            raise RuntimeError("this CAV-MAE was built without a decoder (decoder_depth=0): it cannot pre-train")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        batch = self.batch_size(audio, video)
        spec = self.audio_embed.inputs(audio, has_audio, batch, spec_augment=False)
        frames = self.video_embed.inputs(video, has_video, batch)
        T = frames.shape[1]
        pick = torch.randint(T, (batch,), device=frames.device) if self.training else torch.full(
            (batch,), T // 2, device=frames.device)
        frame = frames[torch.arange(batch, device=frames.device), pick]

        a, mask_a, restore_a = self.encode_audio(spec, mask_ratio, mask_mode)
        v, mask_v, restore_v = self.encode_video(frame, mask_ratio)
        x = self.joint(torch.cat([a, v], dim=1), "joint")
        pred_a, pred_v = self.decode(x, a.shape[1], restore_a, restore_v, frame.shape[-2:])
        out = {"audio": self.joint(a, "audio").mean(1), "video": self.joint(v, "video").mean(1)}
        for name, image, pred, mask in (("audio", spec, pred_a, mask_a), ("video", frame, pred_v, mask_v)):
            patches = self.patchify(image)
            out.update({f"{name}_pred": pred, f"{name}_target": self.normalise_patches(patches),
                        f"{name}_mask": mask, f"{name}_patches": patches})
        return out

    def decode(self, x: torch.Tensor, num_audio: int, restore_a: torch.Tensor, restore_v: torch.Tensor,
               frame_hw) -> tuple[torch.Tensor, torch.Tensor]:
        """D_j (eq. 8): visible tokens + mask tokens at the hidden positions, + E' and positions -> patches."""
        x = self.decoder_embed(x)
        grid = self.video_embed.patch.grid(*frame_hw)
        pos_v = self.decoder_pos_embed_v if grid == self.video_embed.grid else sincos_pos_embed(
            x.shape[-1], grid).to(x)
        a = _unshuffle(x[:, :num_audio], self.mask_token, restore_a)
        a = a + self.decoder_pos_embed_a + self.decoder_modality_a
        v = _unshuffle(x[:, num_audio:], self.mask_token, restore_v) + pos_v + self.decoder_modality_v
        x = torch.cat([a, v], dim=1)
        for blk in self.decoder_blocks:
            x = self.checkpointed(blk, x)
        x = self.decoder_norm(x)
        return self.decoder_pred_a(x[:, : a.shape[1]]), self.decoder_pred_v(x[:, a.shape[1]:])

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> B x (H/p * W/p) x (p * p * C), patches in token order (the official layout)."""
        return rearrange(image, "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch_size, q=self.patch_size)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=self.patch_size,
                         q=self.patch_size)

    def normalise_patches(self, patches: torch.Tensor) -> torch.Tensor:
        if not self.norm_pix_loss:
            return patches
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()

    def no_weight_decay(self) -> set[str]:
        learned_pos = {"audio_embed.pos", "video_embed.pos"} if self.trainable_pos else set()
        return {"audio_embed.type_embed", "video_embed.type_embed", "mask_token", "decoder_modality_a",
                "decoder_modality_v", *learned_pos}

    def head_parameter_names(self) -> set[str]:
        """Parameters of the newly initialised fine-tuning head (the official `mlp_head[0]`), which the official
        fine-tuning trains with a larger LR (task.head_lr_scale) together with the task's heads."""
        return {"head_norm.weight", "head_norm.bias"} if self.head == "official" else set()

    # -- initialisation from image models and official checkpoints ------------------------------------------
    def load_pretrained(self, path: str | Path, *, heads: nn.ModuleDict | None = None) -> LoadReport:
        """Weights from a local file (`pretrained=`): an ImageNet MAE / timm ViT (converted as the official
        `adapt_vmae_weights.py`) or an official CAV-MAE release, pre-trained or fine-tuned (`load_official`)."""
        return self.load_official(load_state(path), heads=heads)

    def load_official(self, state: dict[str, torch.Tensor], *, heads: nn.ModuleDict | None = None) -> LoadReport:
        """Copy a state dict into this model and account for every key in the report.

        Image MAE / timm ViT: ViT layers 0..10 into both modality streams, layer 11 into E_j (its LayerNorms into
        all three streams), `norm` into norm / norm_a / norm_v, the RGB patch kernel summed for the 1-channel
        spectrogram, the MAE decoder as is (its first p*p output rows for audio).
        Official CAV-MAE (CAVMAE / CAVMAEFT, DataParallel `module.` keys): every tensor by name, `norm`, `norm_a`
        and `norm_v` each into its own LayerNorm; `mlp_head[0]` into `head_norm` (head="official") and the
        classifier `mlp_head[1]` into `heads["global"]` when given (the task's head; init_from passes it).
        Unused keys carry the reason: the decoder of a model built without one, fixed sin-cos tables (rebuilt;
        the report gives their distance to the file's), a head this model does not have."""
        official = is_cav_mae_layout(state)
        classifier = {k: state[k] for k in OFFICIAL_CLASSIFIER if k in state} if official else {}
        state = {k: v for k, v in state.items() if k not in classifier}
        state, rename = vit_into_cav_mae(state, num_modality_blocks=len(self.blocks_a), patch_size=self.patch_size)
        own = set(self.state_dict())

        def explained(key: str):
            dst = to_model_keys(rename(key))
            if not isinstance(dst, str) or dst in own:
                return dst
            if dst.startswith(("decoder_", "mask_token")) and not self.has_decoder:
                return Unused("the pre-training decoder: this model is built without one (decoder_depth=0; "
                              "fine-tuning discards it)")
            if dst in ("audio_embed.pos", "video_embed.pos", "decoder_pos_embed_a", "decoder_pos_embed_v"):
                return Unused(self._fixed_table_note(dst, state[key]))
            if re.fullmatch(r"(blocks_a|blocks_v|decoder_blocks)\.\d+\.norm[12]_[av]\.(weight|bias)", dst):
                return Unused("the official Block's per-stream LayerNorms, which its forward reads only in the "
                              "joint layer (blocks_u): unused in the modality and decoder layers there too")
            if dst.startswith("head_norm."):
                return Unused("the official fine-tuning head: this model has per-output heads (head=per_output)")
            return dst

        report = load_into(self, state, rename=explained, channels_to_one=("audio_embed.patch.proj.weight",))
        self._load_classifier(classifier, heads, report)
        return report

    def _fixed_table_note(self, name: str, value: torch.Tensor) -> str:
        built = dict(self.named_buffers()).get(name)  # the fixed tables are non-persistent buffers
        if built is None or built.shape != value.shape:
            return f"a position table for another grid {tuple(value.shape)}; this model's is fixed sin-cos"
        diff = (built.float() - value.float().to(built.device)).abs().max().item()
        if diff > 1e-5:
            return (f"a learned table {diff:.3g} away from the fixed sin-cos one: NOT used; build the model with "
                    "trainable_pos=true to load it")
        return f"fixed 2-D sin-cos table (tr_pos=False), rebuilt by the model: max |file - built| = {diff:.1e}"

    def _load_classifier(self, classifier: dict, heads: nn.ModuleDict | None, report: LoadReport) -> None:
        """The official classifier (mlp_head[1]) into the task's "global" head, or reported unused with why."""
        if not classifier:
            return
        target = heads["global"] if heads is not None and "global" in heads else None
        if self.head != "official":
            why = "the official fine-tuning classifier: this model has per-output heads (head=per_output)"
        elif target is None:
            why = "the official fine-tuning classifier: it goes into the task's head (init_from places it)"
        elif tuple(target.weight.shape) != tuple(classifier["mlp_head.1.weight"].shape):
            why = (f"the official fine-tuning classifier for {classifier['mlp_head.1.weight'].shape[0]} classes; "
                   f"the task's head has {target.weight.shape[0]}: trained from scratch")
        else:
            with torch.no_grad():
                for key, value in classifier.items():
                    param = getattr(target, key.rsplit(".", 1)[1])
                    param.copy_(value.to(param.dtype))
                    report.loaded.append(f"heads.global.{key.rsplit('.', 1)[1]}")
                    report.sources[report.loaded[-1]] = key
            return
        for key in classifier:
            report.unused(key, why)


# -- masking and positions -------------------------------------------------------------------------------
def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """MAE's per-sample masking: keep the int(L * (1 - ratio)) tokens with the smallest noise.
    Returns (kept tokens B x keep x D in shuffled order, mask B x L with 1 = hidden, ids_restore B x L)."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    if keep == L:  # no masking (fine-tuning, retrieval): keep the token order
        return x, x.new_zeros(B, L), torch.arange(L, device=x.device).expand(B, L)
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


def structured_noise(batch: int, grid: tuple[int, int], mask_ratio: float, mode: str, device) -> torch.Tensor | None:
    """Noise for `random_masking` that hides whole time columns / frequency rows of the (F x T) patch grid
    first (the official time / freq / tf modes; tf hides 0.7 x ratio of each); the rest of the budget is
    random. None for the default unstructured ("random") masking."""
    if mode == "random" or mask_ratio == 0:
        return None
    f, t = grid
    noise = torch.rand(batch, f, t, device=device)
    scale = 0.7 if mode == "tf" else 1.0

    def random_lines(n: int) -> torch.Tensor:  # B x n bool, int(n * ratio * scale) of them True
        picked = torch.rand(batch, n, device=device).argsort(1)[:, : int(n * mask_ratio * scale)]
        return torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, picked, True)

    if mode in ("time", "tf"):
        noise = noise.masked_fill(random_lines(t)[:, None, :], 1.1)  # > any U[0, 1) noise: hidden first
    if mode in ("freq", "tf"):
        noise = noise.masked_fill(random_lines(f)[:, :, None], 1.1)
    return noise.flatten(1)


def _unshuffle(kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    B, L = ids_restore.shape
    x = torch.cat([kept, mask_token.expand(B, L - kept.shape[1], -1)], dim=1)
    return x.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))


# -- named variants (timm-style factories): each builds the model its conf/model/ YAML builds, whose comments give the
# sources; tests/models/test_model_configs.py holds them equal. The class defaults are the paper's model.
@variant(CAVMAE)
def cav_mae_base(**kwargs) -> CAVMAE:
    """The paper's CAV-MAE: 11 + 1 ViT-B layers, 8 x 512-d decoder, 10 s of 16 kHz audio, one 224^2 frame."""


@variant(cav_mae_base, dim=64, modality_depth=2, joint_depth=1, num_heads=4, decoder_dim=32, decoder_depth=2,
         decoder_heads=4, image_size=64, n_mels=64, audio_seconds=1.28, audio_frames=128, freq_mask=24, time_mask=24)
def cav_mae_tiny(**kwargs) -> CAVMAE:
    """A CPU-sized CAV-MAE for tests and demos: 64-d, 2 + 1 layers, 2-layer 32-d decoder, 64 mel bins x 128
    frames (1.28 s of 16 kHz audio: 4 x 8 patches), 64^2 frames (4 x 4 patches)."""
