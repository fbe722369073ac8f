"""End to end: Hydra -> train.py / evaluate.py on CPU with the tiny model."""

import csv
import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hydra.utils import get_class

from zorro.run import evaluate, train

from .conftest import ROOT, compose_cfg, run_script

MASKINGS = ["zorro", "two_streams", "input_level", "bottleneck"]


def fast_dev_run(tmp_path, monkeypatch, *overrides):
    """train() for one training and one validation batch; returns (metrics, task, parameters before the step)
    after checking what every such run must do: one optimiser step with a finite loss that moved the backbone
    and the heads, validation scored, metrics.json written to the run directory."""
    import zorro.run as run

    real, seen = run.build, {}

    def build(cfg):
        datamodule, task, trainer = real(cfg)
        seen.update(task=task, trainer=trainer, before={n: p.detach().clone() for n, p in task.named_parameters()})
        return datamodule, task, trainer

    monkeypatch.setattr(run, "build", build)
    metrics = train(compose_cfg(overrides=["debug=tiny", "trainer.fast_dev_run=true", *overrides],
                                output_dir=tmp_path))
    task, before = seen["task"], seen["before"]
    assert seen["trainer"].global_step == 1 and math.isfinite(metrics["train/loss"])
    moved = {n.split(".")[0] for n, p in task.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "backbone" in moved and moved - {"backbone"}, moved  # the backbone and its heads / projectors
    assert math.isfinite(metrics["val/score"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["train/loss"] == pytest.approx(metrics["train/loss"])
    return metrics, task


@pytest.mark.parametrize("task", ["supervised", "contrastive"])
@pytest.mark.parametrize("masking", MASKINGS)
def test_fast_dev_run_every_masking_and_task(masking, task, tmp_path, monkeypatch):
    _, built = fast_dev_run(tmp_path, monkeypatch, f"masking={masking}", f"task={task}")  # task.loss=auto: eq. 2
    assert built.backbone.routing.name == masking                                   # where eq. 3 cannot run


@pytest.mark.parametrize("task", ["supervised", "contrastive"])
@pytest.mark.parametrize("model", ["zorro_swin_tiny", "zorro_hip_tiny", "mbt_tiny", "cav_mae_tiny"])
def test_fast_dev_run_every_backbone_and_task(model, task, tmp_path, monkeypatch):
    _, built = fast_dev_run(tmp_path, monkeypatch, f"model={model}", f"task={task}")
    assert type(built.backbone) is get_class(compose_cfg(overrides=[f"model={model}"]).model._target_)


def test_progress_outside_a_terminal_is_one_line_per_n_steps(tmp_path, capfd, monkeypatch):
    """Under pytest stderr is not a TTY, so progress=auto prints lines: 4 training batches, every 2 -> 2 lines per
    epoch, which say the epoch of how many and the fit's ETA, a line at the end of each validation and of the
    test, and no carriage-return bar updates. log_every_n_steps=10 against these 4-step epochs still logs
    train/loss every epoch."""
    train(_tiny(tmp_path, "trainer.max_epochs=2", "progress_every_n_steps=2", "logger=csv",
                "trainer.log_every_n_steps=10"))
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if re.match(r"(epoch \d+/\d+  |test done)", line)]
    assert "\r" not in out + err and len(lines) == 7, lines
    assert re.fullmatch(r"epoch 1/2  step 2/4  train/loss \d+\.\d{3}  \d+\.\d it/s  eta \d+:\d\d", lines[0])
    assert lines[1].startswith("epoch 1/2  step 4/4  train/loss ")
    assert re.fullmatch(r"epoch 1/2  validation done  val/loss \S+  val/num_clips 32  val/score \S+", lines[2])
    assert lines[4].startswith("epoch 2/2  step 4/4  train/loss ") and lines[4].endswith("  eta 0:00")
    assert lines[6].startswith("test done  test/loss ")
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/*/metrics.csv")))))
    assert {int(r["epoch"]) for r in rows if r.get("train/loss")} == {0, 1}, rows
    from zorro.callbacks import LineProgressBar, TQDMBar, progress_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    enabled, (bar,) = progress_bar("auto")
    assert enabled and isinstance(bar, TQDMBar)  # a terminal: Lightning's tqdm bars (with evaluation totals)
    monkeypatch.setenv("CI", "true")
    enabled, (bar,) = progress_bar("auto", 7)
    assert enabled and isinstance(bar, LineProgressBar) and bar.every_n_steps == 7  # CI: lines, terminal or not
    assert progress_bar("none") == (False, [])


def _tiny(tmp_path, *extra):
    return compose_cfg(overrides=["debug=tiny", "logger=none", *extra], output_dir=tmp_path)


def test_train_then_evaluate_reproduces_the_validation_metric(tmp_path):
    cfg = _tiny(tmp_path / "run", "trainer.max_epochs=2", "test=false")
    train(cfg)
    best = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    best_score = float(torch.load(best, weights_only=False)["callbacks"][
        next(k for k in torch.load(best, weights_only=False)["callbacks"] if k.startswith("ModelCheckpoint"))][
        "best_model_score"])
    eval_cfg = compose_cfg("evaluate", overrides=[f"ckpt_path={best}", "split=val"], output_dir=tmp_path / "eval")
    metrics = evaluate(eval_cfg)
    assert metrics["val/score"] == pytest.approx(best_score, abs=1e-6)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (tmp_path / "eval" / "reports" / "test").exists() is False  # validation split: no test reports
    # zorro's unimodal settings score the isolated own heads with the other stream dropped (unimodal_eval=auto)
    assert {"val/audio_video/avg/top1", "val/audio/audio/top1", "val/video/video/top1"} <= set(saved)
    assert "val/audio/avg/top1" not in saved and saved["eval_settings"]["dropped_stream"] == "audio,video"


def test_kill_and_resume_continues_the_same_run(tmp_path):
    """SIGKILL a real training process after its first checkpoint, then resume from last.ckpt."""
    run_dir = tmp_path / "run"
    args = [ROOT / "train.py", "debug=tiny", "logger=csv", f"hydra.run.dir={run_dir}", "trainer.max_epochs=200",
            "data.num_train=32", "data.num_val=16", "test=false"]
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not (last.exists() and torch.load(last, weights_only=False)["epoch"] >= 1):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = torch.load(last, weights_only=False)
    epoch, step = killed["epoch"], killed["global_step"]
    assert epoch >= 1 and step > 0

    resumed_dir = tmp_path / "resumed"
    run_script(ROOT / "train.py", "debug=tiny", "logger=csv", f"hydra.run.dir={resumed_dir}", f"ckpt_path={last}",
               f"trainer.max_epochs={epoch + 3}", "data.num_train=32", "data.num_val=16", "test=false")
    final = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    steps_per_epoch = step // (epoch + 1)
    assert final["epoch"] == epoch + 2, (epoch, step, final["epoch"], final["global_step"])  # continued, not restarted
    assert final["global_step"] == step + 2 * steps_per_epoch


@pytest.mark.ddp
def test_ddp_two_cpu_processes(tmp_path):
    for task in ("supervised", "contrastive"):
        run_script(ROOT / "train.py", "debug=tiny", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   "trainer.strategy=ddp_spawn", "trainer.sync_batchnorm=false", "trainer.precision=32-true",
                   "trainer.max_epochs=1", "data.num_train=32", "data.num_val=16", "test=false", f"task={task}",
                   f"hydra.run.dir={tmp_path / task}", "logger=csv")
        assert (tmp_path / task / "checkpoints" / "last.ckpt").exists()
    metrics = list(csv.DictReader(open(next((tmp_path / "contrastive").glob("csv/*/metrics.csv")))))
    pairs = {float(r["train/pairs"]) for r in metrics if r.get("train/pairs")}
    assert pairs == {32.0}  # 2 processes x batch 16: every rank's loss saw both ranks' clips as negatives


def test_masking_sweep_multirun(tmp_path):
    proc = run_script(ROOT / "train.py", "-m", "masking=zorro,two_streams,input_level,bottleneck", "debug=tiny",
                      "trainer.max_epochs=1", "data.num_train=16", "data.num_val=16", "data.num_test=16",
                      f"hydra.sweep.dir={tmp_path}", "logger=wandb", env={"WANDB_MODE": "offline"})
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    # named by the swept key only (the rest is in each job's .hydra/overrides.yaml)
    assert jobs == [f"{i}_masking-{m}" for i, m in enumerate(MASKINGS)], (jobs, proc.stdout[-2000:])
    check_wandb_runs_per_job(tmp_path, "masking")
    for job in jobs:  # every run leaves its reports for people without W&B
        assert (tmp_path / job / "reports" / "test" / "confusion_matrix.png").exists()
    assert "sweep report" in proc.stdout and "| masking | V top1 | A top1 | A+V top1 |" in proc.stdout  # one command
    report = run_script("-m", "zorro.eval.sweep_report", tmp_path).stdout  # the Table 3 layout, again from the directory
    table, captions = report.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0] == "| masking | V top1 | A top1 | A+V top1 |" and len(lines) == 2 + 4
    assert {line.split("|")[1].strip() for line in lines[2:]} == set(MASKINGS)
    # the choices behind the columns are named: own heads, zeroing at the normalised input, the dropped stream
    assert "V = video head, A = audio head" in captions and "normalised model input" in captions
    assert "computed with the other stream left out" in captions  # zorro / two_streams: the fast exact path
    assert (tmp_path / "report.csv").exists()
    # a log for files: progress as lines (no \r), and Lightning's lines once each (not also through its own handler)
    log = proc.stdout + proc.stderr
    assert "\r" not in log and "step" in log
    assert log.count("GPU available: False") == 4, log[-3000:]
    # the known-harmless library warnings (zorro.known_warnings) are not printed; W&B's run of another job is
    # never reused
    for noise in ("LeafSpec", "litlogger", "anonymous setting", "on_before_batch_transfer", "already in progress"):
        assert noise not in log, noise


def wandb_records(path):
    """The protobuf records of an offline W&B run's .wandb file (a LevelDB-style log: a 7-byte header, then
    32 KiB blocks of records, each with a crc, a length and a full/first/middle/last type); wandb.Api cannot
    read offline runs."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and pending:  # full, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def check_wandb_runs_per_job(sweep, key):
    """Every job of the sweep has its own offline W&B run, named by its swept override and grouped by the sweep,
    holding its own val/score only (Lightning reused job 0's run for every job: the later jobs had none)."""
    groups = set()
    for job in (p for p in sweep.iterdir() if (p / "metrics.json").exists()):
        runs = list(job.glob("wandb/offline-run-*/*.wandb"))
        assert len(runs) == 1, (job, runs)
        records = list(wandb_records(runs[0]))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        value = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert run.display_name == next(o for o in value if o.startswith(f"{key}="))
        groups.add(run.run_group)
        scores = [json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "history"
                  for item in r.history.item if (item.key or "/".join(item.nested_key)) == "val/score"]
        assert scores == [pytest.approx(json.loads((job / "metrics.json").read_text())["val/score"])], (job, scores)
    assert len(groups) == 1 and groups != {""}, groups


def test_self_supervised_table3_is_one_sweep(tmp_path):
    """Table 3's self-supervised half in one command: eq. 3 for zorro, eq. 2 for the ablations (task.loss=auto),
    then a linear probe on each frozen backbone; the sweep prints the probe's V / A / A+V table."""
    proc = run_script(ROOT / "train.py", "-m", "masking=zorro,two_streams,input_level,bottleneck", "debug=tiny",
                      "task=contrastive", "linear_probe=true", "probe.epochs=3", "trainer.max_epochs=1",
                      "data.num_train=16", "data.num_val=16", "data.num_test=16", "test=false",
                      f"hydra.sweep.dir={tmp_path}", "logger=none")
    jobs = sorted(p for p in tmp_path.iterdir() if (p / "metrics.json").exists())
    assert len(jobs) == 4, proc.stdout[-2000:]
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert {"probe/video/video/top1", "probe/audio/audio/top1", "probe/audio_video/avg/top1"} <= set(metrics)
    assert "| masking | V top1 | A top1 | A+V top1 |" in proc.stdout and "linear probe on frozen features" in proc.stdout


def test_wandb_offline_run(tmp_path):
    run_script(ROOT / "train.py", "debug=tiny", "logger=wandb", "trainer.max_epochs=1", "data.num_train=16",
               "data.num_val=16", "test=false", f"hydra.run.dir={tmp_path}", env={"WANDB_MODE": "offline"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("override,message", [  # Hydra's error, and ours (every ConfigError takes the path of the
    ("masking=vanilla", "Could not find 'masking/vanilla'"),  # second; test_configs checks their messages)
    ("data=shards", "Error in config: missing value for data.root"),
])
def test_bad_overrides_give_one_line_errors(override, message, tmp_path):
    proc = run_script(ROOT / "train.py", "debug=tiny", override, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    """The SLURM launcher's local twin: each job of the sweep runs as its own submitit process."""
    run_script(ROOT / "train.py", "-m", "hydra/launcher=submitit_local", "masking=zorro,two_streams", "debug=tiny",
               "trainer.max_epochs=1", "data.num_train=16", "data.num_val=16", "data.num_test=16", "logger=wandb",
               f"hydra.sweep.dir={tmp_path}", env={"WANDB_MODE": "offline"})
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert jobs == ["0_masking-zorro", "1_masking-two_streams"]
    assert (tmp_path / ".submitit").is_dir()
    check_wandb_runs_per_job(tmp_path, "masking")  # each job its own W&B run under submitit too
