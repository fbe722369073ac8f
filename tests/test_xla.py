"""The XLA path (torch_xla on XLA:CPU). Runs only in the TPU environment: `make test-xla`."""

import math
import os

import pytest

torch_xla = pytest.importorskip("torch_xla", reason="torch_xla lives in its own environment (make install-tpu)")

from .conftest import compose_cfg  # noqa: E402


@pytest.mark.parametrize("task", ["supervised", "contrastive"])
def test_training_steps_run_under_xla(task, tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", os.environ.get("PJRT_DEVICE", "CPU"))
    from zorro.xla import xla_train_steps

    cfg = compose_cfg(overrides=["debug=tiny", f"task={task}", "logger=none", "data.batch_size=4"],
                      output_dir=tmp_path)
    losses = xla_train_steps(cfg, steps=3)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
