"""A test callback for train.py subprocesses: `+callbacks.keylog._target_=tests.keylog.KeyLog
+callbacks.keylog.path=FILE` (RANK in FILE: the global rank) appends one JSON line per training batch (rank,
epoch, step, clip keys, a pixel and an audio checksum), so tests can compare what each rank trained on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl


class KeyLog(pl.Callback):
    def __init__(self, path: str, pause_at_step: int | None = None, pause_s: float = 120.0):
        # pause_at_step: wait there (polling) until the trainer got SIGTERM, so a test can signal mid-epoch at a
        # known step; the pause ends by itself after pause_s.
        self.path, self.pause_at_step, self.pause_s = path, pause_at_step, pause_s

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # (a modality that no clip of the batch has arrives as None: data.batch.mark_absent)
        checksum = {m: 0.0 if batch.get(m) is None else float(batch[m].float().abs().sum()) for m in ("audio", "video")}
        row = {"rank": trainer.global_rank, "epoch": trainer.current_epoch, "step": trainer.global_step,
               "keys": list(batch["key"]), **checksum}
        path = Path(self.path.replace("RANK", str(trainer.global_rank)))
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.pause_at_step is not None and trainer.global_step == self.pause_at_step:
            (path.parent / f"{path.name}.paused").touch()
            deadline = time.time() + self.pause_s
            while not trainer.received_sigterm and time.time() < deadline:
                time.sleep(0.05)


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
