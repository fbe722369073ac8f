"""Preemption: a signal at any moment of training -> a checkpoint, a one-line message, exit 143 within a bounded time;
re-running the same command with ckpt_path=auto resumes, and the interrupted + resumed run ends with the weights
(torch.equal) and validations of an uninterrupted one. Signals land at named moments (tests/signal_at.py), or at a
step where the KeyLog callback pauses. The full matrix (every moment x 0 / 2 loader workers) is marked slow."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zorro.preemption import EXIT_CODE, AtomicCheckpointIO, newest_checkpoint
from zorro.run import build, train

from .conftest import ROOT, compose_cfg, run_script
from .data.conftest import make_clips, write_shards
from .keylog import read
from .signal_at import MOMENTS, validations


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


def assert_same_weights(run_dir, reference_dir):
    """The last.ckpt weights of two runs are equal, tensor by tensor (torch.equal: bit for bit)."""
    ours, theirs = (torch.load(Path(d) / "checkpoints" / "last.ckpt", weights_only=False) for d in (run_dir, reference_dir))
    assert ours["global_step"] == theirs["global_step"] and ours["epoch"] == theirs["epoch"]
    differ = [k for k, v in theirs["state_dict"].items() if not torch.equal(ours["state_dict"][k], v)]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


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
    assert_same_weights(run_dir, tmp_path / "full")  # the resumed steps drew the same random numbers (StepSeed)


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


# -- a signal at a named moment (tests/signal_at.py), training in this process ---------------------------------
def moment_cfg(shards, out, workers, moment=None, epoch=0):
    """A 2-epoch run of the tiny model on the module's shards (0 workers: 6 training batches per epoch, 2 validation
    batches) with ckpt_path=auto; SignalAt sends SIGTERM once at `moment` of `epoch` and logs every validation."""
    signal_at = [f"+callbacks.signal.moment={moment}", f"+callbacks.signal.epoch={epoch}"] if moment else []
    return compose_cfg(overrides=[
        "model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={shards}", f"data.num_workers={workers}",
        "data.batch_size=2", "data.shuffle_buffer=4", "data.eval_windows=1", "data.eval_crops=1",
        "trainer.max_epochs=2", "test=false", "ckpt_path=auto", "progress=none",
        "+callbacks.signal._target_=tests.signal_at.SignalAt", f"+callbacks.signal.once={out}/signal.sent",
        f"+callbacks.signal.log={out}/validations.jsonl", *signal_at], output_dir=out)


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """The reference run for each number of loader workers, trained once per module."""
    runs = {}

    def get(workers):
        if workers not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted{workers}")
            train(moment_cfg(shards, out, workers))
            runs[workers] = out
        return runs[workers]

    return get


def interrupt_and_resume(shards, out, workers, moment, epoch=0, before_resume=None) -> bool:
    """Train until SignalAt stops the run at `moment` (SystemExit 143), then run the same config again
    (ckpt_path=auto). Returns whether the signal was sent."""
    with pytest.raises(SystemExit) as stopped:
        train(moment_cfg(shards, out, workers, moment, epoch))
    assert stopped.value.code == EXIT_CODE
    if before_resume:
        before_resume(out)
    resumed = moment_cfg(shards, out, workers, moment, epoch)
    train(resumed)
    return (out / "signal.sent").exists()


def assert_same_validations(run_dir, reference_dir):
    """Every epoch was validated, with the uninterrupted run's metrics (a validation cut short runs again)."""
    by_epoch = {v["epoch"]: v for v in validations(Path(run_dir) / "validations.jsonl")}  # the last one of each
    assert by_epoch == {v["epoch"]: v for v in validations(Path(reference_dir) / "validations.jsonl")}


