"""CAV-MAE pre-training (Gong et al. 2023, section 2.3): L = L_r + lambda_c * L_c.

L_r (eq. 9): mean squared error on the normalised patches of the masked tokens, audio and video each averaged
over their masked patches, then summed. L_c (eq. 7): NCE between the mean-pooled unimodal outputs of the joint
layer, c_a and c_v, with negatives from every device, or (contrastive_batch) within groups of that many clips, as
the official code under DataParallel computes it per GPU. Fine-tuning is `task=supervised` from the checkpoint
(`init_from=...`): the decoder is dropped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import modality_flags, num_samples
from ..errors import ConfigError
from ..models.cav_mae import MASK_MODES
from .contrastive import nce_loss
from .retrieval import RetrievalTask, clip_embeddings

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


class CAVMAEPretrainTask(RetrievalTask):
    """Masked reconstruction + contrastive learning on a backbone with `pretrain_forward` (models/cav_mae.py).

    Validation/test: the reconstruction loss under the same masking as training, and audio-video retrieval
    (R@1/5/10, NCE) on the unmasked pooled outputs averaged over each clip's views (frames), as the
    contrastive task reports it; `val/score` (mean R@1) is what checkpointing monitors.
    """

    def __init__(self, *, backbone: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 mask_ratio: float = 0.75, mask_mode: str = "random", reconstruction_weight: float = 1.0,
                 contrastive_weight: float = 0.01, temperature: float = 0.05, normalizer: str = "video_to_audio",
                 contrastive_batch: int | None = None, lr_reference_batch: int | None = None,
                 config: dict | None = None, dataset=None):
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler,
                         lr_reference_batch=lr_reference_batch, config=config, dataset=dataset)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio, self.mask_mode = mask_ratio, mask_mode
        self.reconstruction_weight, self.contrastive_weight = reconstruction_weight, contrastive_weight
        if contrastive_batch is not None and contrastive_batch < 2:
            raise ValueError(f"contrastive_batch must be >= 2 clips (or null), got {contrastive_batch}")
        self.temperature, self.normalizer, self.contrastive_batch = temperature, normalizer, contrastive_batch
        self.eval_clips = clip_embeddings(("audio", "video"))

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
        """Eq. 9 per modality (rec_audio, rec_video) and their sum (rec)."""
        has_audio, has_video = modality_flags(batch)
        losses = {f"rec_{m}": masked_mse(out[f"{m}_pred"], out[f"{m}_target"], out[f"{m}_mask"], present)
                  for m, present in (("audio", has_audio), ("video", has_video))}
        return {**losses, "rec": losses["rec_audio"] + losses["rec_video"]}

    def contrastive_loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        has_audio, has_video = modality_flags(batch)
        z = {m: F.normalize(out[m], dim=-1) for m in ("audio", "video")}
        if self.contrastive_batch:
            return self.grouped_nce(z, has_audio & has_video)
        pairs = self.training_pairs(z, has_audio & has_video)  # negatives from every device
        if pairs is None:
            zero = self.zero_loss(z)
            return zero, zero.detach()
        return cav_nce(pairs["audio"], pairs["video"], temperature=self.temperature, normalizer=self.normalizer)

    def grouped_nce(self, z: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_c, accuracy) averaged over consecutive groups of `contrastive_batch` clips of this device's batch,
        each group's clips the only negatives (official: the per-GPU chunk of DataParallel, 48 / 4 = 12 clips;
        its per-GPU losses are summed, a constant factor Adam does not see). Groups with < 2 pairs are skipped."""
        terms = []
        for start in range(0, valid.shape[0], self.contrastive_batch):
            keep = valid[start: start + self.contrastive_batch]
            if int(keep.sum()) >= 2:
                part = {m: e[start: start + self.contrastive_batch][keep] for m, e in z.items()}
                terms.append(cav_nce(part["audio"], part["video"], temperature=self.temperature,
                                     normalizer=self.normalizer))
        self.num_pairs = int(valid.sum())
        if not terms:
            zero = self.zero_loss(z)
            return zero, zero.detach()
        return torch.stack([t[0] for t in terms]).mean(), torch.stack([t[1] for t in terms]).mean()

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, its terms) of a training batch; no logging, so any loop can drive it."""
        out = self.pretrain_outputs(batch)
        parts = self.reconstruction_losses(out, batch)
        parts["nce"], parts["c_acc"] = self.contrastive_loss(out, batch)
        loss = self.reconstruction_weight * parts["rec"] + self.contrastive_weight * parts["nce"]
        return loss, parts

    # -- evaluation: the reconstruction loss, and retrieval on the unmasked clip embeddings (RetrievalTask) ---
    def eval_embeddings(self, batch: dict, stage: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        losses = self.reconstruction_losses(self.pretrain_outputs(batch), batch)
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, batch_size=num_samples(batch), sync_dist=True)
        outputs = self(batch)  # unmasked: the retrieval embeddings (the official code's forward_feat)
        has_audio, has_video = modality_flags(batch)
        return {name: outputs[name] for name in self.eval_clips}, has_audio & has_video

    def clip_losses(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nce, accuracy = cav_nce(z["audio"], z["video"], temperature=self.temperature, normalizer=self.normalizer)
        return {"nce": nce, "c_acc": accuracy}
