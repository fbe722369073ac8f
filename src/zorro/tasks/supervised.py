"""Supervised classification (Zorro section 3.1 / appendix B): one linear head per output, predictions averaged."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import float_audio, model_inputs, modality_flags, presence
from ..data.info import DatasetInfo
from ..models.routing import OUTPUTS
from ..protocol import EVAL_INPUTS, ZERO_INPUTS, metric_key, own_head
from .base import BaseTask
from .metrics import ClipPredictions, classification_scores

log = logging.getLogger(__name__)

COMBINE = ("probs", "logits")  # how the heads' outputs become the clip's prediction "avg"
# The multi-label loss of one head for one sample: sigmoid cross-entropy
#   mean:        averaged over the classes (torch's BCEWithLogits default);
#   sum_classes: summed over the classes, as scenic's weighted_sigmoid_cross_entropy (MBT's "base learning rate
#                0.5 ... using the Scenic library" is the LR of this loss: its gradient is C times the mean's).
# Either way the batch is averaged; softmax cross-entropy (single-label) is a sum over classes in both.
LOSS_REDUCTIONS = ("mean", "sum_classes")
# How a clip's views (eval_windows x eval_crops) are averaged: their probabilities, or their logits (MBT:
# "average the logits over each view"), the probabilities then taken of the average.
VIEW_AVERAGES = ("probs", "logits")
# How the A-only / V-only settings are evaluated:
#   zeros: every head on the input with the other modality zeroed (the paper's protocol);
#   auto:  where the backbone's own head of the present modality never reads the other one (zorro,
#          two_streams: `backbone.isolated_outputs`), run the present stream alone and score that head only;
#          its value is exactly the zero-filled one, at a fraction of the cost (A-only: 128 of 1702 tokens
#          at ViT-B shapes). Elsewhere (input_level, bottleneck, backbones without the fast path): zeros.
UNIMODAL_EVAL = ("auto", "zeros")
# Label-smoothed targets (eps = label_smoothing, C classes):
#   standard: multi-label y (1 - eps) + eps / 2 (each class a binary problem); single-label
#             one_hot (1 - eps) + eps / C (torch's label_smoothing);
#   cav_mae:  the official CAV-MAE / AST data loader, both kinds: a label's class 1 - eps, every other eps / C
#             (0.9 / 0.1 / 527 on AudioSet). Under its mixup the official loader adds eps / C to the labelled
#             classes too (at most eps / C apart from mixing these targets, as this task does).
SMOOTHING = ("standard", "cav_mae")


class SupervisedTask(BaseTask):
    """Softmax cross-entropy (single-label) or sigmoid BCE (multi-label), decided by `dataset.multi_label`.

    mixup_alpha: one lambda ~ Beta(alpha, alpha) per batch, shared by all outputs (paper: alpha 0.3 on
    AudioSet fine-tuning; "a single mixup value ... the best configuration"). Inputs are mixed as
    waveforms and frames, targets as (smoothed) label vectors.
    """

    def __init__(self, *, backbone: nn.Module, dataset: DatasetInfo | dict, optimizer: Callable,
                 scheduler: Callable | None = None, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 modality_mixup: bool = False, eval_inputs: Sequence[str] = EVAL_INPUTS, shared_head: bool = False,
                 combine: str = "probs", unimodal_eval: str = "auto", zero_input: str = "normalised",
                 smoothing: str = "standard", head_lr_scale: float = 1.0, loss_reduction: str = "mean",
                 view_average: str = "probs", lr_reference_batch: int | None = None, config: dict | None = None):
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler,
                         lr_reference_batch=lr_reference_batch, config=config, dataset=dataset)
        if not set(eval_inputs) <= set(EVAL_INPUTS):
            raise ValueError(f"eval_inputs must be a subset of {EVAL_INPUTS}, got {list(eval_inputs)}")
        if unimodal_eval not in UNIMODAL_EVAL:
            raise ValueError(f"unimodal_eval must be one of {UNIMODAL_EVAL}, got {unimodal_eval!r}")
        if zero_input not in ZERO_INPUTS:
            raise ValueError(f"zero_input must be one of {ZERO_INPUTS}, got {zero_input!r}")
        if smoothing not in SMOOTHING:
            raise ValueError(f"smoothing must be one of {SMOOTHING}, got {smoothing!r}")
        self.unimodal_eval, self.zero_input = unimodal_eval, zero_input
        self.smoothing, self.head_lr_scale = smoothing, head_lr_scale
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if view_average not in VIEW_AVERAGES:
            raise ValueError(f"view_average must be one of {VIEW_AVERAGES}, got {view_average!r}")
        self.loss_reduction, self.view_average = loss_reduction, view_average
        dataset = self.dataset
        self.label_smoothing, self.mixup_alpha, self.modality_mixup = label_smoothing, mixup_alpha, modality_mixup
        self.eval_inputs = tuple(eval_inputs)
        self.output_names = tuple(backbone.output_names)
        # Zorro: one head per output, probabilities averaged. MBT: one linear layer shared by both CLS tokens
        # (shared_head) and the pre-softmax logits averaged for the prediction (combine=logits); training, as
        # scenic's MBT, averages the losses of the CLS tokens (every output's own loss, as Zorro's heads).
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.shared_head, self.combine = shared_head, combine
        shared = nn.Linear(backbone.output_dim, dataset.num_classes) if shared_head else None
        self.heads = nn.ModuleDict({n: shared or nn.Linear(backbone.output_dim, dataset.num_classes)
                                    for n in self.output_names})
        # Evaluation averages the predictions of all views (windows x crops) of a clip, keyed by `key`.
        names = (*self.output_names, "avg")
        self.metric_name = "mAP" if dataset.multi_label else "top1"
        self.eval_clips = nn.ModuleDict({stage: nn.ModuleDict({f"{i}-{n}": ClipPredictions() for i in self.eval_inputs
                                                               for n in names}) for stage in ("val", "test")})
        self._seen: dict[str, torch.Tensor] = {}  # per stage: clips with audio, with video (not saved)
        self._told_absent: set[str] = set()

    # -- targets and losses ------------------------------------------------------------------------------
    def soft_targets(self, label: torch.Tensor) -> torch.Tensor:
        C, eps = self.dataset.num_classes, self.label_smoothing
        if self.smoothing == "cav_mae":
            y = label.float() if self.dataset.multi_label else F.one_hot(label.long(), C).float()
            return y * (1 - eps) + (1 - y) * (eps / C)
        if self.dataset.multi_label:
            return label.float() * (1 - eps) + eps / 2
        return F.one_hot(label.long(), C).float() * (1 - eps) + eps / C

    def head_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,), reduced over the classes as `loss_reduction` says."""
        if self.dataset.multi_label:
            bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
            return bce.sum(-1) if self.loss_reduction == "sum_classes" else bce.mean(-1)
        return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid() if self.dataset.multi_label else logits.float().softmax(-1)

    def logits_of(self, probs: torch.Tensor) -> torch.Tensor:
        """The inverse of `probabilities` (logit, or log for softmax: softmax(log p) = p), for a prediction that is
        an average of probabilities (combine=probs) when the views average logits."""
        p = probs.float().clamp(1e-7, 1 - 1e-7)
        return p.log() - (-p).log1p() if self.dataset.multi_label else p.log()

    def mixup(self, batch: dict, target: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Mix each sample with a permuted partner. modality_mixup (MBT, 42.6 -> 43.9 mAP): each modality
        draws its own lambda; as scenic's `mixup_modalities`, the output named after a modality (MBT's CLS tokens)
        learns from the target mixed with that modality's lambda (kept in the batch as "mixup_targets"); the
        returned target, for the other outputs, mixes with their mean (choice)."""
        beta = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha)
        lams = {k: float(beta.sample()) for k in ("audio", "video")}
        if not self.modality_mixup:
            lams["video"] = lams["audio"]
        perm = torch.randperm(target.shape[0], device=target.device)
        batch = float_audio(batch)  # a no-op after the batch hooks; here for callers that skip them
        mixed = dict(batch)
        for key, lam in lams.items():
            if batch.get(key) is not None:  # audio in [-1, 1], frames in [0, 255]
                x = batch[key].float()
                mixed[key] = lam * x + (1 - lam) * x[perm]
        for key in ("has_audio", "has_video"):
            if key in batch:
                mixed[key] = batch[key] | batch[key][perm]
        if self.modality_mixup:
            mixed["mixup_targets"] = {k: lam * target + (1 - lam) * target[perm] for k, lam in lams.items()}
        lam = sum(lams.values()) / 2
        return mixed, lam * target + (1 - lam) * target[perm]

    def losses(self, outputs: dict, target: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Every output's loss over the samples it learns from; the training loss is their mean (MBT: the mean of
        the CLS tokens' losses, as scenic's MBT loss_function)."""
        has_audio, has_video = modality_flags(batch)
        targets = batch.get("mixup_targets") or {}
        losses = {}
        for name in self.output_names:
            if name not in outputs:
                continue
            per_sample = self.head_loss(self.heads[name](outputs[name]), targets.get(name, target))
            weight = learns_from(name, has_audio, has_video).float()
            losses[name] = (per_sample * weight).sum() / weight.sum().clamp(min=1)
        return losses

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base groups; with head_lr_scale != 1 the newly initialised heads (the task's heads and what the
        backbone's `head_parameter_names` lists) form their own groups at lr x head_lr_scale (the official CAV-MAE
        fine-tuning: 10x on VGGSound, 50x on AudioSet)."""
        groups = super().param_groups(weight_decay)
        if self.head_lr_scale == 1:
            return groups
        new = {f"backbone.{n}" for n in getattr(self.backbone, "head_parameter_names", set)()}
        new |= {f"heads.{n}" for n, _ in self.heads.named_parameters()}
        head_ids = {id(p) for n, p in self.named_parameters() if n in new}
        split = []
        for group in groups:
            base = [p for p in group["params"] if id(p) not in head_ids]
            head = [p for p in group["params"] if id(p) in head_ids]
            split += [{**group, "params": ps, **({"lr_scale": self.head_lr_scale} if ps is head else {})}
                      for ps in (base, head) if ps]
        return split

    # -- steps -------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-head losses) of a training batch; no logging, so any loop can drive it (XLA, tests)."""
        target = self.soft_targets(batch["label"])
        if self.mixup_alpha > 0:
            batch, target = self.mixup(batch, target)
        losses = self.losses(self(batch), target, batch)
        return torch.stack(list(losses.values())).mean(), {f"loss_{n}": l for n, l in losses.items()}

    def head_logits(self, batch: dict, inputs: str, outputs: dict | None) -> dict:
        """{head: B x C logits} of the backbone's outputs (computed from `batch` unless given)."""
        outputs = self(batch, inputs) if outputs is None else outputs
        return {n: self.heads[n](outputs[n]) for n in self.output_names if n in outputs}

    def predict_probs(self, batch: dict, inputs: str = "audio_video", outputs: dict | None = None) -> dict:
        """{head: B x C probabilities} plus "avg", the paper's averaged prediction (of the probabilities; or, with
        combine=logits, the probabilities of the averaged logits)."""
        logits = self.head_logits(batch, inputs, outputs)
        probs = {n: self.probabilities(x) for n, x in logits.items()}
        if self.combine == "logits":
            probs["avg"] = self.probabilities(torch.stack(list(logits.values())).mean(0))
        else:
            probs["avg"] = torch.stack(list(probs.values())).mean(0)
        return probs

    def predict_scores(self, batch: dict, inputs: str = "audio_video", outputs: dict | None = None) -> dict:
        """What a clip's views average (`view_average`): `predict_probs`, or the same predictions as logits."""
        if self.view_average == "probs":
            return self.predict_probs(batch, inputs, outputs)
        logits = {n: x.float() for n, x in self.head_logits(batch, inputs, outputs).items()}
        if self.combine == "logits":
            logits["avg"] = torch.stack(list(logits.values())).mean(0)
        else:
            logits["avg"] = self.logits_of(torch.stack([self.probabilities(x) for x in logits.values()]).mean(0))
        return logits

    def view_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """One head's logits as the scores `predict_scores` gives."""
        return logits.float() if self.view_average == "logits" else self.probabilities(logits)

    def dropped_stream(self, inputs: str) -> bool:
        """Whether the `inputs` setting runs the present stream alone (see UNIMODAL_EVAL)."""
        return (self.unimodal_eval == "auto" and inputs in ("audio", "video")
                and inputs in getattr(self.backbone, "isolated_outputs", ()))

    def eval_settings(self) -> dict[str, str]:
        """How the unimodal columns were computed, for the printed tables."""
        dropped = [i for i in ("audio", "video") if i in self.eval_inputs and self.dropped_stream(i)]
        return {"zero_input": self.zero_input, "unimodal_eval": self.unimodal_eval,
                "dropped_stream": ",".join(dropped) or "none"}

    def _eval_step(self, batch: dict, stage: str) -> None:
        clips, label, keys = self.eval_clips[stage], batch["label"], batch.get("key")
        seen = torch.stack([flags.sum() for flags in presence(batch)])  # clips with audio, with video
        self._seen[stage] = self._seen[stage] + seen if stage in self._seen else seen
        for inputs in self.eval_inputs:
            if self.dropped_stream(inputs):  # the own head alone; equal to zero-filling (tests prove it)
                kwargs = model_inputs(batch, inputs)
                present = kwargs[inputs] is not None  # else no clip of the batch has it: its zero input, as the
                if present:                           # other ranks run the same metrics (their compute gathers)
                    kwargs["video" if inputs == "audio" else "audio"] = None
                outputs = self.backbone(**kwargs, drop_absent=present)
                p = self.view_scores(self.heads[inputs](outputs[inputs]))
                clips[f"{inputs}-{inputs}"].update(p, label, keys)
                continue
            outputs = self(batch, inputs, self.zero_input)
            for name, p in self.predict_scores(batch, inputs, outputs).items():
                clips[f"{inputs}-{name}"].update(p, label, keys)
            if inputs == "audio_video":  # the loss of the real inputs, from the same forward pass
                losses = self.losses(outputs, self.soft_targets(label), batch)
                self.log(f"{stage}/loss", torch.stack(list(losses.values())).mean(), batch_size=label.shape[0],
                         sync_dist=True)

    def absent_modalities(self, stage: str) -> set[str]:
        """The modalities no clip of this evaluation epoch had (all processes): the settings that need one are not
        scored, so a run on data without video never prints a V number (nor A+V, nor the video head's)."""
        seen = self._seen.pop(stage, None)
        if seen is None:
            seen = torch.zeros(2, dtype=torch.long, device=self.device)
        seen = self._gather(seen[None], sync_grads=False).sum(0)  # every process calls it: the same decision
        return {m for m, n in zip(("audio", "video"), seen.tolist()) if n == 0}

    def _eval_epoch_end(self, stage: str) -> None:
        values, averaged, dropped = {}, {}, set()
        absent = self.absent_modalities(stage)
        for key, predictions in self.eval_clips[stage].items():
            if not predictions.update_called:
                continue
            inputs, name = key.split("-")
            probs, labels = predictions.compute()  # gathered across processes, averaged per clip
            if absent & {*inputs.split("_"), name}:
                predictions.reset()
                dropped.add(inputs if absent & set(inputs.split("_")) else f"the {name} head")
                continue
            if self.view_average == "logits":
                probs = self.probabilities(probs)
            if name == "avg" or (name == inputs and self.dropped_stream(inputs)):  # the setting's prediction:
                # all heads averaged, or its own head where it runs alone (ESC-50's [audio]), for the reports
                averaged[inputs] = (probs.cpu(), labels.reshape(probs.shape[0], *labels.shape[1:]).cpu())
            for metric, value in classification_scores(probs, labels, multi_label=self.dataset.multi_label).items():
                values[metric_key(stage, inputs, name, metric)] = value
            values[f"{stage}/num_clips"] = torch.tensor(float(probs.shape[0]))
            predictions.reset()
        # what checkpointing monitors: the first eval setting, read as the Table-3 column (A: the audio head)
        scored = [i for i in self.eval_inputs if not absent & set(i.split("_"))] or list(self.eval_inputs)
        primary = metric_key(stage, scored[0], own_head(scored[0], self.output_names), self.metric_name)
        if primary in values:
            values[f"{stage}/score"] = values[primary]
        if dropped and stage not in self._told_absent:
            self._told_absent.add(stage)
            log.warning("%s: no clip has %s: not scored: %s (%s/score = %s)", stage, " or ".join(sorted(absent)),
                        ", ".join(sorted(dropped)), stage, primary.split("/", 1)[1])
        self._publish(stage, values, predictions=averaged)


def learns_from(output: str, has_audio: torch.Tensor, has_video: torch.Tensor) -> torch.Tensor:
    """The samples a head's loss counts (paper 4.4: no loss for a missing modality): those with input in a token
    group its output reads (routing.OUTPUTS). The audio head needs audio, the video head video; the fusion
    latents are in every sample, so the fusion and global heads learn from all (an unknown output too)."""
    present = {"audio": has_audio, "video": has_video}
    reads = OUTPUTS.get(output, ("fusion",))
    return torch.stack([present.get(g, torch.ones_like(has_audio)) for g in reads]).any(0)
