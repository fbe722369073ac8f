"""What every task shares: running a backbone on a contract batch, optimiser groups, the LR schedule."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from typing import Callable

import lightning.pytorch as pl
import torch
from torch import nn

from ..data.device import decode_on_device
from ..data.info import DatasetInfo

log = logging.getLogger(__name__)

# Evaluation input settings (Table 3: V / A / A+V): the other modality's input is zeroed, as in the paper.
EVAL_INPUTS = ("audio_video", "audio", "video")
# Where the missing modality is zeroed (section 4.3: "we zero out the missing modality"):
#   normalised: the model input (normalised log-mel / frames) is zero, as the paper's pipeline feeds its
#               models already-normalised inputs: the default;
#   raw:        the raw signal is zero (silence / black frames), which then goes through the front end.
ZERO_INPUTS = ("normalised", "raw")


def modality_flags(batch: dict, inputs: str = "audio_video") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample has_audio / has_video for `inputs`, from the batch's flags (all True when absent)."""
    if inputs not in EVAL_INPUTS:
        raise ValueError(f"inputs must be one of {EVAL_INPUTS}, got {inputs!r}")
    ref = batch["audio"] if batch.get("audio") is not None else batch["video"]
    ones = torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
    has_audio = batch.get("has_audio", ones if batch.get("audio") is not None else ~ones)
    has_video = batch.get("has_video", ones if batch.get("video") is not None else ~ones)
    if inputs == "audio":
        has_video = torch.zeros_like(has_video)
    elif inputs == "video":
        has_audio = torch.zeros_like(has_audio)
    return has_audio.bool(), has_video.bool()


def model_inputs(batch: dict, inputs: str = "audio_video", zero_input: str = "normalised") -> dict:
    """The backbone's keyword arguments for an input setting: audio, video, has_audio, has_video."""
    if zero_input not in ZERO_INPUTS:
        raise ValueError(f"zero_input must be one of {ZERO_INPUTS}, got {zero_input!r}")
    audio, video = batch.get("audio"), batch.get("video")
    if zero_input == "raw" and inputs != "audio_video":
        has_audio, has_video = modality_flags(batch)  # silence / black frames count as a present input
        if inputs == "audio" and video is not None:
            video = torch.zeros_like(video)
        if inputs == "video" and audio is not None:
            audio = torch.zeros_like(audio)
    else:
        has_audio, has_video = modality_flags(batch, inputs)
    return {"audio": audio, "video": video, "has_audio": has_audio, "has_video": has_video}


@dataclasses.dataclass
class EvalResult:
    """What one validation/test epoch produced, for the callbacks that write reports (zorro.eval): every task
    sets `task.eval_result` at the end of each evaluation epoch (on every rank; the values are gathered)."""
    stage: str
    scores: dict[str, float]
    # supervised: {inputs: (clip probabilities of the averaged prediction, clip labels)}, on the CPU
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    # retrieval: (audio, video) L2-normalised clip embeddings of the clips that have both modalities, on the CPU
    embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


def checkpoint_run(ckpt: dict) -> tuple[dict, DatasetInfo | None]:
    """(resolved run config, dataset info) saved in a train.py checkpoint: its hyper-parameters `config` and
    `dataset`, or the `zorro_config` / `zorro_dataset` keys of checkpoints written before."""
    hparams = ckpt.get("hyper_parameters") or {}
    config, dataset = hparams.get("config", ckpt.get("zorro_config")), hparams.get("dataset", ckpt.get("zorro_dataset"))
    if config is None:
        raise ValueError("the checkpoint has no saved run config; was it written by train.py?")
    if isinstance(dataset, dict):
        dataset = DatasetInfo(**{**dataset, "class_names": tuple(dataset.get("class_names", ()))})
    return dict(config), dataset


