"""What a new user meets on the first day (issue 21): config errors that are one line and come at once, sweep job
folders named by what the sweep varies, audio-only data, training loss in every epoch, the progress lines."""

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from zorro.config import ConfigError, job_dirname, preflight

from .conftest import CONF, ROOT, compose_cfg
from .data.conftest import clip_members, write_shards

# -- config errors: one line, before torch / Lightning / W&B are imported -------------------------------------------
# A user's first mistakes: Lightning's own checkpoint names (`=` in a path), a misspelt trainer key, a recipe's
# missing data.root. Each was several lines of Hydra's, or came after 10-20 s of imports.
ERRORS = [
    (["ckpt_path=/runs/x/checkpoints/epoch=0-step=4.ckpt"],
     "Error in config: ckpt_path=/runs/x/checkpoints/epoch=0-step=4.ckpt: Hydra cannot read this value "
     "(mismatched input '=' expecting <EOF>); quote it: 'ckpt_path=\"/runs/x/checkpoints/epoch=0-step=4.ckpt\"'"),
    (["trainer.max_epoch=3"],
     "Error in config: trainer.max_epoch=3: trainer has no key 'max_epoch' (did you mean trainer.max_epochs=3?); "
     "a key it lacks is added with +trainer.max_epoch=3"),
    (["-m", "masking=zorro,two_streams", "trainr.max_epochs=3"],  # a sweep is checked too (with its first value)
     "Error in config: trainr.max_epochs=3: the config has no key 'trainr' (did you mean trainer.max_epochs=3?); "
     "a key it lacks is added with +trainr.max_epochs=3"),
    (["+trainer.max_epoch=3"],  # Hydra's advice taken: the Trainer's own parameters, read from its source
     "Error in config: trainer.max_epoch: lightning.pytorch.Trainer has no parameter 'max_epoch' (did you mean "
     "'max_epochs'?)"),
    (["model.depth=abc"], "Error in config: model.depth: expected int, got 'abc' (str)"),
    (["data=shards"], "Error in config: missing value for data.root (set it on the command line, e.g. data.root=...)"),
]

PROBE = """import runpy, sys, time
start = time.perf_counter()
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    heavy = sorted(m for m in ("torch", "lightning", "wandb") if m in sys.modules)
    print(f"imported={','.join(heavy) or '-'} seconds={time.perf_counter() - start:.2f}", file=sys.stderr)
"""


