"""Surviving preemption: SIGTERM / SIGUSR1 -> stop at the next safe point, write a checkpoint that resumes exactly,
exit with a message within a bounded time; `ckpt_path=auto` -> resume from the newest loadable checkpoint of the
run directory. Checkpoints are written atomically.

Lightning does the signal work: its signal connector sets `trainer.received_sigterm` on SIGTERM, the loops raise
`SIGTERMException` once the current step (or validation batch) is done (all DDP ranks together: rank 0's flag is
broadcast every step), and under SLURM with auto-requeue its SIGUSR1 handler writes `hpc_ckpt_N.ckpt` and runs
`scontrol requeue`. What is added here:

- the checkpoint where the loops stopped, made to resume exactly wherever that was: after a training step (the
  shard DataModule stores its stream position, so the resumed epoch continues with the next unseen batch), in a
  validation (the checkpoint says the validation has not run, so the resumed run validates that epoch from its
  first batch), at an epoch's end (the next epoch's data follows);
- `StepSeed`: each training step's random draws depend on (seed, epoch, batch, rank) only, so the resumed steps
  draw what the uninterrupted run drew;
- a bounded stop: the data-loader workers (which ignore SIGTERM so that the step can finish) are shut down and,
  if they do not stop, killed; a stop that does not finish within `stop_timeout_s` exits anyway;
- SIGUSR1 treated as an early SIGTERM where Lightning does not handle it itself;
- `AtomicCheckpointIO`: every checkpoint (last, best, preempted) is written to a temporary file, synced and renamed,
  so a kill mid-write leaves the previous file whole;
- finding the newest checkpoint again, skipping one that cannot be read.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports: schedulers treat it as "not done"
RESUME = "Run the same command with ckpt_path=auto (and the same hydra.run.dir) to resume."


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (or SIGUSR1) during fit: Lightning finishes the current step or validation batch, then this saves
    `<dirpath>/<filename>.ckpt` and `train()` exits with EXIT_CODE and a one-line message. A stop that takes longer
    than `stop_timeout_s` after the signal (a step or a loader that does not finish) exits with EXIT_CODE anyway,
    without a new checkpoint.

    Not Lightning's OnExceptionCheckpoint: that one saves on any exception (a crash would become the newest
    checkpoint that `ckpt_path=auto` resumes from), and its presence makes `fit(ckpt_path=None)` resume "last"."""

    def __init__(self, dirpath: str, filename: str = "preempted", signals: tuple[str, ...] = ("SIGUSR1",),
                 stop_timeout_s: float | None = 300.0):
        self.dirpath, self.filename, self.signals = dirpath, filename, tuple(signals)
        self.stop_timeout_s = stop_timeout_s
        self.received: str | None = None
        self.saved: str | None = None
        self._handler = None
        self._watchdog: threading.Timer | None = None
        self._validation_pending = False

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath) / f"{self.filename}.ckpt")

    # -- signals ---------------------------------------------------------------------------------------------
    def _watch_sigterm(self) -> None:
        """Add the stop clock to the SIGTERM handler Lightning registered for this fit (it restores the previous
        handler at teardown)."""
        if threading.current_thread() is not threading.main_thread():
            return
        lightning = signal.getsignal(signal.SIGTERM)
        if lightning is self._handler:
            return

        def handler(signum, frame):
            if callable(lightning):
                lightning(signum, frame)
            self._stopping()

        self._handler = handler
        signal.signal(signal.SIGTERM, handler)

    def _stopping(self) -> None:
        self.received = self.received or "SIGTERM"
        if self.stop_timeout_s and self._watchdog is None:
            self._watchdog = threading.Timer(self.stop_timeout_s, self._overdue)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _overdue(self) -> None:
        print(f"Stop by {self.received} not done within {self.stop_timeout_s:g} s (a step, a loader or a checkpoint "
              f"write that does not finish): exiting without a new checkpoint. ckpt_path=auto resumes from the "
              f"newest complete one.", file=sys.stderr, flush=True)
        kill_loader_workers(timeout_s=0)
        os._exit(EXIT_CODE)

    def cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch_sigterm()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch_sigterm()
        # After Lightning registered its handlers (they are restored at teardown): a signal that already has a
        # handler (Lightning's SLURM auto-requeue on SIGUSR1, submitit's on USR2) is left alone.
        for name in self.signals:
            signum = getattr(signal, name)
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, self._as_sigterm)

    def _as_sigterm(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's (sets trainer.received_sigterm) and the clock
        if callable(handler):
            handler(signal.SIGTERM, frame)

    # -- the checkpoint --------------------------------------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        by = self.received or "SIGTERM"
        if trainer.sanity_checking:  # nothing trained yet in this process: the newest checkpoint stays the one
            if trainer.is_global_zero:
                after = f"resuming continues from {trainer.ckpt_path}" if trainer.ckpt_path else \
                    "the next run starts from scratch"
                print(f"Stopped by {by} in the sanity check, before training: no new checkpoint ({after}). {RESUME}",
                      file=sys.stderr, flush=True)
            return
        epochs = trainer.fit_loop.epoch_progress.current
        step = trainer.global_step
        if trainer.validating:  # resumed, the run validates this epoch again from its first batch
            where = f"in epoch {trainer.current_epoch}'s validation (global step {step}; it runs again on resume)"
        elif epochs.ready and epochs.completed == epochs.ready:
            where = f"at the end of epoch {epochs.ready - 1} (global step {step})"
        else:
            batch = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            where = f"in epoch {trainer.current_epoch} after batch {batch} (global step {step})"
        self._validation_pending = trainer.validating
        try:
            trainer.save_checkpoint(self.ckpt_path)  # all ranks take part (the strategy decides who writes)
        finally:
            self._validation_pending = False
        self.saved = self.ckpt_path
        if trainer.is_global_zero:
            print(f"Stopped by {by} {where}: checkpoint {self.ckpt_path}. {RESUME}", file=sys.stderr, flush=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._validation_pending:
            # Lightning would resume after the validation batches it counted (and without their metrics), or skip
            # the validation when the epoch's last training batch was done: record it as started, no batch done,
            # which Lightning resumes by running the whole validation before it goes on.
            started = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
            checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"] = {
                "total": dict(started), "current": dict(started), "is_last_batch": False}


class StepSeed(pl.Callback):
    """Each training batch draws its random numbers (mixup, SpecAugment, drop path, masking) from a seed made of
    (base seed, epoch, batch, rank) instead of the global generator's history, so a run resumed from any
    checkpoint draws what the uninterrupted run drew (Lightning's checkpoints hold no generator state, and a
    resumed run's loaders and sanity check would consume it differently). The base seed is the run's `seed` (or
    torch's initial seed when it is null) and is saved in the checkpoint."""

    def __init__(self, seed: int | None = None):
        self.base = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.base is None:
            self.base = torch.initial_seed()

    def state_dict(self) -> dict:
        return {"base": self.base}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base = state_dict.get("base", self.base)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        torch.manual_seed(hash((self.base, trainer.current_epoch, batch_idx, trainer.global_rank)) % 2**63)


def kill_loader_workers(trainer: pl.Trainer | None = None, timeout_s: float = 10.0) -> None:
    """End this process's data-loader workers before it exits: the trainer's loops shut their loaders down (workers
    that answer leave at once), and those still alive after `timeout_s` are killed. The workers ignore SIGTERM
    (zorro.data.stream), so that a scheduler's signal to the process group lets the step finish; without this the
    exit would wait on them forever (Python joins the workers of loaders it did not shut down)."""
    if trainer is not None:
        for loop in (trainer.fit_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop):
            with contextlib.suppress(Exception):
                loop.teardown()
    deadline = time.monotonic() + timeout_s
    for worker in multiprocessing.active_children():
        if not worker.daemon:  # loader workers are daemons; leave other children alone
            continue
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join(5)


def stop(trainer: pl.Trainer) -> int:
    """After a SIGTERMException out of `trainer.fit`: end the loader workers, stop the clock; the exit code."""
    kill_loader_workers(trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, PreemptionCheckpoint):
            callback.cancel_watchdog()
    return EXIT_CODE


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `<dir>/.<name>.partial`, fsync, then rename over `<name>` (and fsync the directory): a
    checkpoint file is whole or absent, and a kill or a full disk mid-write leaves the previous one. For every
    checkpoint the trainer writes (last, best, preempted, SLURM's hpc_ckpt). Remote paths (fsspec URLs) keep
    Lightning's writer (an object store replaces an object whole)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a crash once the directory is synced
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not XLA's, nor a user's plugin
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# -- ckpt_path=auto ------------------------------------------------------------------------------------------
def checkpoint_dirs(cfg) -> tuple[list[Path], Path | None]:
    """(the folders a run's checkpoint callbacks write to, its trainer's default_root_dir for SLURM's
    hpc_ckpt_N.ckpt) from a composed train.py config."""
    dirs = []
    for c in (cfg.get("callbacks") or {}).values():
        target = str((c or {}).get("_target_", ""))
        if target.endswith(("ModelCheckpoint", "PreemptionCheckpoint")) and c.get("dirpath"):
            dirs.append(Path(c.dirpath))
    if not dirs and cfg.get("paths"):
        dirs.append(Path(cfg.paths.output_dir) / "checkpoints")
    root = (cfg.get("trainer") or {}).get("default_root_dir")
    return list(dict.fromkeys(dirs)), Path(root) if root else None


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be loaded as a checkpoint (truncated, partly written, not a checkpoint), or None. Reads the
    file's index and pickled structure; the tensors are memory-mapped, not read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch / zipfile / pickle raise many kinds
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "not a training checkpoint (no state_dict)"
    return None


def newest_checkpoint(dirs, root: Path | None = None) -> str | None:
    """The most recently written loadable checkpoint of a run: any `*.ckpt` in `dirs` (last.ckpt, best-*.ckpt,
    preempted.ckpt) or Lightning's SLURM `hpc_ckpt_N.ckpt` in `root`. A newer file that cannot be read (cut short by
    a kill or a full disk where writes are not atomic, copied half) is skipped with one warning line."""
    found = [p for d in map(Path, dirs) if d.is_dir() for p in d.glob("*.ckpt")]
    if root is not None and Path(root).is_dir():
        found += Path(root).glob("hpc_ckpt_*.ckpt")
    skipped = []
    for path in sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True):
        why = unreadable(path)
        if why is None:
            if skipped:
                log.warning("ckpt_path=auto: skipped %s, which cannot be read (%s); resuming from %s instead",
                            ", ".join(str(p) for p, _ in skipped), skipped[0][1], path)
            return str(path)
        skipped.append((path, why))
    if skipped:
        log.warning("ckpt_path=auto: no readable checkpoint (%s: %s); starting from scratch",
                    ", ".join(str(p) for p, _ in skipped), skipped[0][1])
    return None


def resolve_ckpt_path(ckpt_path: str | None, cfg) -> str | None:
    """`auto`: the newest loadable checkpoint of the run directory, or None (a fresh start) when there is none."""
    if ckpt_path != "auto":
        return ckpt_path
    dirs, root = checkpoint_dirs(cfg)
    found = newest_checkpoint(dirs, root)
    log.info("ckpt_path=auto: %s", f"resuming from {found}" if found else
             f"no checkpoint in {', '.join(map(str, dirs))} yet, starting from scratch")
    return found
