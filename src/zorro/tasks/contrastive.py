"""Contrastive audio-visual pre-training (Zorro section 3.3, eqs. 2 and 3)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import modality_flags, num_samples
from ..models.routing import isolated_outputs
from .retrieval import RetrievalTask, clip_embeddings

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
        # a Sequential: the checkpoint keys are net.0 / net.1 / net.3
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm_layer, nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        fc1, norm, relu, fc2 = self.net
        h = fc1(x)
        masked_bn = isinstance(norm, nn.modules.batchnorm._BatchNorm) and self.training and valid is not None
        count = int(valid.sum()) if masked_bn else len(h)
        if masked_bn and count < 2:
            # no batch statistics to take (no pairs in this batch): every row uses the running averages
            h = F.batch_norm(h, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False,
                             eps=norm.eps)
        elif masked_bn and count < len(valid):
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


class ContrastiveTask(RetrievalTask):
    """Projectors per output + NCE. Negatives come from every device: embeddings are gathered with
    gradients (`all_gather(sync_grads=True)`) and each rank computes the global loss; with DDP's gradient
    averaging this gives exactly the gradient of the global-batch loss."""

    def __init__(self, *, backbone: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 loss: str = "auto", temperature: float = 0.05, normalizer: str = "joint",
                 projector_hidden_dim: int = 2048, projector_dim: int = 512, projector_norm: str = "batchnorm",
                 lr_reference_batch: int | None = None, config: dict | None = None, dataset=None):
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler,
                         lr_reference_batch=lr_reference_batch, config=config, dataset=dataset)
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
        self.eval_clips = clip_embeddings(self.projectors)

    def embed(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Projected embeddings and the mask of samples with both modalities (pairs need both)."""
        outputs = self(batch)
        has_audio, has_video = modality_flags(batch)
        valid = has_audio & has_video
        # An output left out (missing_modality=drop on a batch without that modality) has no pairs here; zeros keep
        # its gathered shape equal on every rank, and `valid` excludes them.
        ref = next(iter(outputs.values()))
        return {n: p(outputs[n] if n in outputs else ref.new_zeros(ref.shape), valid)
                for n, p in self.projectors.items()}, valid

    def contrastive_loss(self, z: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        pairs = self.training_pairs(z, valid)  # every device's pairs: each one's negatives are the others
        if pairs is None:
            return {f"{a}_{b}": self.zero_loss(z) for a, b in self.pairs}
        return {f"{a}_{b}": nce_loss(pairs[a], pairs[b], temperature=self.temperature, normalizer=self.normalizer)
                for a, b in self.pairs}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-pair NCE terms) of a training batch; no logging, so any loop can drive it."""
        z, valid = self.embed(batch)
        losses = self.contrastive_loss(z, valid)
        return sum(losses.values()), {f"nce_{k}": v for k, v in losses.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/pairs", float(self.num_pairs), batch_size=num_samples(batch), reduce_fx="max")
        return loss

    # -- evaluation: retrieval on the projected clip embeddings (RetrievalTask) -------------------------------
    def eval_embeddings(self, batch: dict, stage: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.embed(batch)

    def clip_losses(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = {f"nce_{a}_{b}": nce_loss(z[a], z[b], temperature=self.temperature, normalizer=self.normalizer)
                  for a, b in self.pairs}
        return {**losses, "loss": sum(losses.values())}
