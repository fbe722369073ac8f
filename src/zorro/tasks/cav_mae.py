"""CAV-MAE pre-training (Gong et al. 2023, section 2.3): L = L_r + lambda_c * L_c.

L_r (eq. 9): mean squared error on the normalised patches of the masked tokens, audio and video each averaged
over their masked patches, then summed. L_c (eq. 7): NCE between the mean-pooled unimodal outputs of the joint
layer, c_a and c_v, with negatives from every device. Fine-tuning is `task=supervised` from the checkpoint
(`init_from=...`): the decoder is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..models.cav_mae import MASK_MODES
from .base import BaseTask, EvalResult, modality_flags
from .contrastive import ContrastiveTask, nce_loss, retrieval_recall
from .metrics import ClipPredictions

NORMALIZERS = ("video_to_audio", "symmetric")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Eq. 9 for one modality: per-patch MSE averaged over the masked patches of the samples that have it."""
    weight = mask * present[:, None].to(mask.dtype)
    per_patch = (pred.float() - target.float()).square().mean(-1)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1)


def cav_nce(z_audio: torch.Tensor, z_video: torch.Tensor, *, temperature: float,
            normalizer: str = "video_to_audio") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_c, matching accuracy) of L2-normalised paired embeddings.

    "video_to_audio" is eq. 7 and the official default: for each video, a softmax over the batch's audios.
    "symmetric" averages both directions (the official `bidirect_contrast` option; InfoNCE as in CLIP).
    """
    logits = z_video @ z_audio.t() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    accuracy = (logits.argmax(1) == target).float().mean()
    if normalizer == "video_to_audio":
        return F.cross_entropy(logits.float(), target), accuracy
    if normalizer == "symmetric":
        accuracy = (accuracy + (logits.argmax(0) == target).float().mean()) / 2
        return nce_loss(z_audio.float(), z_video.float(), temperature=temperature, normalizer="symmetric"), accuracy
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")


class CAVMAEPretrainTask(BaseTask):
    """Masked reconstruction + contrastive learning on a backbone with `pretrain_forward` (models/cav_mae.py).

    Validation/test: the reconstruction loss under the same masking as training, and audio-video retrieval
    (R@1/5/10, NCE) on the unmasked pooled outputs averaged over each clip's views (frames), as the
    contrastive task reports it; `val/score` (mean R@1) is what checkpointing monitors.
    """

    def __init__(self, *, backbone: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 mask_ratio: float = 0.75, mask_mode: str = "random", reconstruction_weight: float = 1.0,
                 contrastive_weight: float = 0.01, temperature: float = 0.05, normalizer: str = "video_to_audio",
                 dataset=None):
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio, self.mask_mode = mask_ratio, mask_mode
        self.reconstruction_weight, self.contrastive_weight = reconstruction_weight, contrastive_weight
        self.temperature, self.normalizer = temperature, normalizer
        self.eval_clips = nn.ModuleDict({n: ClipPredictions() for n in ("audio", "video")})

    # Negatives from every device: gathered with gradients, each rank computes the global loss (see there).
    _gather = ContrastiveTask._gather

    def setup(self, stage: str) -> None:
        if not hasattr(self.backbone, "pretrain_forward"):
            raise ConfigError(f"task=cav_mae_pretrain needs a CAV-MAE backbone (model=cav_mae or cav_mae_tiny), "
                             f"got {type(self.backbone).__name__}")

    def pretrain_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        has_audio, has_video = modality_flags(batch)
        return self.backbone.pretrain_forward(batch.get("audio"), batch.get("video"), has_audio=has_audio,
                                              has_video=has_video, mask_ratio=self.mask_ratio,
                                              mask_mode=self.mask_mode)

    def reconstruction_losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        has_audio, has_video = modality_flags(batch)
        return {f"rec_{m}": masked_mse(out[f"{m}_pred"], out[f"{m}_target"], out[f"{m}_mask"], present)
                for m, present in (("audio", has_audio), ("video", has_video))}

    def contrastive_loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        has_audio, has_video = modality_flags(batch)
        valid = self._gather(has_audio & has_video, sync_grads=False)
        za, zv = (self._gather(F.normalize(out[m], dim=-1), sync_grads=True)[valid] for m in ("audio", "video"))
        self.num_pairs = int(valid.sum())
        if self.num_pairs < 2:  # no negatives: no contrastive signal in this batch
            zero = (out["audio"].sum() + out["video"].sum()) * 0
            return zero, zero.detach()
        return cav_nce(za, zv, temperature=self.temperature, normalizer=self.normalizer)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, its terms) of a training batch; no logging, so any loop can drive it."""
        out = self.pretrain_outputs(batch)
        parts = self.reconstruction_losses(out, batch)
        parts["rec"] = parts["rec_audio"] + parts["rec_video"]
        parts["nce"], parts["c_acc"] = self.contrastive_loss(out, batch)
        loss = self.reconstruction_weight * parts["rec"] + self.contrastive_weight * parts["nce"]
        return loss, parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.compute_loss(batch)
        bs = _batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        return loss

    # -- evaluation ----------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> None:
        bs = _batch_size(batch)
        losses = self.reconstruction_losses(self.pretrain_outputs(batch), batch)
        losses["rec"] = losses["rec_audio"] + losses["rec_video"]
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, batch_size=bs, sync_dist=True)
        outputs = self(batch)  # unmasked: the retrieval embeddings (the official code's forward_feat)
        has_audio, has_video = modality_flags(batch)
        for name in self.eval_clips:
            self.eval_clips[name].update(outputs[name].float(), (has_audio & has_video).long(), batch.get("key"))

    def _eval_epoch_end(self, stage: str) -> None:
        if not self.eval_clips["audio"].update_called:
            return
        z = {}
        for name, clips in self.eval_clips.items():  # the same clip order for both (sorted key ids)
            emb, valid = clips.compute()
            z[name] = F.normalize(emb, dim=-1)
            clips.reset()
        valid = valid.reshape(-1).bool()
        za, zv = z["audio"][valid], z["video"][valid]
        if za.shape[0] < 2:
            return
        nce, accuracy = cav_nce(za, zv, temperature=self.temperature, normalizer=self.normalizer)
        values = {f"{stage}/nce": nce, f"{stage}/c_acc": accuracy}
        a2v, v2a = retrieval_recall(za, zv), retrieval_recall(zv, za)
        values.update({f"{stage}/a2v_{k}": v for k, v in a2v.items()})
        values.update({f"{stage}/v2a_{k}": v for k, v in v2a.items()})
        values[f"{stage}/score"] = (a2v["R@1"] + v2a["R@1"]) / 2
        self.log_dict(values, sync_dist=False)
        self.eval_result = EvalResult(stage, {k: float(v) for k, v in values.items()}, embeddings=(za.cpu(), zv.cpu()))
        if stage == "test" and self.report_dir and self.trainer.is_global_zero:
            from ..reports import log_images, write_retrieval_reports

            images = write_retrieval_reports(Path(self.report_dir) / stage, za.cpu(), zv.cpu(), stage=stage)
            log_images(self.loggers, images, stage)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


def _batch_size(batch: dict) -> int:
    return len(batch["key"]) if "key" in batch else next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
