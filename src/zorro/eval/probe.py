"""Linear probe (Table 3's self-supervised protocol): a linear classifier on frozen features of each output.

    python evaluate.py ckpt_path=.../last.ckpt protocol=linear_probe [probe.epochs=100]

1. Features of every output (audio, video, fusion, global) are extracted with the frozen backbone, for the
   train split (one central view per clip, no augmentation) and the test split (all evaluation views), with
   A+V, A-only and V-only inputs (the other modality zeroed), and saved to `<run dir>/features/{split}.pt`.
2. One linear classifier per output is trained on the A+V train features.
3. Test predictions of the probes are averaged over outputs and over the views of each clip, and reported for
   V / A / A+V inputs like the supervised protocol (`probe/<inputs>/<head>/<metric>`).
Works for any checkpoint (contrastive or supervised): only the backbone is used. Features are extracted by
`trainer.predict` (the trainer's device; under DDP each rank its share, gathered); the heads are trained on
every rank alike from the gathered features, on the trainer's device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

from ..errors import ConfigError
from ..protocol import EVAL_INPUTS, metric_key
from ..tasks.metrics import ClipPredictions, classification_scores

log = logging.getLogger("zorro")


class FeatureExtractor(pl.LightningModule):
    """The frozen backbone's outputs as `trainer.predict` steps, so extraction runs on the trainer's device
    (and precision) and, under DDP, each rank extracts its share of the clips. Wraps the task, so a batch
    gets the task's own device-side preparation (`on_after_batch_transfer`) and forward."""

    def __init__(self, task: pl.LightningModule, inputs=EVAL_INPUTS, zero_input: str = "normalised"):
        super().__init__()
        self.task, self.inputs, self.zero_input = task, tuple(inputs), zero_input

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return self.task.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.task.on_after_batch_transfer(batch, dataloader_idx)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        features = {setting: {name: value.float().cpu() for name, value in
                              self.task(batch, setting, self.zero_input).items()} for setting in self.inputs}
        return {"features": features, "labels": batch["label"].cpu(), "keys": list(batch["key"])}


def extract_features(trainer: pl.Trainer, task, loader, inputs=EVAL_INPUTS, zero_input: str = "normalised") -> dict:
    """{"features": {inputs: {output: N x D}}, "labels": N (x C), "keys": [N]} for every sample of a loader,
    gathered from all ranks (rank order), on the CPU and on every rank."""
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):  # Lightning returns rank 0's part only
        raise ConfigError("linear probe: a spawning strategy (ddp_spawn) cannot return every rank's features; "
                          "use trainer.strategy=ddp")
    parts = trainer.predict(FeatureExtractor(task, inputs, zero_input), dataloaders=loader, return_predictions=True)
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        gathered: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, parts)
        parts = [p for rank_parts in gathered for p in rank_parts]
    return {"features": {i: {n: torch.cat([p["features"][i][n] for p in parts]) for n in parts[0]["features"][i]}
                         for i in inputs},
            "labels": torch.cat([p["labels"] for p in parts]), "keys": [k for p in parts for k in p["keys"]]}


def train_linear(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, multi_label: bool, epochs: int = 100,
                 lr: float = 1e-2, weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0,
                 device: torch.device | str = "cpu") -> torch.nn.Linear:
    """A linear classifier on standardised frozen features (Adam, minibatches moved to `device`); on the CPU."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    head = torch.nn.Linear(x.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    xs = (x - mean) / std
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=g).split(batch_size):
            logits = head(xs[idx].to(device))
            target = y[idx].to(device)
            loss = (F.binary_cross_entropy_with_logits(logits, target.float()) if multi_label
                    else F.cross_entropy(logits, target.long()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    # fold the standardisation into the layer, so the probe applies to raw features
    head = head.cpu()
    with torch.no_grad():
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head


def probe_metrics(train: dict, test: dict, *, num_classes: int, multi_label: bool,
                  **train_kwargs) -> dict[str, float]:
    """One linear classifier per output on the A+V train features; `probe/<inputs>/<head>/<metric>` of the test
    features, averaged over outputs ("avg") and over the views of each clip."""
    heads = {name: train_linear(x, train["labels"], num_classes=num_classes, multi_label=multi_label, **train_kwargs)
             for name, x in train["features"]["audio_video"].items()}
    metrics: dict[str, float] = {}
    for setting, outputs in test["features"].items():
        with torch.no_grad():
            probs = {n: (heads[n](f).sigmoid() if multi_label else heads[n](f).softmax(-1))
                     for n, f in outputs.items() if n in heads}
        probs["avg"] = torch.stack(list(probs.values())).mean(0)
        for name, p in probs.items():
            clips = ClipPredictions()
            clips.update(p, test["labels"], test["keys"])
            scores = classification_scores(*clips.compute(), multi_label=multi_label)
            metrics.update({metric_key("probe", setting, name, k): float(v) for k, v in scores.items()})
    return metrics


def linear_probe(trainer: pl.Trainer, task, train_loader, test_loader, *, num_classes: int, multi_label: bool,
                 out_dir: Path | None = None, zero_input: str = "normalised", **train_kwargs) -> dict[str, float]:
    """The protocol above with `task`'s frozen backbone. Every rank trains the same heads on the same gathered
    features (so every rank returns the metrics); only global rank 0 writes the features."""
    train = extract_features(trainer, task, train_loader, inputs=("audio_video",))
    test = extract_features(trainer, task, test_loader, zero_input=zero_input)
    if out_dir is not None and trainer.is_global_zero:
        (out_dir / "features").mkdir(parents=True, exist_ok=True)
        torch.save(train, out_dir / "features" / "train.pt")
        torch.save(test, out_dir / "features" / "test.pt")
    return probe_metrics(train, test, num_classes=num_classes, multi_label=multi_label,
                         device=trainer.strategy.root_device, **train_kwargs)