def test_sigterm_at_epoch_end_resumes_exactly_past_a_truncated_checkpoint(shards, uninterrupted, tmp_path, caplog):
    """SIGTERM at the end of an epoch (before last.ckpt is written): the checkpoint says that epoch is done and the
    next one starts on its own samples. A newer checkpoint cut short (a kill mid-write, a full disk) is skipped by
    ckpt_path=auto with one line. The resumed run's weights equal the uninterrupted run's, bit for bit."""
    def truncated_newest(out):
        whole = (out / "checkpoints" / "preempted.ckpt").read_bytes()
        (out / "checkpoints" / "epoch=0-step=6.ckpt").write_bytes(whole[: len(whole) // 2])

    interrupt_and_resume(shards, tmp_path, 0, "epoch_end", before_resume=truncated_newest)
    skipped = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(skipped) == 1 and "epoch=0-step=6.ckpt" in skipped[0] and "preempted.ckpt" in skipped[0], skipped
    assert_same_weights(tmp_path, uninterrupted(0))
    assert_same_validations(tmp_path, uninterrupted(0))


def start_signalled(args, **env) -> subprocess.Popen:
    """train.py in its own session (SignalAt with group=true signals its whole process group)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", **env})


def finish(proc, timeout) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    leftover = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the stopped run still alive: {leftover}"
    return err


@pytest.mark.parametrize("moment", ["validation", pytest.param("sanity", marks=pytest.mark.slow)])
def test_sigterm_in_validation_with_workers_exits_in_bounded_time(shards, tmp_path, moment):
    """SIGTERM to the process group (2 loader workers) during validation or the sanity check: the stop line and
    the exit within 60 s (after a validation, its checkpoint); no loader worker is left behind. (Before, the
    workers ignored SIGTERM and the exit waited on them forever.)"""
    run_dir = tmp_path / "run"
    args = [*train_args(shards, run_dir, tmp_path / "keys.jsonl", 2), "progress=none", "data.eval_windows=1",
            "data.eval_crops=1", "+callbacks.signal._target_=tests.signal_at.SignalAt",
            f"+callbacks.signal.moment={moment}", "+callbacks.signal.group=true",
            f"+callbacks.signal.once={tmp_path}/signal.sent"]
    proc = start_signalled(args)
    deadline = time.time() + 300
    while not (tmp_path / "signal.sent").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    err = finish(proc, timeout=60)
    assert proc.returncode == EXIT_CODE, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if moment == "sanity":
        assert "Stopped by SIGTERM in the sanity check, before training: no new checkpoint" in err, err[-3000:]
        assert not (run_dir / "checkpoints").exists()
        return
    assert "Stopped by SIGTERM in epoch 0's validation (global step 4; it runs again on resume)" in err, err[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "preempted.ckpt", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["current"]["completed"] == 0


@pytest.mark.slow
def test_a_stop_that_hangs_exits_after_stop_timeout(shards, tmp_path):
    """A step that never finishes after the signal (a loader waiting on a stalled read): the stop clock exits with
    143 and one line after callbacks.preemption.stop_timeout_s, without a checkpoint."""
    args = [*train_args(shards, tmp_path / "run", tmp_path / "keys.jsonl", 2), "progress=none",
            "callbacks.preemption.stop_timeout_s=5", "+callbacks.signal._target_=tests.signal_at.SignalAt",
            "+callbacks.signal.moment=step", "+callbacks.signal.group=true", "+callbacks.signal.hang_s=600",
            f"+callbacks.signal.once={tmp_path}/signal.sent"]
    proc = start_signalled(args)
    deadline = time.time() + 300
    while not (tmp_path / "signal.sent").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    sent = time.time()
    err = finish(proc, timeout=60)
    assert proc.returncode == EXIT_CODE and time.time() - sent < 30, err[-3000:]
    assert "Stop by SIGTERM not done within 5 s" in err, err[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "preempted.ckpt").exists()


def test_readme_resume_command_rebuilds_the_run_from_the_checkpoint(uninterrupted, tmp_path):
    """README: `python train.py ckpt_path=<run>/checkpoints/last.ckpt` (here with one more epoch) rebuilds the run from
    the checkpoint's config (tiny model, shards) instead of the default ViT-B on synthetic data, and says which
    values came from the command line."""
    last = uninterrupted(0) / "checkpoints" / "last.ckpt"
    proc = run_script(ROOT / "train.py", f"ckpt_path={last}", "trainer.max_epochs=3", f"paths.log_dir={tmp_path}")
    out = proc.stdout + proc.stderr
    assert f"resuming {last} with the run's config from the checkpoint; from the command line: trainer.max_epochs=3" \
        in out, out[-3000:]
    [new] = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")  # the run's new folder, logs/runs/<date>/<time>
    resumed = torch.load(new, weights_only=False)
    before = torch.load(last, weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == before["global_step"] * 3 // 2
    assert resumed["hyper_parameters"]["config"]["model"] == before["hyper_parameters"]["config"]["model"]


@pytest.mark.slow
def test_resume_from_the_run_folder_alone(uninterrupted, tmp_path):
    """`python train.py hydra.run.dir=<run> ckpt_path=auto`: the newest checkpoint of that folder, its config."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted(0), run_dir)
    proc = run_script(ROOT / "train.py", f"hydra.run.dir={run_dir}", "ckpt_path=auto", "trainer.max_epochs=3")
    out = proc.stdout + proc.stderr
    assert f"resuming {run_dir / 'checkpoints' / 'last.ckpt'} with the run's config from the checkpoint; from the " \
           "command line: trainer.max_epochs=3" in out, out[-3000:]
    assert "new checkpoints go to" not in out
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 18


def test_no_validation_split_says_so_and_tests_the_last_weights(tmp_path, caplog, recwarn):
    """Shards with train and test splits only: one line at the start says there is no validation and names the
    checkpoint the test uses (last.ckpt); no best-*.ckpt, no Lightning warning about the monitored key."""
    root = tmp_path / "shards"
    write_shards(root, {"train": [make_clips("tr", 4)], "test": [make_clips("te", 2)]})
    out = tmp_path / "run"
    metrics = train(compose_cfg(overrides=[
        "model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={root}", "data.num_workers=0",
        "data.batch_size=2", "data.eval_windows=1", "data.eval_crops=1", "trainer.max_epochs=1", "progress=none"],
        output_dir=out))
    lines = [r.getMessage() for r in caplog.records if "validation" in r.getMessage()]
    assert any("no validation split" in m and str(out / "checkpoints" / "last.ckpt") in m for m in lines), lines
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    assert "test/score" in metrics


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails midway (a kill, a full disk) leaves the previous checkpoint whole and no partial file; the
    trainers train.py builds write through it."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def torn(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    _, _, trainer = build(compose_cfg(overrides=["debug=tiny", "logger=none"], output_dir=tmp_path / "run"))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_newest_checkpoint_skips_one_that_cannot_be_read(tmp_path, caplog):
    older, newer = tmp_path / "last.ckpt", tmp_path / "preempted.ckpt"
    torch.save({"state_dict": {}}, older)
    torch.save({"state_dict": {"w": torch.ones(1000)}}, newer)
    os.utime(older, (1, 1))
    newer.write_bytes(newer.read_bytes()[:300])
    assert newest_checkpoint([tmp_path]) == str(older)
    assert len(caplog.records) == 1 and "preempted.ckpt, which cannot be read" in caplog.records[0].getMessage()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("moment", MOMENTS)
def test_resume_is_exact_at_every_moment(shards, uninterrupted, tmp_path, moment, workers):
    """A SIGTERM (to the process and its loader workers) at each moment of epoch 0: mid-step, during the epoch's
    last step, in the sanity check, in validation, at its end, at the epoch's end, while last.ckpt is written; the
    resumed run ends with the uninterrupted run's weights and validations."""
    assert interrupt_and_resume(shards, tmp_path, workers, moment), "no signal was sent"
    assert_same_weights(tmp_path, uninterrupted(workers))
    assert_same_validations(tmp_path, uninterrupted(workers))
