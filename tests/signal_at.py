"""A test callback that signals its own training process at a named moment, so preemption tests are deterministic:
`+callbacks.signal._target_=tests.signal_at.SignalAt +callbacks.signal.moment=validation +callbacks.signal.epoch=0
+callbacks.signal.once=FILE` (or SignalAt(...) in a config's callbacks). It also appends one JSON line per
validation (epoch, val/* metrics) to `log`, so a test can check that no epoch's validation was lost.

Moments (in `epoch`): `sanity` (the sanity check's first batch), `step` (training batch `batch` runs when the
signal lands), `last_step` (the epoch's last training batch), `validation` (its first validation batch),
`validation_end`, `epoch_end` (on_train_epoch_end, before the checkpoint callbacks), `checkpoint` (while
`last.ckpt` is being written). The signal goes to this process and to its data-loader workers, as a scheduler
signals a process group (without signalling the test runner when the training runs inside it; `group=true`
signals the real process group of a training started in its own session; `hang_s`: block that long after
signalling, like a step that never finishes). No moment: only the validation log."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

MOMENTS = ("sanity", "step", "last_step", "validation", "validation_end", "epoch_end", "checkpoint")


class SignalAt(pl.Callback):
    def __init__(self, moment: str | None = None, epoch: int = 0, batch: int = 1, signum: str = "SIGTERM",
                 once: str | None = None, log: str | None = None, group: bool = False, hang_s: float = 0.0):
        if moment not in (*MOMENTS, None):
            raise ValueError(f"moment: one of {MOMENTS}, got {moment!r}")
        self.moment, self.epoch, self.batch, self.signum = moment, epoch, batch, getattr(signal, signum)
        self.once, self.val_log = once, log  # once: a file that marks the signal sent (a resumed run sends none)
        self.group = group  # signal the whole process group (a process started in its own session)
        self.hang_s = hang_s  # then block this long, as a step waiting on a loader that never answers

    def _send(self) -> None:
        if self.once:
            if Path(self.once).exists():
                return
            Path(self.once).touch()
        if self.group:
            assert os.getpgrp() == os.getpid(), "group=true needs a process that leads its group (a new session)"
            os.killpg(os.getpgrp(), self.signum)
            self._hang()
            return
        for child in multiprocessing.active_children():  # the loader workers
            os.kill(child.pid, self.signum)
        os.kill(os.getpid(), self.signum)
        self._hang()

    def _hang(self) -> None:
        deadline = time.time() + self.hang_s
        while time.time() < deadline:
            time.sleep(0.1)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_checkpoint(checkpoint, path, storage_options=None):
            if self.moment == "checkpoint" and Path(path).name == "last.ckpt" and checkpoint["epoch"] == self.epoch:
                self._send()
            return save(checkpoint, path, storage_options)

        io.save_checkpoint = save_checkpoint

    def _now(self, trainer: pl.Trainer, moment: str) -> None:
        if moment == self.moment and trainer.current_epoch == self.epoch:
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._now(trainer, "sanity" if trainer.sanity_checking else "validation")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            self._now(trainer, "step")
        if batch_idx + 1 == trainer.num_training_batches:
            self._now(trainer, "last_step")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if self.val_log:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith("val/") and torch.as_tensor(v).numel() == 1}
            with open(self.val_log, "a") as f:
                f.write(json.dumps({"epoch": trainer.current_epoch, **metrics}) + "\n")
        self._now(trainer, "validation_end")

    def on_train_epoch_end(self, trainer, pl_module):
        self._now(trainer, "epoch_end")


def validations(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []
