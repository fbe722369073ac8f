"""The optimisation recipe's arithmetic: the LR schedule and the paper's LR scaling with the global batch
(task.lr_reference_batch). BaseTask.configure_optimizers reads them."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch


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
        raise ValueError("task.lr_reference_batch needs the data's batch size; "
                         f"{type(datamodule).__name__} has no batch_size")
    return sizes.pop()


def scaled_lr(lr: float, *, global_batch: int, reference_batch: int | None) -> float:
    """The paper's learning-rate scaling with the batch: lr x global_batch / reference_batch (None: unscaled)."""
    return lr if not reference_batch else lr * global_batch / reference_batch
