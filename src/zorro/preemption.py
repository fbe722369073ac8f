"""Surviving preemption: SIGTERM / SIGUSR1 -> finish the step, write a resumable checkpoint, exit with a message;
`ckpt_path=auto` -> resume from the newest checkpoint of the run directory.

Lightning does the signal work: its signal connector sets `trainer.received_sigterm` on SIGTERM, the loops raise
`SIGTERMException` once the current step is done (all DDP ranks together: rank 0's flag is broadcast every step),
and under SLURM with auto-requeue its SIGUSR1 handler writes `hpc_ckpt_N.ckpt` and runs `scontrol requeue`. What
is added here: the checkpoint at that step boundary (the shard DataModule stores its stream position in it, so
the resumed epoch continues with the next unseen batch), SIGUSR1 treated as an early SIGTERM where Lightning does
not handle it itself, and finding the newest checkpoint again.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports: schedulers treat it as "not done"


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (or SIGUSR1) during fit: Lightning finishes the current step, then this saves
    `<dirpath>/<filename>.ckpt` and `train()` exits with EXIT_CODE and a one-line message.

    Not Lightning's OnExceptionCheckpoint: that one saves on any exception (a crash would become the newest
    checkpoint that `ckpt_path=auto` resumes from), and its presence makes `fit(ckpt_path=None)` resume "last"."""

    def __init__(self, dirpath: str, filename: str = "preempted", signals: tuple[str, ...] = ("SIGUSR1",)):
        self.dirpath, self.filename, self.signals = dirpath, filename, tuple(signals)
        self.received: str | None = None
        self.saved: str | None = None

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath) / f"{self.filename}.ckpt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registered its handlers (they are restored at teardown): a signal that already has a
        # handler (Lightning's SLURM auto-requeue on SIGUSR1, submitit's on USR2) is left alone.
        for name in self.signals:
            signum = getattr(signal, name)
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, self._as_sigterm)

    def _as_sigterm(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's: sets trainer.received_sigterm
        if callable(handler):
            handler(signal.SIGTERM, frame)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.ckpt_path)  # all ranks take part (the strategy decides who writes)
        self.saved = self.ckpt_path
        if trainer.is_global_zero:
            step = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            print(f"Stopped by {self.received or 'SIGTERM'} in epoch {trainer.current_epoch} after batch {step} "
                  f"(global step {trainer.global_step}): checkpoint {self.ckpt_path}. Run the same command with "
                  f"ckpt_path=auto (and the same hydra.run.dir) to resume.", file=sys.stderr, flush=True)


def newest_checkpoint(trainer: pl.Trainer) -> str | None:
    """The most recently written checkpoint of this run: any `*.ckpt` in a checkpoint callback's directory
    (last.ckpt, best-*.ckpt, preempted.ckpt) or Lightning's SLURM `hpc_ckpt_N.ckpt` in default_root_dir."""
    dirs = {Path(c.dirpath) for c in trainer.callbacks
            if isinstance(c, (pl.callbacks.ModelCheckpoint, PreemptionCheckpoint)) and c.dirpath}
    found = [p for d in dirs if d.is_dir() for p in d.glob("*.ckpt")]
    root = Path(trainer.default_root_dir)
    if root.is_dir():
        found += root.glob("hpc_ckpt_*.ckpt")
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def resolve_ckpt_path(ckpt_path: str | None, trainer: pl.Trainer) -> str | None:
    """`auto`: the newest checkpoint of the run directory, or None (a fresh start) when there is none yet."""
    if ckpt_path != "auto":
        return ckpt_path
    found = newest_checkpoint(trainer)
    log.info("ckpt_path=auto: %s", f"resuming from {found}" if found else
             f"no checkpoint under {trainer.default_root_dir} yet, starting from scratch")
    return found
