"""Contrastive audio-visual pre-training (Zorro section 3.3, eqs. 2 and 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.routing import isolated_outputs
from .base import BaseTask, EvalResult, modality_flags
from .metrics import ClipPredictions

# eq. 2: audio-video only; eq. 3: + audio-fusion + video-fusion (third projector for the fusion output).
PAIRS = {"eq2": (("audio", "video"),), "eq3": (("audio", "video"), ("audio", "fusion"), ("video", "fusion"))}
LOSSES = ("auto", *PAIRS)
PROJECTOR_NORMS = ("batchnorm", "layernorm", "none")


def choose_loss(loss: str, backbone: nn.Module) -> str:
    """auto: what the paper ran for each row of Table 3's self-supervised half. Zorro trains with eq. 3 (its
    fusion output gets its own terms); the ablations "are trained in a self-supervised way, where the audio and
    the video outputs are used to compute the contrastive loss" (eq. 2): two streams (no fusion output) and the
    entangled input-level / bottleneck maskings, which the paper reports as collapsing."""
    if loss != "auto":
        return loss
    routing = getattr(backbone, "routing", None)  # Zorro backbones; the baselines have their own fixed fusion
    isolated = set(isolated_outputs(routing, backbone.output_names)) if routing is not None else set()
    return "eq3" if "fusion" in backbone.output_names and isolated >= {"audio", "video"} else "eq2"


class Projector(nn.Module):
    """MLP then L2 normalisation (section 3.3: "a projector per output ... an MLP"; width and normalisation
    are lost in our copies). norm (choice, default batchnorm as in SimCLR/MMV-style projectors): the hidden
    layer's normalisation; batchnorm statistics come from the valid samples only (a zero-filled sample whose
    modality is missing would otherwise shift them)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, norm: str = "batchnorm"):
        super().__init__()
        if norm not in PROJECTOR_NORMS:
            raise ValueError(f"projector_norm must be one of {PROJECTOR_NORMS}, got {norm!r}")
        norm_layer = {"batchnorm": lambda: nn.BatchNorm1d(hidden_dim), "layernorm": lambda: nn.LayerNorm(hidden_dim),
                      "none": nn.Identity}[norm]()
        # (Sequential keeps the checkpoint keys of earlier versions: net.0 / net.1 / net.3)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm_layer, nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        fc1, norm, relu, fc2 = self.net
        h = fc1(x)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and self.training and valid is not None \
                and 2 <= int(valid.sum()) < len(valid):
            # batch statistics (and running averages) from the valid rows; the others use the running averages
            out = torch.empty_like(h)
            out[valid] = norm(h[valid])
            out[~valid] = F.batch_norm(h[~valid], norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                       training=False, eps=norm.eps)
            h = out
        else:
            h = norm(h)
        return F.normalize(fc2(relu(h)), dim=-1)


def nce_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, normalizer: str = "joint") -> torch.Tensor:
    """NCE between paired embeddings (rows i of z1 and z2 are positives).

    "joint" is eq. 2 as printed: -mean_i log( sim(z1_i, z2_i) / sum_{j,k} sim(z1_k, z2_j) ), one normaliser
    over the whole batch matrix. "symmetric" is the usual InfoNCE (CLIP/MMV): softmax over each row and
    each column, averaged.
    """
    logits = z1 @ z2.t() / temperature
    if normalizer == "joint":
        return -(logits.diagonal() - torch.logsumexp(logits.flatten(), 0)).mean()
    if normalizer == "symmetric":
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    raise ValueError(f"normalizer must be 'joint' or 'symmetric', got {normalizer!r}")


def retrieval_recall(query: torch.Tensor, gallery: torch.Tensor, ks=(1, 5, 10)) -> dict[str, torch.Tensor]:
    """Recall@k of retrieving gallery[i] for query[i] by cosine similarity."""
    sims = query @ gallery.t()
    rank = (sims > sims.diagonal().unsqueeze(1)).sum(1)  # how many items beat the true match
    return {f"R@{k}": (rank < k).float().mean() for k in ks if k <= gallery.shape[0]}


