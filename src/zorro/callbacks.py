"""Lightning callbacks of the suite."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


class ReconstructionImages(pl.Callback):
    """Every `every_n_steps` training steps, a picture of what a masked autoencoder (a backbone with
    `pretrain_forward`, e.g. CAV-MAE) reconstructs: per sample, the input frame and spectrogram, what the
    encoder saw (hidden patches grey) and the reconstruction (visible patches kept, hidden ones predicted).
    Written to `dirpath` (default: <run dir>/reconstructions/step<N>.png) and logged to W&B when it is used.

    Predictions of per-patch-normalised targets (norm_pix_loss) are put back on the input's scale with each
    patch's own mean and variance, as MAE's visualisation does.
    """

    def __init__(self, *, every_n_steps: int = 1000, num_samples: int = 2, dirpath: str | None = None):
        super().__init__()
        self.every_n_steps, self.num_samples, self.dirpath = every_n_steps, num_samples, dirpath
        self._warned, self._last_step = False, -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        due = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if not due or step == self._last_step or not trainer.is_global_zero:  # steps repeat under grad accumulation
            return
        self._last_step = step
        backbone = getattr(pl_module, "backbone", None)
        if not hasattr(backbone, "pretrain_forward") or not getattr(backbone, "has_decoder", True):
            if not self._warned:
                log.warning("ReconstructionImages: %s does not reconstruct (no pretrain_forward or no decoder); "
                            "no pictures", type(backbone).__name__)
                self._warned = True
            return
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "reconstructions")
        path = save_reconstruction(backbone, batch, dirpath / f"step{step:07d}.png", num_samples=self.num_samples,
                                   mask_ratio=getattr(pl_module, "mask_ratio", 0.75),
                                   mask_mode=getattr(pl_module, "mask_mode", "random"), title=f"step {step}")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key="train/reconstruction", images=[str(path)], step=step)


@torch.no_grad()
def save_reconstruction(backbone, batch: dict, path: Path, *, num_samples: int = 2, mask_ratio: float = 0.75,
                        mask_mode: str = "random", title: str = "") -> Path:
    """Run `backbone.pretrain_forward` (eval mode: middle frame, no augmentation) on the first samples of
    `batch` and save the picture to `path` (PNG). Returns the path."""
    from .eval.run_reports import _plt

    n = min(num_samples, len(next(v for v in batch.values() if torch.is_tensor(v))))
    first = {k: batch[k][:n] if batch.get(k) is not None else None
             for k in ("audio", "video", "has_audio", "has_video")}
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone.pretrain_forward(first["audio"], first["video"], has_audio=first["has_audio"],
                                        has_video=first["has_video"], mask_ratio=mask_ratio, mask_mode=mask_mode)
    finally:
        backbone.train(was_training)
    columns = ("input", f"masked ({mask_ratio:.0%})", "reconstruction")
    rows = []
    for name, grid in (("video", backbone.video_embed.grid), ("audio", backbone.audio_embed.grid)):
        patches, pred, mask = out[f"{name}_patches"].float(), out[f"{name}_pred"].float(), out[f"{name}_mask"]
        if getattr(backbone, "norm_pix_loss", False):  # back to the input's scale, patch by patch
            pred = pred * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
        hidden = mask[..., None].bool()
        images = [patches, patches.masked_fill(hidden, float("nan")), torch.where(hidden, pred, patches)]
        rows.append((name, [backbone.unpatchify(x, grid).cpu() for x in images]))

    plt = _plt()
    cmap = plt.get_cmap("magma").with_extremes(bad="0.5")  # hidden patches grey, as in the frames
    fig, axes = plt.subplots(2 * n, 3, figsize=(9, 2.6 * 2 * n), squeeze=False)
    for i in range(n):
        for r, (name, images) in enumerate(rows):
            for c, image in enumerate(images):
                ax = axes[2 * i + r, c]
                if name == "video":  # the frontend's normalisation undone for display
                    frontend = backbone.video_embed.frontend
                    rgb = (image[i] * frontend.std.view(3, 1, 1).cpu() + frontend.mean.view(3, 1, 1).cpu()) / 255
                    shown = torch.where(rgb.isnan(), 0.5, rgb).clamp(0, 1).permute(1, 2, 0)
                    ax.imshow(shown.numpy())
                else:  # spectrogram: frequency up, time to the right
                    ax.imshow(image[i, 0].numpy(), origin="lower", aspect="auto", cmap=cmap,
                              vmin=float(images[0][i].min()), vmax=float(images[0][i].max()))
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and r == 0:
                    ax.set_title(columns[c])
                if c == 0:
                    ax.set_ylabel(f"{batch['key'][i] if 'key' in batch else i}\n{name}", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class SkippedSamples(pl.Callback):
    """`data/skipped`: unreadable training samples the data module skipped (per epoch, summed over ranks); stops the
    run when more than data.max_bad_fraction of the epochs so far was unreadable. For data modules with
    `skipped()` / `check_skipped()` (the shard data module). Counts come from the loader workers as they read,
    which is ahead of training (prefetch), so they are compared with all epochs so far, not the current one."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen, self.first_epoch = 0, trainer.current_epoch  # the data module's stream is new in every fit

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        dm = trainer.datamodule
        if not hasattr(dm, "check_skipped"):
            return
        total = dm.skipped("train")
        pl_module.log("data/skipped", float(total - self.seen), on_step=False, on_epoch=True, reduce_fx="sum",
                      sync_dist=True)
        self.seen = total
        if not trainer.received_sigterm:  # a preempting SIGTERM also kills the workers' curl pipes: not bad data
            dm.check_skipped(total, epochs=trainer.current_epoch - self.first_epoch + 1)


