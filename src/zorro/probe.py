"""Linear probe (Table 3's self-supervised protocol): a linear classifier on frozen features of each output.

    python evaluate.py ckpt_path=.../last.ckpt protocol=linear_probe [probe.epochs=100]

1. Features of every output (audio, video, fusion, global) are extracted with the frozen backbone, for the
   train split (one central view per clip, no augmentation) and the test split (all evaluation views), with
   A+V, A-only and V-only inputs (the other modality zeroed), and saved to `<run dir>/features/{split}.pt`.
2. One linear classifier per output is trained on the A+V train features.
3. Test predictions of the probes are averaged over outputs and over the views of each clip, and reported for
   V / A / A+V inputs like the supervised protocol (`probe/<inputs>/<head>/<metric>`).
Works for any checkpoint (contrastive or supervised): only the backbone is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .tasks import EVAL_INPUTS
from .tasks.base import model_inputs
from .tasks.metrics import ClipPredictions, classification_scores

log = logging.getLogger("zorro")


@torch.no_grad()
def extract_features(backbone, loader, inputs=EVAL_INPUTS, zero_input: str = "normalised") -> dict:
    """{"features": {inputs: {output: N x D}}, "labels": N (x C), "keys": [N]} for every sample of a loader."""
    backbone.eval()
    feats = {i: {} for i in inputs}
    labels, keys = [], []
    for batch in loader:
        for setting in inputs:
            out = backbone(**model_inputs(batch, setting, zero_input))
            for name, value in out.items():
                feats[setting].setdefault(name, []).append(value.float())
        labels.append(batch["label"])
        keys += list(batch["key"])
    return {"features": {i: {n: torch.cat(v) for n, v in f.items()} for i, f in feats.items()},
            "labels": torch.cat(labels), "keys": keys}


def train_linear(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, multi_label: bool, epochs: int = 100,
                 lr: float = 1e-2, weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0) -> torch.nn.Linear:
    """A linear classifier on standardised frozen features (Adam, minibatches)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    xs = (x - mean) / std
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=g).split(batch_size):
            logits = head(xs[idx])
            loss = (F.binary_cross_entropy_with_logits(logits, y[idx].float()) if multi_label
                    else F.cross_entropy(logits, y[idx].long()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    # fold the standardisation into the layer, so the probe applies to raw features
    with torch.no_grad():
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head


def linear_probe(backbone, train_loader, test_loader, *, num_classes: int, multi_label: bool,
                 out_dir: Path | None = None, zero_input: str = "normalised", **train_kwargs) -> dict[str, float]:
    train = extract_features(backbone, train_loader, inputs=("audio_video",))
    test = extract_features(backbone, test_loader, zero_input=zero_input)
    if out_dir is not None:
        (out_dir / "features").mkdir(parents=True, exist_ok=True)
        torch.save(train, out_dir / "features" / "train.pt")
        torch.save(test, out_dir / "features" / "test.pt")
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
            metrics.update({f"probe/{setting}/{name}/{k}": float(v) for k, v in scores.items()})
    return metrics
