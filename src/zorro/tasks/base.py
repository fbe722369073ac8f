"""What every task shares: the batch contract (batch hooks), hyper-parameters, optimiser groups, LR schedule."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from typing import Callable

import lightning.pytorch as pl
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from ..data.device import EncodedFrames, decode_on_device
from ..data.info import DatasetInfo
from ..models.pretrained import drop_unbuilt_group_copies

log = logging.getLogger(__name__)

# Evaluation input settings (Table 3: V / A / A+V): the other modality's input is zeroed, as in the paper.
EVAL_INPUTS = ("audio_video", "audio", "video")
# Where the missing modality is zeroed (section 4.3: "we zero out the missing modality"):
#   normalised: the model input (normalised log-mel / frames) is zero, as the paper's pipeline feeds its
#               models already-normalised inputs: the default;
#   raw:        the raw signal is zero (silence / black frames), which then goes through the front end.
ZERO_INPUTS = ("normalised", "raw")


def num_samples(batch: dict) -> int:
    """The batch's size: its keys, else its first tensor's rows (Lightning's `batch_size` for self.log)."""
    if "key" in batch:
        return len(batch["key"])
    return next(len(v) for v in batch.values() if torch.is_tensor(v) or isinstance(v, EncodedFrames))


def presence(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(has_audio, has_video), B bool: the batch's flags; where the loader sent none, True for a modality it sent
    (a tensor, or the encoded frames) and False for one it did not."""
    sent = {"audio": batch.get("audio") is not None,
            "video": batch.get("video") is not None or batch.get("frames") is not None}
    ref = next((v for v in batch.values() if torch.is_tensor(v)), None)
    device = ref.device if ref is not None else None
    return tuple(batch[f"has_{m}"].bool() if batch.get(f"has_{m}") is not None else
                 torch.full((num_samples(batch),), sent[m], dtype=torch.bool, device=device)
                 for m in ("audio", "video"))


def mark_absent(batch):
    """The first half of the batch contract, on the host (a task's on_before_batch_transfer): has_audio/has_video
    filled in, and a modality that no sample of the batch has set to None (never both). The loaders send
    zero-filled tensors for a missing modality; None is what a backbone's `missing_modality: drop` leaves out
    of the sequence, and with `zeros` it is the same zero input. Deciding it here reads the flags without a
    device sync, and the zeros are never copied to the device."""
    if not isinstance(batch, dict) or not any(batch.get(k) is not None for k in ("audio", "video", "frames")):
        return batch
    batch = dict(batch)
    batch["has_audio"], batch["has_video"] = presence(batch)
    absent = [m for m in ("audio", "video") if not batch[f"has_{m}"].any()]
    if len(absent) == 1:
        batch[absent[0]] = None
        if absent[0] == "video":
            batch.pop("frames", None)
    return batch


def float_audio(batch):
    """The second half, on the device: int16 audio as float in [-1, 1], the scale every front end reads floats
    in, so mixing, zeroing and the front ends see one convention."""
    if isinstance(batch, dict) and batch.get("audio") is not None and batch["audio"].dtype == torch.int16:
        batch = {**batch, "audio": batch["audio"].float() / 32768.0}
    return batch


def modality_flags(batch: dict, inputs: str = "audio_video") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample has_audio / has_video for `inputs` (the other modality's flags off for "audio" / "video")."""
    if inputs not in EVAL_INPUTS:
        raise ValueError(f"inputs must be one of {EVAL_INPUTS}, got {inputs!r}")
    has_audio, has_video = presence(batch)
    if inputs == "audio":
        has_video = torch.zeros_like(has_video)
    elif inputs == "video":
        has_audio = torch.zeros_like(has_audio)
    return has_audio, has_video


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
    return dict(config), as_dataset_info(dataset)


def as_dataset_info(dataset) -> DatasetInfo | None:
    """A DatasetInfo from one or its dict (as checkpoints keep it: plain values survive code moves)."""
    if dataset is None or isinstance(dataset, DatasetInfo):
        return dataset
    dataset = dict(dataset)
    return DatasetInfo(**{**dataset, "class_names": tuple(dataset.get("class_names", ()))})


def dataset_dict(dataset) -> dict | None:
    """The plain dict a checkpoint's hyper-parameters keep of a DatasetInfo (lists, not tuples: YAML-safe)."""
    info = as_dataset_info(dataset)
    return None if info is None else {**dataclasses.asdict(info), "class_names": list(info.class_names)}


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
    """Holds a backbone (any nn.Module returning {output name: B x D}) and the optimisation recipe.

    config: the resolved run config (zorro.run.build_task passes it) and dataset: the data's DatasetInfo (or its
    dict) are saved with the other constructor arguments by `save_hyperparameters`, so every checkpoint's
    hyper-parameters carry them (evaluate.py and zorro.eval.predict rebuild the run from there: checkpoint_run) and
    the loggers record them; the backbone and the optimiser / scheduler factories are not hyper-parameters.
    """

    def __init__(self, *, backbone: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 config: dict | None = None, dataset: DatasetInfo | dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        if dataset is not None and type(dataset) is not dict:  # DatasetInfo / DictConfig: a plain dict, readable
            self.save_hyperparameters({"dataset": dataset_dict(dataset)})  # without this code
        self.dataset = as_dataset_info(dataset)
        self.backbone = backbone
        # optimizer.lr_reference_batch (not an optimiser argument): lr is the LR at that global batch and is
        # scaled to the run's global batch in configure_optimizers
        keywords = dict(getattr(optimizer, "keywords", None) or {})
        self.lr_reference_batch = keywords.pop("lr_reference_batch", None)
        if isinstance(optimizer, functools.partial):
            optimizer = functools.partial(optimizer.func, *optimizer.args, **keywords)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """Also reads checkpoints written before two_streams stopped building unused separate-weight fusion copies
        (Lightning's restore, evaluate.py and the probe all load through here)."""
        state_dict = dict(state_dict)
        drop_unbuilt_group_copies(state_dict, self.state_dict().keys())
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def forward(self, batch: dict, inputs: str = "audio_video", zero_input: str = "normalised") -> dict[str, torch.Tensor]:
        return self.backbone(**model_inputs(batch, inputs, zero_input))

    # -- the batch contract, once per batch (mark_absent on the host, then decoding and float_audio) ---------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return mark_absent(batch)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # data.decode_on_device: the frames arrive JPEG-encoded and are decoded and augmented here, on the device
        return float_audio(decode_on_device(batch, self.device))

    def device_batch(self, batch):
        """A loader's batch as the steps see it under Lightning (its three batch hooks), for loops that run
        without the Trainer (zorro.xla)."""
        batch = self.on_before_batch_transfer(batch, 0)
        return self.on_after_batch_transfer(self.transfer_batch_to_device(batch, self.device, 0), 0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The task's compute_loss (loss, its named terms), logged; compute_loss itself logs nothing, so any loop
        can drive it (zorro.xla, the benchmarks, tests)."""
        loss, parts = self.compute_loss(batch)
        bs = num_samples(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        return loss

    def _gather(self, x: torch.Tensor, sync_grads: bool) -> torch.Tensor:
        """`x` of every process, concatenated along the batch (with sync_grads, gradients flow back to each)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=sync_grads).flatten(0, 1)

    # -- evaluation: every task implements _eval_step(batch, stage) and _eval_epoch_end(stage) ---------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _publish(self, stage: str, values: dict[str, torch.Tensor], **result) -> None:
        """Log an evaluation epoch's (already gathered) scores and keep them, with the predictions / embeddings
        the report callbacks read, as `eval_result`."""
        self.log_dict(values, sync_dist=False)
        self.eval_result = EvalResult(stage, {k: float(v) for k, v in values.items()}, **result)

    # -- optimisation ----------------------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """No weight decay on biases and norms (ndim <= 1) and on what the backbone's `no_weight_decay()` names
        (position embeddings, learned latents / queries): timm's grouping, the decayed group first."""
        skip = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", set)()}
        groups = param_groups_weight_decay(self, weight_decay, no_weight_decay_list=skip)
        return sorted(groups, key=lambda g: g["weight_decay"] == 0)

    def configure_optimizers(self):
        keywords = getattr(self.optimizer_factory, "keywords", {})
        extra = {}
        if self.device.type == "cuda" and "fused" not in keywords and \
                "fused" in inspect.signature(getattr(self.optimizer_factory, "func", self.optimizer_factory)).parameters:
            extra["fused"] = True  # one kernel for the whole update (Adam/AdamW/SGD on CUDA)
        if self.lr_reference_batch:
            batch = global_batch_size(self.trainer, per_device_batch_size(self.trainer.datamodule))
            extra["lr"] = scaled_lr(keywords["lr"], global_batch=batch, reference_batch=self.lr_reference_batch)
            log.info("lr %g = %g x global batch %d / %d", extra["lr"], keywords["lr"], batch, self.lr_reference_batch)
        groups = self.param_groups(keywords.get("weight_decay", 0.0))
        for group in groups:  # a group's own LR multiplier (e.g. the new heads: SupervisedTask.head_lr_scale)
            if "lr_scale" in group:
                group["lr"] = extra.get("lr", keywords.get("lr")) * group.pop("lr_scale")
        optimizer = self.optimizer_factory(groups, **extra)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the LR schedule needs a finite number of steps: set trainer.max_steps or max_epochs")
        scheduler = self.scheduler_factory(optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
