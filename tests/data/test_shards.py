import json
import shutil
from collections import Counter

import functools

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

import zorro.data.stream as stream_module
from zorro.data.mixed import MixedModalityDataModule
from zorro.data.shards import ShardDataModule
from zorro.models import zorro_vit_tiny
from zorro.tasks import SupervisedTask
from zorro.run import train

from ..conftest import compose_cfg

SIZES = dict(num_frames=4, image_size=32, sample_rate=16000)


def manifest_of(root):
    return json.loads((root / "manifest.json").read_text())


def dm(root, **kw):
    return ShardDataModule(root=str(root), **{**SIZES, "batch_size": 2, "num_workers": 0, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_follow_the_contract(demo_shards, workers):
    module = dm(demo_shards, num_workers=workers)
    loader = module.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for b in batches:
        assert b["video"].dtype == torch.uint8 and b["video"].shape == (2, 4, 3, 32, 32)
        assert b["audio"].dtype == torch.int16 and b["audio"].shape == (2, int(16000 * 4 / 3.125))
        assert b["label"].dtype == torch.int64 and b["label"].shape == (2,)
        assert b["has_audio"].dtype == torch.bool and b["has_video"].dtype == torch.bool
        assert isinstance(b["key"], list) and len(b["key"]) == 2
        assert not b["video"][~b["has_video"]].any() and not b["audio"][~b["has_audio"]].any()  # zeros where absent
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys))  # no sample twice within an epoch
    flags = torch.cat([b["has_video"] for b in batches])
    assert module.info.num_classes == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_are_reshuffled_with_a_fixed_length(demo_shards, workers):
    loader = dm(demo_shards, num_workers=workers, batch_size=1).train_dataloader()
    first, second = ([k for b in loader for k in b["key"]] for _ in range(2))
    assert len(first) == len(second) == len(loader)
    assert first != second and len(set(first)) == len(first) and len(set(second)) == len(second)
    if workers == 0:  # one slot reads everything: the same clips in a new order
        assert sorted(first) == sorted(second)


def test_evaluation_yields_windows_times_crops_views_per_clip(demo_shards):
    module = dm(demo_shards, eval_windows=2, eval_crops=3)
    test_clips = manifest_of(demo_shards)["splits"]["test"]["num_samples"]
    counts = Counter(k for b in module.test_dataloader() for k in b["key"])
    assert len(counts) == test_clips
    for key, n in counts.items():  # clips shorter than the 1.28 s window get one (looped) window
        assert n in ((1, 2) if key.startswith("sound") else (3, 6))  # audio-only clips: no spatial crops


