"""Corrupt samples and unreadable shards at training time: skipped and counted (data/skipped), a clear one-line
failure above data.max_bad_fraction, no hang with or without loader workers."""

import json

import pytest

from zorro.data.shards import ShardDataModule
from zorro.data.stream import DataError
from zorro.run import train

from ..conftest import ROOT, compose_cfg, run_script
from .conftest import make_clips, write_shards

BAD = {"tr01": "jpeg", "tr04": "flac", "tr09": "json"}  # one corrupt member each


def corrupt(sample: dict, what: str) -> dict:
    sample = dict(sample)
    if what == "jpeg":  # every frame, whichever the window picks
        for k in [k for k in sample if k.endswith(".jpg")]:
            sample[k] = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
    elif what == "flac":
        sample["flac"] = sample["flac"][:4] + b"\x00" * 64
    else:
        sample["json"] = b'{"key": "tr09", "label_ids": [0'
    return sample


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """train: 3 shards x 4 clips, 3 of the 12 corrupt (a JPEG, a FLAC, a JSON); val: 3 clean clips."""
    root = tmp_path_factory.mktemp("bad_shards")
    clips = [corrupt(c, BAD[c["__key__"]]) if c["__key__"] in BAD else c for c in make_clips("tr", 12)]
    assert "flac" in make_clips("tr", 12)[4] and "f000.jpg" in clips[1]
    write_shards(root, {"train": [clips[0:4], clips[4:8], clips[8:12]], "val": [make_clips("va", 3)]})
    return root


def module(root, **kw):
    return ShardDataModule(root=str(root), batch_size=3, num_frames=4, image_size=32, sample_rate=16000,
                           shuffle_buffer=0, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(bad_shards, workers):
    dm = module(bad_shards, num_workers=workers, epoch_length=6)
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert len(keys) == 6 and not set(keys) & set(BAD)
    assert dm.skipped() >= 1
    with pytest.raises(DataError, match="max_bad_fraction=0.01"):
        dm.check_skipped(dm.skipped())


def test_every_bad_sample_is_counted_once_per_pass(bad_shards):
    dm = module(bad_shards, num_workers=0, epoch_length=9)  # one slot: a pass over the 12 gives the 9 good ones
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert sorted(keys) == sorted(f"tr{i:02d}" for i in range(12) if f"tr{i:02d}" not in BAD)
    assert dm.skipped() == 3


def test_an_unreadable_shard_counts_its_samples(bad_shards, tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    for f in bad_shards.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    (root / "train-000001.tar").write_bytes(b"not a tar" * 100)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"].append({"name": "train-000009.tar", "num_samples": 5})  # missing file
    (root / "manifest.json").write_text(json.dumps(manifest))
    dm = module(root, num_workers=0, epoch_length=9)  # more than the 6 readable clips: every shard is tried
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert len(keys) == 9 and not any(k in {"tr04", "tr05", "tr06", "tr07"} for k in keys)
    assert dm.skipped() >= 2 + 4 + 5  # two corrupt clips, the garbage shard's 4 and the missing shard's 5


def test_training_logs_skips_below_the_threshold(bad_shards, tmp_path):
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={bad_shards}",
                                 "data.num_workers=2", "data.batch_size=2", "data.max_bad_fraction=0.5",
                                 "trainer.max_epochs=1", "test=false"], output_dir=tmp_path)
    metrics = train(cfg)
    assert metrics["data/skipped"] >= 1 and "train/loss" in metrics


def test_training_fails_above_the_threshold_in_one_line(bad_shards, tmp_path):
    proc = run_script(ROOT / "train.py", "model=zorro_vit_tiny", "logger=none", "data=shards",
                      f"data.root={bad_shards}", "data.num_workers=2", "data.batch_size=2", "trainer.max_epochs=1",
                      "test=false", f"hydra.run.dir={tmp_path}", check=False, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error in data: ") and "data.max_bad_fraction=0.01" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "skipping unreadable sample tr0" in proc.stdout + proc.stderr
