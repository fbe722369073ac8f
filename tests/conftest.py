import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_cfg(config_name: str = "train", overrides=(), output_dir=None):
    """Compose a config like the command line would (without running Hydra's app)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
        return compose(config_name=config_name, overrides=[*overrides, *extra])


def run_script(*args, cwd=ROOT, timeout=600, check=True, env=None):
    """Run train.py / evaluate.py as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a seconds-long CPU run that writes below tmp_path."""
    return ["debug=tiny", "logger=none", f"paths.log_dir={tmp_path}"]
