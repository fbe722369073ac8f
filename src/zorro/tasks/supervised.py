"""Supervised classification (Zorro section 3.1 / appendix B): one linear head per output, predictions averaged."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from ..data.info import DatasetInfo
from ..eval.tables import own_head
from ..models.routing import OUTPUTS
from .base import EVAL_INPUTS, ZERO_INPUTS, BaseTask, float_audio, model_inputs, modality_flags, presence
from .metrics import ClipPredictions, classification_scores

log = logging.getLogger(__name__)

COMBINE = ("probs", "logits")  # how the heads' outputs become the clip's prediction "avg"
# How the A-only / V-only settings are evaluated:
#   zeros: every head on the input with the other modality zeroed (the paper's protocol);
#   auto:  where the backbone's own head of the present modality never reads the other one (zorro,
#          two_streams: `backbone.isolated_outputs`), run the present stream alone and score that head only;
#          its value is exactly the zero-filled one, at a fraction of the cost (A-only: 128 of 1702 tokens
#          at ViT-B shapes). Elsewhere (input_level, bottleneck, backbones without the fast path): zeros.
UNIMODAL_EVAL = ("auto", "zeros")


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
                 config: dict | None = None):
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler, config=config, dataset=dataset)
        if not set(eval_inputs) <= set(EVAL_INPUTS):
            raise ValueError(f"eval_inputs must be a subset of {EVAL_INPUTS}, got {list(eval_inputs)}")
        if unimodal_eval not in UNIMODAL_EVAL:
            raise ValueError(f"unimodal_eval must be one of {UNIMODAL_EVAL}, got {unimodal_eval!r}")
        if zero_input not in ZERO_INPUTS:
            raise ValueError(f"zero_input must be one of {ZERO_INPUTS}, got {zero_input!r}")
        self.unimodal_eval, self.zero_input = unimodal_eval, zero_input
        dataset = self.dataset
        self.label_smoothing, self.mixup_alpha, self.modality_mixup = label_smoothing, mixup_alpha, modality_mixup
        self.eval_inputs = tuple(eval_inputs)
        self.output_names = tuple(backbone.output_names)
        # Zorro: one head per output, probabilities averaged. MBT: one linear layer shared by both CLS tokens
        # (shared_head) and the pre-softmax logits averaged (combine=logits), which is then also what the loss sees.
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
        if self.dataset.multi_label:
            return label.float() * (1 - eps) + eps / 2
        return F.one_hot(label.long(), C).float() * (1 - eps) + eps / C

    def head_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,)."""
        if self.dataset.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(-1)
        return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid() if self.dataset.multi_label else logits.float().softmax(-1)

    def mixup(self, batch: dict, target: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Mix each sample with a permuted partner. modality_mixup (MBT, 42.6 -> 43.9 mAP): each modality
        draws its own lambda; the target then mixes with their mean (choice: MBT does not say)."""
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
        lam = sum(lams.values()) / 2
        return mixed, lam * target + (1 - lam) * target[perm]

    def losses(self, outputs: dict, target: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        if self.combine == "logits":  # MBT: one loss on the averaged logits
            logits = torch.stack([self.heads[n](outputs[n]) for n in self.output_names if n in outputs]).mean(0)
            return {"avg": self.head_loss(logits, target).mean()}
        has_audio, has_video = modality_flags(batch)
        losses = {}
        for name in self.output_names:
            if name not in outputs:
                continue
            per_sample = self.head_loss(self.heads[name](outputs[name]), target)
            weight = learns_from(name, has_audio, has_video).float()
            losses[name] = (per_sample * weight).sum() / weight.sum().clamp(min=1)
        return losses

    # -- steps -------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-head losses) of a training batch; no logging, so any loop can drive it (XLA, tests)."""
        target = self.soft_targets(batch["label"])
        if self.mixup_alpha > 0:
            batch, target = self.mixup(batch, target)
        losses = self.losses(self(batch), target, batch)
        return torch.stack(list(losses.values())).mean(), {f"loss_{n}": l for n, l in losses.items()}

    def predict_probs(self, batch: dict, inputs: str = "audio_video", outputs: dict | None = None) -> dict:
        """{head: B x C probabilities} plus "avg", the paper's averaged prediction (of the probabilities; or, with
        combine=logits, the probabilities of the averaged logits)."""
        outputs = self(batch, inputs) if outputs is None else outputs
        logits = {n: self.heads[n](outputs[n]) for n in self.output_names if n in outputs}
        probs = {n: self.probabilities(x) for n, x in logits.items()}
        if self.combine == "logits":
            probs["avg"] = self.probabilities(torch.stack(list(logits.values())).mean(0))
        else:
            probs["avg"] = torch.stack(list(probs.values())).mean(0)
        return probs

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
                p = self.probabilities(self.heads[inputs](outputs[inputs]))
                clips[f"{inputs}-{inputs}"].update(p, label, keys)
                continue
            outputs = self(batch, inputs, self.zero_input)
            for name, p in self.predict_probs(batch, inputs, outputs).items():
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
            if name == "avg" or (name == inputs and self.dropped_stream(inputs)):  # the setting's prediction:
                # all heads averaged, or its own head where it runs alone (ESC-50's [audio]), for the reports
                averaged[inputs] = (probs.cpu(), labels.reshape(probs.shape[0], *labels.shape[1:]).cpu())
            for metric, value in classification_scores(probs, labels, multi_label=self.dataset.multi_label).items():
                values[f"{stage}/{inputs}/{name}/{metric}"] = value
            values[f"{stage}/num_clips"] = torch.tensor(float(probs.shape[0]))
            predictions.reset()
        # what checkpointing monitors: the first eval setting, read as the Table-3 column (A: the audio head)
        scored = [i for i in self.eval_inputs if not absent & set(i.split("_"))] or list(self.eval_inputs)
        primary = f"{stage}/{scored[0]}/{own_head(scored[0], self.output_names)}/{self.metric_name}"
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
