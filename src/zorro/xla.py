"""Training steps of any configured model and task under torch_xla, without Lightning's Trainer.

Lightning's XLA accelerator refuses XLA:CPU, so this runs the very same model, task and loss code on an XLA
device with a plain loop: `PJRT_DEVICE=CPU` tests the XLA path anywhere, `PJRT_DEVICE=TPU` runs on a TPU.
torch_xla 2.9 needs torch 2.9, so it lives in its own environment (`make install-tpu`, `make test-xla`):

    PJRT_DEVICE=CPU .venv-tpu/bin/python -m zorro.xla debug=tiny +steps=3

On a real TPU, train with Lightning instead: `.venv-tpu/bin/python train.py trainer=tpu ...`.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from .run import build_task


def xla_train_steps(cfg: DictConfig, steps: int = 3) -> list[float]:
    """Run `steps` optimiser steps on the XLA device; returns the losses."""
    import torch_xla

    device = torch_xla.device()
    datamodule, task = build_task(cfg)
    task = task.to(device).train()
    optimizer = task.optimizer_factory(task.parameters())
    losses = []
    for _, batch in zip(range(steps), datamodule.train_dataloader()):
        loss, _ = task.compute_loss(task.device_batch(batch))  # the batch hooks Lightning would run
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch_xla.sync()  # cut the lazy graph: one compiled step per iteration
        losses.append(float(loss.detach().cpu()))
    return losses


def main(argv: list[str] | None = None) -> int:
    import os
    from pathlib import Path

    overrides = list(sys.argv[1:] if argv is None else argv)
    steps = 3
    for o in list(overrides):
        if o.startswith("+steps=") or o.startswith("steps="):
            steps = int(o.split("=", 1)[1])
            overrides.remove(o)
    conf = Path(os.environ.get("ZORRO_CONF", Path(__file__).resolve().parents[2] / "conf"))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "paths.output_dir=.", "logger=none"])
    losses = xla_train_steps(cfg, steps)
    print("xla losses: " + ", ".join(f"{x:.4f}" for x in losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
