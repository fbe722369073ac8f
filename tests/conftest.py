import os
import socket
import subprocess
import sys
import time
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(proc: subprocess.Popen, port: int, timeout: float, why=lambda: "") -> None:
    """Until the server `proc` started accepts connections on 127.0.0.1:port; fails (with `why()`) if it exits or
    `timeout` seconds pass."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None and time.time() < deadline, why()
            time.sleep(0.1)


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


# -- real encoded media, made once per test session ---------------------------------------------------------
DEMO_CLIPS = 16  # 4 per class: every split gets every class (make_demo assigns splits per class)
PREP_ARGS = ["--short-side", "48", "--sample-rate", "16000", "--max-samples-per-shard", "3", "--quiet"]


@pytest.fixture(scope="session")
def demo_videos(tmp_path_factory):
    from data_prep.make_demo import make_demo

    out = tmp_path_factory.mktemp("videos")
    labels = make_demo(out, num_clips=DEMO_CLIPS, seed=0, seconds=1.6, width=64, height=48)
    return out, labels


@pytest.fixture(scope="session")
def demo_shards(demo_videos, tmp_path_factory):
    videos, labels = demo_videos
    out = tmp_path_factory.mktemp("shards")
    run_script("-m", "data_prep", "--videos", videos, "--labels", labels, "--out", out, "--workers", "2", *PREP_ARGS)
    return out