class ContrastiveTask(BaseTask):
    """Projectors per output + NCE. Negatives come from every device: embeddings are gathered with
    gradients (`all_gather(sync_grads=True)`) and each rank computes the global loss; with DDP's gradient
    averaging this gives exactly the gradient of the global-batch loss."""

    def __init__(self, *, backbone: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 loss: str = "auto", temperature: float = 0.05, normalizer: str = "joint",
                 projector_hidden_dim: int = 2048, projector_dim: int = 512, projector_norm: str = "batchnorm",
                 dataset=None):
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss_name = choose_loss(loss, backbone)
        self.pairs = PAIRS[self.loss_name]
        needed = {n for pair in self.pairs for n in pair}
        missing = needed - set(backbone.output_names)
        if missing:
            raise ValueError(f"loss {loss!r} needs outputs {sorted(missing)}, which this backbone/masking lacks "
                             f"(it has {list(backbone.output_names)}); use loss=eq2")
        self.temperature, self.normalizer = temperature, normalizer
        self.projectors = nn.ModuleDict({
            n: Projector(in_dim=backbone.output_dim, hidden_dim=projector_hidden_dim, out_dim=projector_dim,
                         norm=projector_norm)
            for n in sorted(needed)})
        # Evaluation embeddings, averaged over each clip's views and gathered across processes (uneven per-rank
        # counts are fine: torchmetrics concatenates its list states).
        self.eval_clips = nn.ModuleDict({n: ClipPredictions() for n in self.projectors})

    def embed(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Projected embeddings and the mask of samples with both modalities (pairs need both)."""
        outputs = self(batch)
        has_audio, has_video = modality_flags(batch)
        valid = has_audio & has_video
        return {n: p(outputs[n], valid) for n, p in self.projectors.items()}, valid

    def _gather(self, x: torch.Tensor, sync_grads: bool) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=sync_grads).flatten(0, 1)

    def contrastive_loss(self, z: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        valid = self._gather(valid, sync_grads=False)
        z = {n: self._gather(e, sync_grads=True)[valid] for n, e in z.items()}
        self.num_pairs = int(valid.sum())  # pairs over all devices: each one's negatives are the others
        return {f"{a}_{b}": nce_loss(z[a], z[b], temperature=self.temperature, normalizer=self.normalizer)
                for a, b in self.pairs}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-pair NCE terms) of a training batch; no logging, so any loop can drive it."""
        z, valid = self.embed(batch)
        losses = self.contrastive_loss(z, valid)
        return sum(losses.values()), {f"nce_{k}": v for k, v in losses.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.compute_loss(batch)
        bs = len(batch["key"]) if "key" in batch else next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        self.log("train/pairs", float(self.num_pairs), batch_size=bs, reduce_fx="max")
        return loss

    def _eval_step(self, batch: dict) -> None:
        z, valid = self.embed(batch)
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
        z = {n: e[valid] for n, e in z.items()}
        if z["audio"].shape[0] < 2:
            return
        values = {f"{stage}/nce_{a}_{b}": nce_loss(z[a], z[b], temperature=self.temperature,
                                                  normalizer=self.normalizer) for a, b in self.pairs}
        values[f"{stage}/loss"] = sum(values.values())
        a2v, v2a = retrieval_recall(z["audio"], z["video"]), retrieval_recall(z["video"], z["audio"])
        values.update({f"{stage}/a2v_{k}": v for k, v in a2v.items()})
        values.update({f"{stage}/v2a_{k}": v for k, v in v2a.items()})
        values[f"{stage}/score"] = (a2v["R@1"] + v2a["R@1"]) / 2
        self.log_dict(values, sync_dist=False)
        self.eval_result = EvalResult(stage, {k: float(v) for k, v in values.items()},
                                      embeddings=(z["audio"].cpu(), z["video"].cpu()))
        if stage == "test" and self.report_dir and self.trainer.is_global_zero:
            from ..reports import log_images, write_retrieval_reports

            images = write_retrieval_reports(Path(self.report_dir) / stage, z["audio"].cpu(), z["video"].cpu(),
                                             stage=stage)
            log_images(self.loggers, images, stage)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
