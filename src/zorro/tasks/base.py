"""What every task shares: the batch contract's hooks (zorro.data.batch), the evaluation loop's shape and its
EvalResult, optimiser groups and the LR recipe (zorro.tasks.optim)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Callable

import lightning.pytorch as pl
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from ..checkpoint import as_dataset_info, dataset_dict, upgrade_checkpoint
from ..data.batch import float_audio, mark_absent, model_inputs, num_samples
from ..data.device import decode_on_device
from ..data.info import DatasetInfo
from .optim import global_batch_size, per_device_batch_size, scaled_lr

log = logging.getLogger(__name__)


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


class BaseTask(pl.LightningModule):
    """Holds a backbone (any nn.Module returning {output name: B x D}) and the optimisation recipe.

    lr_reference_batch: the global batch at which the optimiser's lr is given (the paper scales the LR with the
    batch): the run's LR is lr x global batch / lr_reference_batch, the global batch read at run time (None:
    the lr as given).

    config: the resolved run config (zorro.run.build_task passes it) and dataset: the data's DatasetInfo (or its
    dict) are saved with the other constructor arguments by `save_hyperparameters`, so every checkpoint's
    hyper-parameters carry them (evaluate.py and zorro.eval.predict rebuild the run from there:
    zorro.checkpoint) and the loggers record them; the backbone and the optimiser / scheduler factories are not
    hyper-parameters.
    """

    def __init__(self, *, backbone: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 lr_reference_batch: int | None = None, config: dict | None = None,
                 dataset: DatasetInfo | dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        if dataset is not None and type(dataset) is not dict:  # DatasetInfo / DictConfig: a plain dict, readable
            self.save_hyperparameters({"dataset": dataset_dict(dataset)})  # without this code
        self.dataset = as_dataset_info(dataset)
        self.backbone = backbone
        self.lr_reference_batch = lr_reference_batch
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """Any checkpoint layout (upgrade_checkpoint): Lightning's restore, evaluate.py, predict and the probe all
        load through here."""
        state_dict = upgrade_checkpoint({"state_dict": state_dict}, model_keys=self.state_dict().keys())["state_dict"]
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Lightning's restore (resume, evaluate, predict) reads the checkpoint after this: a checkpoint of an earlier
        layout is brought to the current one here, its optimizer state too (upgrade_checkpoint)."""
        checkpoint.update(upgrade_checkpoint(checkpoint, self.state_dict().keys(), self.param_group_names()))

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

    def param_group_names(self) -> list[list[str]]:
        """The parameter names of each optimizer param group, in the order configure_optimizers builds them."""
        names = {id(p): n for n, p in self.named_parameters()}
        return [[names[id(p)] for p in group["params"]] for group in self.param_groups(self._weight_decay())]

    def _weight_decay(self) -> float:
        return getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)

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
        groups = self.param_groups(self._weight_decay())
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
