"""A run's reports for people, logged to W&B when it is used: the evaluation reports written to
`<run dir>/reports/<stage>/` (PNG/CSV/JSON) by the RunReports callback (per-class AP (multi-label) or a confusion
matrix (single-label) of the averaged A+V prediction, the V / A / A+V table, and retrieval recall@k curves for
contrastive models), and the training curves `<run dir>/reports/curves.png` by TrainingCurves. (The sweep's one
table across runs is `sweep_report`.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix, multilabel_average_precision

from ..protocol import metric_key
from ..tasks.retrieval import retrieval_recall
from .tables import COLUMNS, cells, head_rows, write_csv


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_class_ap(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ap = multilabel_average_precision(probs, labels.long(), num_labels=probs.shape[1], average=None)
    return torch.where(labels.sum(0) > 0, ap, torch.full_like(ap, float("nan")))


def confusion(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C x C counts: row = true class, column = predicted class (the argmax of `probs`)."""
    return multiclass_confusion_matrix(probs, labels.long(), num_classes=probs.shape[1])


def write_classification_reports(out: Path, scores: dict[str, float], predictions: dict, *,
                                 class_names: Sequence[str], multi_label: bool, stage: str) -> list[Path]:
    """predictions: {inputs: (clip probs, clip labels)} of each setting's prediction (the averaged heads, or the
    own head of a stream run alone); the pictures show A+V's, else the first setting's. Returns the images written."""
    out.mkdir(parents=True, exist_ok=True)
    plt, images = _plt(), []
    write_csv(out / "table.csv", *head_rows(scores, stage, digits=2))
    labels_of = dict(COLUMNS)
    table = {f"{head} {metric}": {labels_of[i]: v for i, v in row.items()}
             for (head, metric), row in cells(scores, stage).items()}
    (out / "table.json").write_text(json.dumps(table, indent=2, sort_keys=True))
    # the A+V prediction; for a run scored on one modality only (ESC-50: eval_inputs=[audio]) that one's
    inputs = "audio_video" if "audio_video" in predictions else next(iter(predictions), None)
    if inputs is None:
        return images
    probs, labels = predictions[inputs]
    shown_as = "A+V averaged prediction" if inputs == "audio_video" else f"{labels_of[inputs]} prediction"
    names = list(class_names) or [str(i) for i in range(probs.shape[1])]
    if multi_label:
        ap = per_class_ap(probs, labels)
        with open(out / "per_class_ap.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "AP", "positives"])
            for i in torch.argsort(torch.nan_to_num(ap, nan=-1.0), descending=True).tolist():
                w.writerow([names[i], "" if torch.isnan(ap[i]) else f"{ap[i]:.4f}", int(labels[:, i].sum())])
        valid = [i for i in torch.argsort(torch.nan_to_num(ap, nan=-1.0), descending=True).tolist()
                 if not torch.isnan(ap[i])]
        shown = valid if len(valid) <= 40 else valid[:20] + valid[-20:]  # best and worst 20 of many
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(shown)), 4))
        ax.bar(range(len(shown)), [float(ap[i]) for i in shown])
        ax.set_xticks(range(len(shown)), [names[i] for i in shown], rotation=90, fontsize=7)
        ax.set_ylabel("AP")
        ax.set_title(f"{stage}: per-class AP, {shown_as} (mAP {float(ap[valid].mean()):.3f})")
        path = out / "per_class_ap.png"
    else:
        cm = confusion(probs, labels)
        with open(out / "confusion_matrix.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *names])
            w.writerows([[names[i], *cm[i].tolist()] for i in range(len(names))])
        C = len(names)
        side = min(max(5.0, 2 + 0.35 * C), 24)
        fig, ax = plt.subplots(figsize=(side, side))
        rates = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        if C <= 40:
            ax.set_xticks(range(C), names, rotation=90, fontsize=7)
            ax.set_yticks(range(C), names, fontsize=7)
            for i in range(C):
                for j in range(C):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{stage}: confusion matrix ({shown_as})", fontsize=9)
        path = out / "confusion_matrix.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    images.append(path)
    return images


def write_retrieval_reports(out: Path, z_audio: torch.Tensor, z_video: torch.Tensor, *, stage: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    ks = list(range(1, min(50, len(z_audio)) + 1))
    curves = {name: [float(r) for r in retrieval_recall(q, g, ks).values()]
              for name, (q, g) in {"audio->video": (z_audio, z_video), "video->audio": (z_video, z_audio)}.items()}
    with open(out / "retrieval_recall.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", *curves])
        w.writerows([[k, *(f"{curves[n][i]:.4f}" for n in curves)] for i, k in enumerate(ks)])
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, values in curves.items():
        ax.plot(ks, values, label=name)
    ax.plot(ks, [k / len(z_audio) for k in ks], "k:", label="chance")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{stage}: audio-video retrieval ({len(z_audio)} clips)")
    fig.tight_layout()
    path = out / "retrieval_recall.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def log_images(loggers, images: list[Path], stage: str) -> None:
    for logger in loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            for path in images:
                logger.log_image(key=f"{stage}/{path.stem}", images=[str(path)])


def write_run_reports(out: Path, result, *, class_names: Sequence[str] = (),
                      multi_label: bool | None = None) -> list[Path]:
    """Every report of one evaluation epoch (a task's EvalResult) into `out`; returns the images written.
    multi_label: None reads it from the labels (clip x class for multi-label, a class index otherwise)."""
    images = []
    if result.predictions:  # supervised: the table and the averaged A+V prediction's per-class picture
        if multi_label is None:
            multi_label = next(iter(result.predictions.values()))[1].ndim == 2
        images += write_classification_reports(out, result.scores, result.predictions, class_names=class_names,
                                               multi_label=multi_label, stage=result.stage)
    if result.embeddings is not None:  # retrieval: recall@k curves of the clip embeddings
        images += write_retrieval_reports(out, *result.embeddings, stage=result.stage)
    return images


class RunReports(pl.Callback):
    """Writes the test reports of `pl_module.eval_result` into `<dirpath>/<stage>/` (default dirpath:
    `<trainer.default_root_dir>/reports`) on global rank 0 and logs the images to the W&B logger.

    It runs in `on_test_end`: Lightning calls a callback's `on_test_epoch_end` before the module's, where the task
    sets `eval_result`, so the result read there would be the previous one."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self._before = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = getattr(pl_module, "eval_result", None)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = getattr(pl_module, "eval_result", None)
        if result is None or result is self._before or not trainer.is_global_zero:
            return  # this test epoch produced nothing (e.g. fewer than two clips to retrieve among)
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "reports") / result.stage
        info = getattr(pl_module, "dataset", None)
        images = write_run_reports(out, result, class_names=getattr(info, "class_names", ()) or (),
                                   multi_label=getattr(info, "multi_label", None))
        log_images(trainer.loggers, images, result.stage)


def write_training_curves(out: Path, train_loss: list[tuple[int, float]], validations: list[dict]) -> Path | None:
    """curves.csv and curves.png: the training loss per step (left) and, per validation, the validation loss and
    each head's score (right: every head on A+V, solid; V from the video head and A from the audio head, the
    Table-3 columns, dashed). validations: [{"step", "epoch", metric key: value}]. Returns the picture."""
    if not train_loss and not validations:
        return None
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for v in validations for k in v if k not in ("step", "epoch")})
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "train/loss", *keys])
        w.writerows([[step, "", f"{loss:.5f}", *[""] * len(keys)] for step, loss in train_loss])
        w.writerows([[v["step"], v["epoch"], "", *(f"{v[k]:.5f}" if k in v else "" for k in keys)]
                     for v in validations])
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    if train_loss:
        steps, losses = zip(*train_loss)
        left.plot(steps, losses, lw=0.6, alpha=0.5, label="train/loss")
        k = max(1, len(losses) // 20)  # a running mean over ~5% of the run, so the trend reads through the noise
        total, end = np.cumsum([0.0, *losses]), np.arange(1, len(losses) + 1)
        start = np.maximum(0, end - k)
        left.plot(steps, (total[end] - total[start]) / (end - start), lw=1.5, color="C0")
    val_loss = [(v["step"], v["val/loss"]) for v in validations if "val/loss" in v]
    if val_loss:
        left.plot(*zip(*val_loss), "o-", color="C3", label="val/loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend(fontsize=8)
    # each head's score on A+V (solid) and the Table-3 unimodal columns (dashed); other tasks: val/score
    last = validations[-1] if validations else {}
    table = cells(last, "val")  # {(head, metric): {inputs: value}}
    metric = next((m for _, m in table), None)
    lines = {f"{head} head, A+V": (metric_key("val", "audio_video", head, m), "o-") for (head, m), row in table.items()
             if m == metric and "audio_video" in row}
    if metric:
        lines["V (video head, audio zeroed)"] = (metric_key("val", "video", "video", metric), "s--")
        lines["A (audio head, video zeroed)"] = (metric_key("val", "audio", "audio", metric), "s--")
    elif "val/score" in last:
        lines["val/score"] = ("val/score", "o-")
    for label, (key, style) in lines.items():
        points = [(v["step"], 100 * v[key]) for v in validations if key in v]
        if points:
            right.plot(*zip(*points), style, ms=3, label=label)
    right.set_xlabel("step")
    right.set_ylabel(f"val {metric or 'score'} (%)")
    right.set_ylim(-2, 102)
    if lines:
        right.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


class TrainingCurves(pl.Callback):
    """`reports/curves.png` (and .csv) at the end of fitting, whatever the logger: the training loss of every step
    and each validation's loss and per-head scores, read from what the task returns and publishes (so a
    `log_every_n_steps` longer than an epoch loses nothing); logged to W&B as an image too."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.train_loss: list[tuple[int, float]] = []
        self.validations: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.train_loss.append((trainer.global_step, float(loss.detach())))

    def on_validation_end(self, trainer, pl_module) -> None:  # after the task's epoch end (eval_result is new)
        result = getattr(pl_module, "eval_result", None)
        if trainer.sanity_checking or result is None or result.stage != "val":
            return
        values = {k: v for k, v in result.scores.items() if k.startswith("val/")}
        if (loss := trainer.callback_metrics.get("val/loss")) is not None:
            values["val/loss"] = float(loss)
        self.validations.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **values})

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "reports")
        path = write_training_curves(out, self.train_loss, self.validations)
        if path is not None:
            log_images(trainer.loggers, [path], "train")

    def state_dict(self) -> dict:  # a resumed run's picture starts where the first part stopped
        return {"train_loss": self.train_loss, "validations": self.validations}

    def load_state_dict(self, state: dict) -> None:
        self.train_loss, self.validations = list(state["train_loss"]), list(state["validations"])
