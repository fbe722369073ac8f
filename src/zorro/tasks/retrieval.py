"""Audio-video retrieval evaluation, shared by the tasks that learn paired embeddings (contrastive, CAV-MAE)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import BaseTask
from .metrics import ClipPredictions


def retrieval_recall(query: torch.Tensor, gallery: torch.Tensor, ks=(1, 5, 10)) -> dict[str, torch.Tensor]:
    """Recall@k of retrieving gallery[i] for query[i] by cosine similarity."""
    sims = query @ gallery.t()
    rank = (sims > sims.diagonal().unsqueeze(1)).sum(1)  # how many items beat the true match
    return {f"R@{k}": (rank < k).float().mean() for k in ks if k <= gallery.shape[0]}


def clip_embeddings(names: Sequence[str]) -> nn.ModuleDict:
    """Evaluation embeddings per output name, averaged over each clip's views and gathered across processes
    (uneven per-rank counts are fine: torchmetrics concatenates its list states)."""
    return nn.ModuleDict({n: ClipPredictions() for n in names})


class RetrievalTask(BaseTask):
    """A task evaluated by audio-video retrieval on its clip embeddings.

    A subclass sets `self.eval_clips = clip_embeddings(names)` (with "audio" and "video" among the names) and
    implements `eval_embeddings` (a batch's embeddings and which samples have both modalities) and
    `clip_losses` (its own loss on the clip embeddings). At the end of an evaluation epoch the clips with both
    modalities are scored: R@1/5/10 audio -> video and video -> audio, and `score` = their mean R@1 (what
    checkpointing monitors); `eval_result.embeddings` are the audio / video clip embeddings.
    """

    eval_clips: nn.ModuleDict

    def training_pairs(self, z: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The paired embeddings of every device for a training loss: gathered with gradients (each rank computes
        the global loss; with DDP's gradient averaging that is exactly the global-batch gradient), the rows of
        samples with both modalities (`valid`). Sets `num_pairs`; None below two pairs (no negatives, e.g. an
        audio-only batch): the loss is then `zero_loss(z)`. Every rank sees the same gathered count, so all take
        the same branch."""
        valid = self._gather(valid, sync_grads=False)
        self.num_pairs = int(valid.sum())
        if self.num_pairs < 2:
            return None
        return {n: self._gather(e, sync_grads=True)[valid] for n, e in z.items()}

    @staticmethod
    def zero_loss(z: dict[str, torch.Tensor]) -> torch.Tensor:
        """A zero loss in the graph of the embeddings: nothing to learn, and every parameter still takes part."""
        return sum(e.sum() for e in z.values()) * 0

    def eval_embeddings(self, batch: dict, stage: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def clip_losses(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _eval_step(self, batch: dict, stage: str) -> None:
        z, valid = self.eval_embeddings(batch, stage)
        for name, e in z.items():
            self.eval_clips[name].update(e.float(), valid.long(), batch.get("key"))

    def _eval_epoch_end(self, stage: str) -> None:
        if not self.eval_clips["audio"].update_called:
            return
        z, valid = {}, None
        for name, clips in self.eval_clips.items():  # the same clip order for every output (sorted key ids)
            emb, valid = clips.compute()
            z[name] = F.normalize(emb, dim=-1)
            clips.reset()
        valid = valid.reshape(-1).bool()
        scored = torch.tensor(float(valid.numel()))  # every clip seen (run.check_scored compares the split's)
        z = {n: e[valid] for n, e in z.items()}
        if z["audio"].shape[0] < 2:
            return
        values = {f"{stage}/{k}": v for k, v in self.clip_losses(z).items()}
        values[f"{stage}/num_clips"] = scored
        a2v, v2a = retrieval_recall(z["audio"], z["video"]), retrieval_recall(z["video"], z["audio"])
        values.update({f"{stage}/a2v_{k}": v for k, v in a2v.items()})
        values.update({f"{stage}/v2a_{k}": v for k, v in v2a.items()})
        values[f"{stage}/score"] = (a2v["R@1"] + v2a["R@1"]) / 2
        self._publish(stage, values, embeddings=(z["audio"].cpu(), z["video"].cpu()))
