import json

import pytest

from zorro.run import evaluate, train

from .conftest import ROOT, compose_cfg, run_script


@pytest.fixture(scope="module")
def shard_checkpoint(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={demo_shards}",
                                 "data.num_workers=0", "data.batch_size=2", "trainer.max_epochs=1", "test=false"],
                      output_dir=out)
    train(cfg)
    return next((out / "checkpoints").glob("last*.ckpt"))


@pytest.mark.ddp
def test_two_process_evaluation_counts_every_clip_once(shard_checkpoint, demo_shards, tmp_path):
    test_clips = json.loads((demo_shards / "manifest.json").read_text())["splits"]["test"]["num_samples"]
    views = ["data.eval_windows=2", "data.eval_crops=2"]
    evaluate(compose_cfg("evaluate", overrides=[f"ckpt_path={shard_checkpoint}", *views],
                         output_dir=tmp_path / "single"), views)
    run_script(ROOT / "evaluate.py", f"ckpt_path={shard_checkpoint}", f"hydra.run.dir={tmp_path / 'ddp'}", *views,
               "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn",
               "trainer.sync_batchnorm=false", "trainer.precision=32-true")
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert single["test/num_clips"] == ddp["test/num_clips"] == test_clips
    for key in ("test/audio_video/avg/top1", "test/audio/audio/top1", "test/video/video/top1"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6)  # the same clips, the same averaged views


def test_the_rebuilt_data_keeps_the_checkpoints_sampling_unless_the_group_names_another_loader():
    """evaluate.py's data: the checkpoint's, with the data.* values given on top; `data=shards` naming the
    checkpoint's own loader keeps its sampling, a group naming another loader brings that group's config."""
    from omegaconf import OmegaConf

    from zorro.checkpoint import rebuild_config
    from zorro.run import EVAL_OWN, EVAL_SETTINGS

    def saved(target):
        return {"seed": 0, "model": {"num_frames": 2, "image_size": 32, "sample_rate": 16000, "audio_seconds": 1.0},
                "data": {"_target_": target, "root": "/old", "frame_rate": 1.0, "eval_windows": 2, "eval_crops": 3,
                         "batch_size": 4}}

    def rebuilt(target, overrides):
        cfg = compose_cfg("evaluate", overrides=["ckpt_path=x.ckpt", "split=val", *overrides])
        return rebuild_config(saved(target), ["ckpt_path=x.ckpt", "split=val", *overrides], cfg, own=EVAL_OWN,
                              command_keys=EVAL_SETTINGS)

    shards, synthetic = "zorro.data.shards.ShardDataModule", "zorro.data.synthetic.SyntheticDataModule"
    for overrides in (["data=shards", "data.root=/new", "data.eval_crops=1"], ["data.root=/new", "data.eval_crops=1"]):
        run = rebuilt(shards, overrides)  # the same loader: only the given values
        assert OmegaConf.to_container(run.config.data) == {"_target_": shards, "root": "/new", "frame_rate": 1.0,
                                                           "eval_windows": 2, "eval_crops": 1, "batch_size": 4}
        assert "split" not in run.config and run.config.trainer._target_ == "lightning.pytorch.Trainer"
    assert rebuilt(shards, ["data=shards"]).kept == ["data=shards"]
    other = rebuilt(synthetic, ["data=shards", "data.root=/new"]).config  # another loader: the group's config
    assert other.data._target_ == shards and other.data.root == "/new"
    assert other.data.frame_rate == 3.125 and other.data.eval_windows == 4 and other.data.num_frames == 2


def test_a_bad_checkpoint_path_is_one_line(tmp_path, monkeypatch, capsys):
    """evaluate.py (its Hydra main, in this process): a missing or unreadable checkpoint is one line, exit 2."""
    import runpy

    from hydra.core.hydra_config import HydraConfig

    for name, content, message in (("missing.ckpt", None, f"no such file {tmp_path / 'missing.ckpt'}"),
                                   ("notes.ckpt", "not a checkpoint", f"cannot read {tmp_path / 'notes.ckpt'} as a")):
        if content:
            (tmp_path / name).write_text(content)
        monkeypatch.setattr("sys.argv", ["evaluate.py", f"ckpt_path={tmp_path / name}",
                                         f"hydra.run.dir={tmp_path / 'eval'}"])
        try:
            with pytest.raises(SystemExit) as exit_:
                runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
        finally:
            HydraConfig.instance().cfg = None
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"Error in config: ckpt_path: {message}")


def test_sweep_job_directories_are_plain_text_the_override_parser_reads_back():
    """A sweep job directory's name has no `=`, `,` or brackets (hydra.job.override_dirname would give
    `N_key=value,key=value`), so Hydra's override parser reads a checkpoint path through it.
    tests/test_cross_validation.py evaluates a sweep's checkpoint by that path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from zorro.config import path_safe

    name = path_safe("masking-zorro_tags-[a,b]_init_from-/ckpt/x.ckpt_~model.separate_weights")
    assert name == "masking-zorro_tags-a+b_init_from-ckptx.ckpt_model.separate_weights"  # no nesting either
    path = f"logs/multiruns/2026-11-29/12-00-00/0_{name}/checkpoints/last.ckpt"
    assert OverridesParser.create().parse_override(f"ckpt_path={path}").value() == path
