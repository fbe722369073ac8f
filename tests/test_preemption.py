"""Preemption: SIGTERM a real training process mid-epoch -> a checkpoint within 30 s, a one-line message, exit 143;
re-running the same command with ckpt_path=auto resumes; interrupted + resumed batches equal an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zorro.preemption import EXIT_CODE

from .conftest import ROOT, run_script
from .data.conftest import make_clips, write_shards
from .keylog import read


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt_shards")
    clips = make_clips("tr", 12)
    write_shards(root, {"train": [clips[0:4], clips[4:8], clips[8:12]], "val": [make_clips("va", 3)]})
    return root


def train_args(shards, run_dir, log, workers, *extra):
    return [ROOT / "train.py", "model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={shards}",
            f"data.num_workers={workers}", "data.batch_size=2", "data.shuffle_buffer=4", "trainer.max_epochs=2",
            "test=false", "ckpt_path=auto", f"hydra.run.dir={run_dir}",
            "+callbacks.keylog._target_=tests.keylog.KeyLog", f"+callbacks.keylog.path={log}", *extra]


def start_paused(args, log, *, env=None, new_session=False) -> subprocess.Popen:
    """train.py with `+callbacks.keylog.pause_at_step=N` in `args`, returned once the KeyLog callback has paused
    there (`<log>.paused`), so a signal lands mid-epoch at a known step. new_session: its own process group (a
    signal to the whole group, as SLURM / Kubernetes send it, data-loader workers included)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})
    deadline = time.time() + 300
    while not Path(f"{log}.paused").exists():
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL) if new_session else proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"train.py did not reach its pause (exit {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.2)
    return proc


def batches(rows):
    return [(r["epoch"], r["step"], r["keys"], round(r["video"], 3), round(r["audio"], 3)) for r in rows]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_then_auto_resume_sees_the_same_batches(shards, tmp_path, workers):
    run_script(*train_args(shards, tmp_path / "full", tmp_path / "full.jsonl", workers))
    full = read(tmp_path / "full.jsonl")
    per_epoch = sum(r["epoch"] == 0 for r in full)
    assert per_epoch >= 4 and len(full) == 2 * per_epoch
    stop = per_epoch + 1  # the second batch of the second epoch

    run_dir, log = tmp_path / "run", tmp_path / "run.jsonl"
    args = train_args(shards, run_dir, log, workers)
    proc = start_paused([*args, f"+callbacks.keylog.pause_at_step={stop}"], log, new_session=True)
    try:
        sent = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        ckpt = run_dir / "checkpoints" / "preempted.ckpt"
        while not ckpt.exists() and time.time() < sent + 30:
            time.sleep(0.1)
        assert ckpt.exists(), "no checkpoint within 30 s of SIGTERM"
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_CODE, err[-3000:]
    assert f"Stopped by SIGTERM in epoch 1 after batch {stop - per_epoch + 1}" in err, err[-3000:]
    assert "ckpt_path=auto" in err
    assert "Traceback" not in err, err[-3000:]
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 1 and saved["global_step"] == stop + 1  # the signalled step was finished and kept

    resumed = run_script(*args)  # the same command again
    rows = read(log)
    assert [r["step"] for r in rows] == list(range(len(full)))  # resumed right after the last finished step
    assert batches(rows) == batches(full), resumed.stderr[-2000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == len(full)


def test_sigusr1_is_an_early_sigterm(shards, tmp_path):
    """Outside SLURM's auto-requeue (which handles SIGUSR1 itself) SIGUSR1 stops the run the same way."""
    log = tmp_path / "run.jsonl"
    proc = start_paused([*train_args(shards, tmp_path / "run", log, 0), "+callbacks.keylog.pause_at_step=2"], log)
    try:
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_CODE and "Stopped by SIGUSR1 in epoch 0 after batch 3" in err, err[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "preempted.ckpt", weights_only=False)["global_step"] == 3


def test_under_slurm_usr1_requeues_and_sigterm_checkpoints(shards, tmp_path):
    """trainer=slurm in a fake SLURM job (its environment variables, an `scontrol` that records its arguments):
    Lightning's auto-requeue answers USR1 with hpc_ckpt_1.ckpt and `scontrol requeue JOB`; the SIGTERM with which
    SLURM then stops the job writes preempted.ckpt, the newest checkpoint that ckpt_path=auto resumes from."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "zorro", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
             "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir, log = tmp_path / "run", tmp_path / "run.jsonl"
    args = [*train_args(shards, run_dir, log, 0), "trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.precision=32-true", "+callbacks.keylog.pause_at_step=2"]
    proc = start_paused(args, log, env=slurm)
    try:
        deadline = time.time() + 300
        proc.send_signal(signal.SIGUSR1)
        while not (tmp_path / "scontrol.log").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
        assert (run_dir / "hpc_ckpt_1.ckpt").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_CODE and "Stopped by SIGTERM in epoch 0 after batch 3" in err, err[-3000:]
    preempted = run_dir / "checkpoints" / "preempted.ckpt"
    assert preempted.stat().st_mtime >= (run_dir / "hpc_ckpt_1.ckpt").stat().st_mtime