class LogEveryEpoch(pl.Callback):
    """Training metrics reach the loggers at least once per epoch. Lightning logs every `log_every_n_steps`
    optimiser steps counted over the whole run, so an epoch shorter than that (small data: 4 steps against 10)
    logged train/loss in only some epochs, or in none (metrics.csv without a train/loss). When fitting starts,
    log_every_n_steps is lowered to the epoch's step count where that is smaller (added by zorro.run.build)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if not trainer.loggers or trainer.log_every_n_steps <= 0 or not math.isfinite(batches):
            return
        steps = max(1, int(batches) // max(1, trainer.accumulate_grad_batches))
        if trainer.log_every_n_steps > steps:
            log.info("log_every_n_steps %d -> %d: an epoch has %d optimiser steps, and every epoch logs",
                     trainer.log_every_n_steps, steps, steps)
            trainer.log_every_n_steps = steps


class EvalTotals:
    """For progress bars: the total of an evaluation loader without __len__ (the shard streams, whose `1/?` it
    replaced) where it is known: the data module's count before reading (ShardDataModule.num_batches), else
    the length of the previous complete pass of the same stage (evaluation streams are deterministic)."""

    _STAGE = {"val": "val", "test": "test", "predict": "test"}  # the data module's split of each loop

    def _known_total(self, stage: str, total):
        if math.isfinite(total) or self.trainer.sanity_checking:
            return total
        datamodule, idx = self.trainer.datamodule, self._current_eval_dataloader_idx or 0
        known = datamodule.num_batches(self._STAGE[stage]) if hasattr(datamodule, "num_batches") else None
        if known is None:
            known = getattr(self, "_passes", {}).get((stage, idx))
        return total if known is None else known

    def _note_batch(self, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self.__dict__.setdefault("_counts", {})[(stage, dataloader_idx)] = batch_idx + 1

    def _note_end(self, stage: str) -> None:
        counts = self.__dict__.setdefault("_counts", {})
        passes = self.__dict__.setdefault("_passes", {})
        for key in [k for k in counts if k[0] == stage]:
            passes[key] = counts.pop(key)

    @property
    def total_val_batches_current_dataloader(self):
        return self._known_total("val", super().total_val_batches_current_dataloader)

    @property
    def total_test_batches_current_dataloader(self):
        return self._known_total("test", super().total_test_batches_current_dataloader)

    @property
    def total_predict_batches_current_dataloader(self):
        return self._known_total("predict", super().total_predict_batches_current_dataloader)


class TQDMBar(EvalTotals, pl.callbacks.TQDMProgressBar):
    """Lightning's bars on a terminal, with evaluation totals where they are known (EvalTotals): each evaluation
    batch and pass is noted after Lightning's own hook."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._note_batch("val", batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._note_batch("test", batch_idx, dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._note_end("val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._note_end("test")


