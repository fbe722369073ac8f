import json

import pytest

from zorro.run import train

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
    for devices, name in ((1, "single"), (2, "ddp")):
        extra = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn",
                 "trainer.sync_batchnorm=false", "trainer.precision=32-true"] if devices == 2 else []
        run_script(ROOT / "evaluate.py", f"ckpt_path={shard_checkpoint}", f"hydra.run.dir={tmp_path / name}",
                   "data.eval_windows=2", "data.eval_crops=2", *extra)
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert single["test/num_clips"] == ddp["test/num_clips"] == test_clips
    for key in ("test/audio_video/avg/top1", "test/audio/audio/top1", "test/video/video/top1"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6)  # the same clips, the same averaged views