def cosine_with_warmup(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                       warmup_fraction: float = 0.0, min_lr_ratio: float = 0.0):
    """Linear warm-up then cosine decay (paper: "cosine decay ... linear warmup"), stepped every step."""
    warmup = max(warmup_steps, int(warmup_fraction * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(module: nn.Module, weight_decay: float, skip: set[str] = frozenset()) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and learned latents/queries (ViT practice)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(name == s or name.endswith("." + s) for s in skip) or name.endswith("_pos"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def global_batch_size(trainer: pl.Trainer, per_device: int) -> int:
    """Clips per optimiser step: per-device batch x devices x nodes (Lightning's world_size) x accumulation."""
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def per_device_batch_size(datamodule) -> int:
    """The data's per-device batch size (the mixed data: its sources', which share one)."""
    if hasattr(datamodule, "batch_size"):
        return int(datamodule.batch_size)
    sizes = {int(m.batch_size) for m in getattr(datamodule, "modules", {}).values()}
    if len(sizes) != 1:
        raise ValueError("optimizer.lr_reference_batch needs the data's batch size; "
                         f"{type(datamodule).__name__} has no batch_size")
    return sizes.pop()


def scaled_lr(lr: float, *, global_batch: int, reference_batch: int | None) -> float:
    """The paper's learning-rate scaling with the batch: lr x global_batch / reference_batch (None: unscaled)."""
    return lr if not reference_batch else lr * global_batch / reference_batch


class BaseTask(pl.LightningModule):
    """Holds a backbone (any nn.Module returning {output name: B x D}) and the optimisation recipe."""

    def __init__(self, *, backbone: nn.Module, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.backbone = backbone
        # optimizer.lr_reference_batch (not an optimiser argument): lr is the LR at that global batch and is
        # scaled to the run's global batch in configure_optimizers
        keywords = dict(getattr(optimizer, "keywords", None) or {})
        self.lr_reference_batch = keywords.pop("lr_reference_batch", None)
        if isinstance(optimizer, functools.partial):
            optimizer = functools.partial(optimizer.func, *optimizer.args, **keywords)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def forward(self, batch: dict, inputs: str = "audio_video", zero_input: str = "normalised") -> dict[str, torch.Tensor]:
        return self.backbone(**model_inputs(batch, inputs, zero_input))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # data.decode_on_device: the frames arrive JPEG-encoded and are decoded and augmented here, on the device
        return decode_on_device(batch, self.device)

    def configure_optimizers(self):
        skip = set()
        if hasattr(self.backbone, "no_weight_decay"):
            skip = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        keywords = getattr(self.optimizer_factory, "keywords", {})
        extra = {}
        if self.device.type == "cuda" and "fused" not in keywords and \
                "fused" in inspect.signature(getattr(self.optimizer_factory, "func", self.optimizer_factory)).parameters:
            extra["fused"] = True  # one kernel for the whole update (Adam/AdamW/SGD on CUDA)
        if self.lr_reference_batch:
            batch = global_batch_size(self.trainer, per_device_batch_size(self.trainer.datamodule))
            extra["lr"] = scaled_lr(keywords["lr"], global_batch=batch, reference_batch=self.lr_reference_batch)
            log.info("lr %g = %g x global batch %d / %d", extra["lr"], keywords["lr"], batch, self.lr_reference_batch)
        optimizer = self.optimizer_factory(param_groups(self, keywords.get("weight_decay", 0.0), skip), **extra)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the LR schedule needs a finite number of steps: set trainer.max_steps or max_epochs")
        scheduler = self.scheduler_factory(optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # The resolved Hydra config and the class names travel in every checkpoint, so evaluate.py can rebuild
    # the run and zorro.predict can name classes without the dataset.
    run_config: dict | None = None
    dataset_info = None
    report_dir = None  # where evaluation reports (plots, tables) go; set by zorro.run.build

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["zorro_config"] = self.run_config
        if self.dataset_info is not None:
            checkpoint["zorro_dataset"] = dataclasses.asdict(self.dataset_info)