def clock(seconds: float) -> str:
    """0:07, 12:30, 3:04:05."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineProgressBar(EvalTotals, pl.callbacks.ProgressBar):
    """Progress as plain lines on stderr, for logs that are files (SLURM, `> log`, CI), where a tqdm bar writes a
    carriage-return update per step: a line every `every_n_steps` training batches and at an epoch's last, e.g.
    `epoch 3/50  step 1200/5000  train/loss 2.310  4.1 it/s  eta 1:02:13` (epochs counted from 1; the ETA of the
    whole fit from its pace so far, validation included); a line every `every_n_steps` batches of a long
    evaluation (`validation  batch 50/120`, with its total where it is known: EvalTotals), and one when it ends
    with its summary metrics (`val/score`, ...). Chosen by `progress` (train.yaml)."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"progress_every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps, self._enabled = every_n_steps, True
        self._last = (0.0, 0)  # (time, batch) of the previous line: a line's rate covers the batches since
        self._train_last, self._eval_started = self._last, 0.0
        self._fit_start = (0.0, 0, float("inf"))  # (time, global step, total steps) when fitting started

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        if self._enabled:
            print(*args, **{"file": sys.stderr, "flush": True, **kwargs})

    @staticmethod
    def _now() -> float:
        return time.perf_counter()

    def _line(self, head: str, n: int, total, tail: str = "", eta: str = "") -> None:
        now, (then, before) = self._now(), self._last
        self._last = (now, n)
        of = "" if total == float("inf") else f"/{int(total)}"
        self.print(f"{head} {n}{of}{tail}  {(n - before) / max(now - then, 1e-9):.1f} it/s{eta}")

    def _epoch(self, trainer: pl.Trainer) -> str:
        """`epoch 3/50`: counted from 1, of the epochs this fit will run (max_epochs, or fewer under max_steps)."""
        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        steps = int(trainer.num_training_batches) // max(1, trainer.accumulate_grad_batches) \
            if math.isfinite(trainer.num_training_batches) else 0
        if trainer.max_steps and trainer.max_steps > 0 and steps:
            by_steps = math.ceil(trainer.max_steps / steps)
            total = by_steps if total is None else min(total, by_steps)
        return f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "")

    def _eta(self, trainer: pl.Trainer) -> str:
        started, first, total = self._fit_start
        done = trainer.global_step - first
        if done <= 0 or not math.isfinite(total):
            return ""
        return f"  eta {clock((self._now() - started) / done * max(total - trainer.global_step, 0))}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches  # max_epochs x steps per epoch, or max_steps: inf if unknown
        self._fit_start = (self._now(), trainer.global_step, float(total))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = (self._now(), 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        n, total = batch_idx + 1, self.total_train_batches
        if n % self.every_n_steps == 0 or n == total:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            shown = "".join(f"  {k} {v:.3f}" if isinstance(v, float) else f"  {k} {v}" for k, v in metrics.items())
            self._line(f"{self._epoch(trainer)}  step", n, total, shown, self._eta(trainer))

    def _eval_start(self) -> None:
        self.reset_dataloader_idx_tracker()
        self._eval_started = self._now()
        self._train_last, self._last = self._last, (self._eval_started, 0)

    def _eval_batch(self, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        self.has_dataloader_changed(dataloader_idx)  # the base class's tracker, which its totals below read
        self._note_batch({"validation": "val"}.get(stage, stage), batch_idx, dataloader_idx)
        total = getattr(self, f"total_{'val' if stage == 'validation' else stage}_batches_current_dataloader")
        n = batch_idx + 1
        if n % self.every_n_steps == 0 and n != total:
            self._line(f"{stage}  batch", n, total)

    def _eval_end(self, trainer: pl.Trainer, stage: str, prefix: str) -> None:
        self._note_end({"validation": "val"}.get(stage, stage))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(prefix) and k.count("/") == 1 and torch.as_tensor(v).numel() == 1}
        shown = "".join(f"  {k} {v:.4g}" for k, v in sorted(metrics.items()))
        epoch = f"{self._epoch(trainer)}  " if stage == "validation" else ""
        self.print(f"{epoch}{stage} done{shown}")
        then, before = self._train_last  # the next training line's rate leaves the evaluation's time out
        self._last = (then + self._now() - self._eval_started, before)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._eval_batch("validation", batch_idx, dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_end(trainer, "validation", "val/")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._eval_batch("test", batch_idx, dataloader_idx)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, "test", "test/")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._eval_batch("predict", batch_idx, dataloader_idx)


def progress_bar(mode: str = "auto", every_n_steps: int = 50) -> tuple[bool, list]:
    """`progress` (train.yaml): (Trainer's enable_progress_bar, callbacks to add). auto: Lightning's tqdm bars on a
    terminal, LineProgressBar where stderr is a file or CI is set (a bar there rewrites its line at every step)."""
    if mode == "auto":
        ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
        mode = "bar" if sys.stderr.isatty() and not ci else "lines"
    if mode not in ("bar", "lines", "none"):
        raise ConfigError(f"progress: expected auto, bar, lines or none, got {mode!r}")
    if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
        raise ConfigError(f"progress_every_n_steps: expected a positive int, got {every_n_steps!r}")
    if mode == "none":
        return False, []
    return True, [TQDMBar() if mode == "bar" else LineProgressBar(every_n_steps=every_n_steps)]