def test_feature_loader_gives_one_unaugmented_view_per_training_clip(demo_shards):
    module = dm(demo_shards, eval_windows=2, eval_crops=3)
    keys = [k for b in module.feature_dataloader("train") for k in b["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == manifest_of(demo_shards)["splits"]["train"]["num_samples"]
    again = [k for b in module.feature_dataloader("train") for k in b["key"]]
    assert again == keys  # deterministic: features of a frozen backbone are computed once


def test_more_workers_than_shards(demo_shards):
    module = dm(demo_shards, num_workers=2)
    val = manifest_of(demo_shards)["splits"]["val"]
    assert len(val["shards"]) < 3  # the case under test: fewer shards than 2 workers x ...
    keys = [k for b in module.val_dataloader() for k in b["key"]]
    assert len(set(keys)) == val["num_samples"]


def test_two_ranks_see_disjoint_samples_that_cover_the_split(demo_shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setattr(stream_module, "_slot", lambda *_, rank=rank: (rank, 2))
        module = dm(demo_shards, eval_windows=1, eval_crops=1)
        seen.append({k for b in module.test_dataloader() for k in b["key"]})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == manifest_of(demo_shards)["splits"]["test"]["num_samples"]


def test_audio_only_modality_zeroes_video(demo_shards):
    b = next(iter(dm(demo_shards, modalities=["audio"]).train_dataloader()))
    assert not b["has_video"].any() and not b["video"].any()


def test_a_missing_split_is_not_run(demo_shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    manifest = manifest_of(root)
    del manifest["splits"]["val"], manifest["splits"]["test"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    module = dm(root)
    assert not module.has_split("val") and module.val_dataloader() == []
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={root}",
                                 "data.num_workers=0",
                                 "data.batch_size=2", "trainer.max_epochs=1"], output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert "train/loss" in metrics and not any(k.startswith("val/") for k in metrics)


def test_shards_config_instantiates(demo_shards, tmp_path):
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "data=shards", f"data.root={demo_shards}"], output_dir=tmp_path)
    module = instantiate(cfg.data)
    assert module.info.class_names == ("blue_high", "blue_low", "red_high", "red_low")
    assert module.samplers["train"].num_frames == cfg.model.num_frames


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data_prep"):
        dm(tmp_path)


def test_mixed_modalities_draw_whole_batches_from_each_dataset(demo_shards, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(demo_shards, other)
    manifest = manifest_of(other)
    manifest["classes"] = ["a", "b", "c", "d"]  # another label space: the union has 8 classes
    (other / "manifest.json").write_text(json.dumps(manifest))
    module = MixedModalityDataModule(audio_root=str(demo_shards), video_root=str(other), p_audio=0.5,
                                     batch_size=2, num_workers=0, **SIZES)
    assert module.info.num_classes == 8
    names = module.info.class_names
    sources = Counter()
    for _ in range(3):
        for b in module.train_dataloader():
            sources[b["source"]] += 1
            absent = "has_video" if b["source"] == "audio" else "has_audio"
            assert not b[absent].any()  # the other modality is zeroed and flagged: no loss for it
            own = manifest_of(demo_shards if b["source"] == "audio" else other)["classes"]
            assert all(names[i] in own for i in b["label"].tolist())
    assert sources["audio"] > 3 and sources["video"] > 3


def test_reading_an_audio_span_equals_slicing_the_whole_clip(demo_shards):
    import webdataset as wds

    module = dm(demo_shards)
    sampler = module.samplers["train"]
    shards = [{"url": str(demo_shards / s["name"])} for s in manifest_of(demo_shards)["splits"]["train"]["shards"]]
    raw = next(s for s in wds.tariterators.tarfile_samples(shards) if "flac" in s)
    meta = json.loads(raw["json"])
    whole = sampler.audio(raw, meta)
    span = sampler.audio(raw, meta, span=(0.5, 0.64))
    assert len(span) == int(0.64 * 16000)
    assert (span == whole[8000 : 8000 + len(span)]).all()


class _Keys(pl.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.keys.append(list(batch["key"]))


def _fit(root, ckpt_dir, workers, *, max_steps=-1, ckpt_path=None, max_epochs=1):
    module = dm(root, num_workers=workers, shuffle_buffer=4)
    task = SupervisedTask(backbone=zorro_vit_tiny(num_frames=4, image_size=32), dataset=module.info,
                          optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    keys = _Keys()
    last = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = pl.Trainer(max_epochs=max_epochs, max_steps=max_steps, callbacks=[keys, last], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(task, datamodule=module, ckpt_path=ckpt_path)
    return keys.keys


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_resume_continues_the_epoch_without_repeats(demo_shards, tmp_path, workers):
    full = _fit(demo_shards, tmp_path / "full", workers)
    assert len(full) >= 3
    first = _fit(demo_shards, tmp_path / "run", workers, max_steps=2)  # killed after 2 steps
    rest = _fit(demo_shards, tmp_path / "run2", workers, ckpt_path=tmp_path / "run" / "last.ckpt")
    assert first == full[:2] and first + rest == full  # the same batches, in the same order, none twice


def test_resuming_from_an_epoch_end_checkpoint_starts_the_next_epoch(demo_shards, tmp_path):
    full = _fit(demo_shards, tmp_path / "full", 0, max_epochs=2)
    first = _fit(demo_shards, tmp_path / "run", 0)
    rest = _fit(demo_shards, tmp_path / "run2", 0, ckpt_path=tmp_path / "run" / "last.ckpt", max_epochs=2)
    assert first + rest == full and rest != first  # epoch 1's own shuffle, not a replay of epoch 0