@pytest.mark.parametrize("args,line", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_config_errors_are_one_line_before_the_heavy_imports(args, line, tmp_path):
    """The script as a user runs it: the error is the only line, exit 2, and torch, Lightning and W&B were never
    imported (so it comes in about a second; the bound allows for a loaded CI machine)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "train.py"), *args,
                           f"hydra.run.dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2 and lines[0].startswith(line), proc.stderr
    assert lines[1].startswith("imported=- "), lines[1]  # nothing heavy imported before the error
    assert wall < 15, wall  # ~1-2 s on an idle 2-core machine
    assert not any(tmp_path.iterdir())  # and no run directory was made


def test_evaluate_without_a_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "evaluate.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("Error in config: missing value for ckpt_path")
    assert "imported=- " in proc.stderr


def test_the_quoted_checkpoint_path_is_what_the_run_reads():
    """The quoting the error prints is what Hydra then reads as the path (checked before the run is built)."""
    path = "/runs/x/checkpoints/epoch=0-step=4.ckpt"
    cfg = compose_cfg(overrides=[f'ckpt_path="{path}"'])
    assert cfg.ckpt_path == path
    preflight(CONF, "train", [f'ckpt_path="{path}"', "debug=tiny"])  # passes: no exit
    with pytest.raises(SystemExit) as exit_:
        preflight(CONF, "train", [f"ckpt_path={path}"])
    assert exit_.value.code == 2


# -- sweep job folders ---------------------------------------------------------------------------------------------
def test_sweep_job_folders_are_named_by_the_swept_keys(tmp_path):
    """Job folders are named by the swept overrides, whole (every override cut at 120 characters would end
    `optimizer.lr=1e-3` as `...optimizer.lr-0.0`, and a sweep over lr would give folders differing only in their
    number)."""
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        "masking=zorro,two_streams", "optimizer.lr=1e-3,1e-4", "debug=tiny", "data.root=/data/shards",
        "trainer.max_epochs=50", "model=zorro_vit_tiny", "task.eval_inputs=[audio,video]"]}}}))
    job = ["masking=two_streams", "optimizer.lr=1e-3", "debug=tiny", "data.root=/data/shards", "trainer.max_epochs=50",
           "model=zorro_vit_tiny", "task.eval_inputs=[audio,video]"]
    assert job_dirname(3, job, tmp_path) == "3_masking-two_streams_optimizer.lr-1e-3"
    # where the sweep is unknown (no multirun.yaml): every override but the paths, in whole items only
    unknown = job_dirname(3, job, tmp_path / "elsewhere", exclude=["data.root"], max_len=60)
    assert unknown == "3_masking-two_streams_optimizer.lr-1e-3_debug-tiny_and3more"
    assert job_dirname(0, ["tags=[a,b]"], tmp_path / "elsewhere") == "0_tags-a+b"  # lists: no brackets, no commas


# -- audio-only data -------------------------------------------------------------------------------------------------
def audio_only_shards(root, splits=("train", "val", "test")):
    clips = {s: [clip_members(f"{s}{i}", seconds=1.0, label_ids=[i % 3], has_video=False, seed=i) for i in range(6)]
             for s in splits}
    write_shards(root, {s: [c[:3], c[3:]] for s, c in clips.items()})
    return root


def test_audio_only_data_with_the_default_config_is_a_one_line_error(tmp_path):
    """The default config on audio-only shards trained a video head and printed `Table 3: V 12.5`: the manifest
    counts the clips with video (none), so the run stops before it starts and names the recipe for such data."""
    from zorro.run import train

    shards = audio_only_shards(tmp_path / "shards")
    assert json.loads((shards / "manifest.json").read_text())["modalities"] == {"audio": 18, "video": 0}
    cfg = compose_cfg(overrides=["data=shards", f"data.root={shards}", "model=zorro_vit_tiny", "logger=none"],
                      output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^data: no clip of .* has video \(its manifest: audio in 18 clips, video "
                                          r"in 0\) but this run needs it .*experiment=esc50_scratch"):
        train(cfg)


def test_esc50_scratch_on_audio_only_data_writes_reports_and_no_video_numbers(tmp_path, capsys):
    """experiment=esc50_scratch (eval_inputs=[audio], a fold as the test split) wrote no reports/ at all: its one
    setting runs the audio stream alone, which gave no averaged prediction for the reports. Every recipe writes
    them; and the video setting of a run is never scored on data without video."""
    from zorro.run import train

    clips = [clip_members(f"c{i}", seconds=1.0, label_ids=[i % 3], has_video=False, seed=i) for i in range(12)]
    shards = tmp_path / "folds"
    write_shards(shards, {f"fold{k}": [clips[4 * (k - 1):4 * k]] for k in (1, 2, 3)})
    cfg = compose_cfg(overrides=["experiment=esc50_scratch", f"data.root={shards}", "data.cv_fold=1",
                                 "model=zorro_vit_tiny", "trainer=cpu", "trainer.max_epochs=1", "data.batch_size=4",
                                 "data.num_workers=0", "logger=none", "progress=none"], output_dir=tmp_path / "run")
    metrics = train(cfg)
    reports = tmp_path / "run" / "reports" / "test"
    assert (reports / "confusion_matrix.png").exists() and (reports / "table.csv").exists()
    assert metrics["test/num_clips"] == 4 and "test/audio/audio/top1" in metrics
    assert not [k for k in metrics if "video" in k and not k.startswith("train/")], metrics
    assert re.search(r"Table 3 \(top1, %\): V -  A \d+\.\d  A\+V -", capsys.readouterr().out)


def test_settings_that_need_an_absent_modality_are_not_scored(tmp_path):
    """Without the manifest's counts (a manifest without them), the run still never prints a number for a
    modality its evaluated clips lack: the V and A+V settings and the video head are left out."""
    from zorro.run import build

    root = tmp_path / "old"
    clips = {s: [clip_members(f"{s}{i}", seconds=1.0, label_ids=[i % 3], has_video=False, seed=i) for i in range(4)]
             for s in ("train", "val")}
    write_shards(root, {s: [c] for s, c in clips.items()}, counted=False)
    cfg = compose_cfg(overrides=["data=shards", f"data.root={root}", "model=zorro_vit_tiny", "logger=none",
                                 "data.num_workers=0", "data.batch_size=4", "data.eval_windows=1", "data.eval_crops=1",
                                 "trainer.max_epochs=1", "progress=none", "callbacks=none"], output_dir=tmp_path / "run")
    datamodule, task, trainer = build(cfg)
    assert datamodule.modality_counts() is None  # nothing to check before the run
    trainer.validate(task, datamodule=datamodule)
    scores = task.eval_result.scores
    assert "val/audio/audio/top1" in scores and scores["val/score"] == scores["val/audio/audio/top1"]
    assert not [k for k in scores if "video" in k], scores


# -- evaluation totals (the progress lines' epochs and ETA, and train/loss in every epoch: test_train.py) ------------
def test_an_evaluation_stream_gets_its_total(tmp_path):
    """The shard streams have no __len__, so evaluation showed `1/?`: where every clip is one view, the total is
    known from the manifest, per rank and worker as the stream splits them."""
    from zorro.data.shards import ShardDataModule

    write_shards(tmp_path, {"val": [[clip_members(f"v{i}{j}", seconds=1.0, label_ids=[0], seed=j) for j in range(n)]
                                    for i, n in enumerate((5, 3, 4))]})
    common = dict(root=str(tmp_path), batch_size=2, num_frames=2, image_size=32, sample_rate=16000, eval_windows=1,
                  eval_crops=1, audio_seconds=1.0)
    assert ShardDataModule(**common, num_workers=0).num_batches("val") == 6  # 12 clips in batches of 2
    assert ShardDataModule(**common, num_workers=2).num_batches("val") == 7  # 2 workers: 5 and 4+3 clips, 3 + 4 batches
    assert ShardDataModule(**{**common, "eval_crops": 3}, num_workers=0).num_batches("val") is None  # views vary
    loader = ShardDataModule(**common, num_workers=2)
    assert sum(1 for _ in loader.val_dataloader()) == loader.num_batches("val")


def test_signatures_read_from_source_agree_with_the_imported_targets():
    """train.py checks a config against its targets' signatures read from their source files (before torch is
    imported): for every target a config names, what it reads is what inspect finds after the import."""
    from zorro.config import UNKNOWN, imported_signature, source_signature

    targets = sorted({m for p in CONF.rglob("*.yaml") for m in re.findall(r"_target_: ([\w.]+)", p.read_text())})
    read = 0
    for target in targets:
        static, imported = source_signature(target), imported_signature(target)
        if static is None:
            continue
        read += 1
        assert static.var_keyword == imported.var_keyword, target
        if not static.var_keyword:  # (inspect lists self and the **kwargs name too)
            assert set(static.params) == set(imported.params) - {"self"}, target
            assert static.expected == imported.expected, target
        assert static.maskings in (UNKNOWN, imported.maskings), target
    assert read >= len(targets) - 2, read  # all but a class without an __init__ of its own
