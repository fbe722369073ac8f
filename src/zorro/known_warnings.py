"""The library warnings every run printed that say nothing about the run, silenced here and only here (each with
why it is harmless); any other warning still prints. install() is idempotent and imports none of the libraries."""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, category, module regex, why it is harmless)
WARNINGS = [
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, "",
     "Lightning 2.6's own pytree helper calls the torch API torch 2.11 deprecates; nothing for a user to change"),
    (r"Your `IterableDataset` has `__len__` defined", UserWarning, "",
     "the shard stream's __len__ is exact per rank and worker (zorro.data.stream.ShardStream: each slot yields the "
     "same whole number of batches), which is what the warning asks for"),
    (r"You have overridden `on_(before|after)_batch_transfer` in `LightningModule` but have passed in a "
     r"`LightningDataModule`", UserWarning, "",
     "the task's batch hooks are the batch contract (zorro.data.batch) and are meant to run instead of the "
     "data module's, which defines none"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning, "",
     "zorro.callbacks.LogEveryEpoch lowers log_every_n_steps to the epoch's length right after this is printed"),
]

# (logger name, message regex, why)
LOG_LINES = [
    ("lightning.pytorch.utilities.rank_zero", r"Tip: For seamless cloud logging.*litlogger",
     "an advertisement for another logging service, printed at every Trainer construction"),
    ("lightning.fabric.utilities.rank_zero", r"Tip: For seamless cloud logging.*litlogger", "the same, via Fabric"),
]


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


_installed = False


def install() -> None:
    """Silence WARNINGS and LOG_LINES in this process (train/evaluate/predict call it before building a run)."""
    global _installed
    if _installed:
        return
    _installed = True
    for message, category, module, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in LOG_LINES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))


def wandb_init_kwargs(kwargs: dict) -> dict:
    """W&B 0.2x prints "The anonymous setting has no effect and will be removed" whenever `anonymous` is passed,
    and Lightning's WandbLogger always passes it (None unless anonymous=True): drop it when it is None, which is
    what W&B does with it anyway."""
    if kwargs.get("anonymous", "") is None:
        kwargs = {k: v for k, v in kwargs.items() if k != "anonymous"}
    return kwargs
