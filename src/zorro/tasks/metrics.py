"""Clip-level evaluation: predictions of every view of a clip (windows x crops) averaged, then scored.

`ClipPredictions` is a torchmetrics `Metric` whose list states are concatenated across processes, so under DDP
every rank's views meet before averaging, and a clip is counted once however its views were split or
duplicated by a sampler.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multilabel_auroc,
    multilabel_average_precision,
)
from torchmetrics.utilities import dim_zero_cat


def key_id(key: str) -> int:
    """A stable 63-bit id for a clip key (strings cannot be gathered across processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


class ClipPredictions(Metric):
    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor, keys: list[str] | None = None) -> None:
        if keys is None:  # no keys: every sample is its own clip
            ids = torch.arange(probs.shape[0], device=probs.device) + sum(len(i) for i in self.ids) + (1 << 62)
        else:
            ids = torch.tensor([key_id(k) for k in keys], device=probs.device, dtype=torch.long)
        self.ids.append(ids)
        self.probs.append(probs.detach().float())
        self.labels.append(labels.detach())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip-averaged probabilities, clip labels), one row per distinct key."""
        ids, probs, labels = dim_zero_cat(self.ids), dim_zero_cat(self.probs), dim_zero_cat(self.labels)
        unique, inverse = torch.unique(ids, return_inverse=True)
        sums = torch.zeros(len(unique), probs.shape[1], device=probs.device).index_add_(0, inverse, probs)
        counts = torch.zeros(len(unique), device=probs.device).index_add_(0, inverse, torch.ones_like(inverse,
                                                                                                     dtype=torch.float))
        first = torch.full((len(unique),), len(ids), device=ids.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
        return sums / counts.unsqueeze(1), labels[first]


def classification_scores(probs: torch.Tensor, labels: torch.Tensor, *, multi_label: bool) -> dict[str, torch.Tensor]:
    """mAP (macro, over classes with positives), AUC and d-prime for multi-label; top-1/top-5 otherwise."""
    labels = labels.reshape(probs.shape[0], *labels.shape[1:]) if labels.ndim == 0 else labels  # Metric.compute
    C = probs.shape[1]                                                                          # squeezes 1 clip
    if multi_label:
        target = labels.long()
        has_pos = target.sum(0) > 0
        ap = multilabel_average_precision(probs, target, num_labels=C, average=None)
        auc = multilabel_auroc(probs, target, num_labels=C, average=None)
        both = has_pos & (target.sum(0) < target.shape[0])  # AUC needs positives and negatives
        mean_auc = auc[both].mean() if both.any() else torch.tensor(float("nan"))
        normal = torch.distributions.Normal(0.0, 1.0)
        d_prime = math.sqrt(2.0) * normal.icdf(mean_auc.clamp(1e-6, 1 - 1e-6))
        return {"mAP": ap[has_pos].mean(), "AUC": mean_auc, "dprime": d_prime}
    labels = labels.long()
    scores = {"top1": multiclass_accuracy(probs, labels, num_classes=C, top_k=1, average="micro")}
    if C > 5:
        scores["top5"] = multiclass_accuracy(probs, labels, num_classes=C, top_k=5, average="micro")
    return scores
