"""ShardDataModule: the batch contract, evaluation views, splitting over ranks and workers, absent splits,
resuming mid-epoch. On hand-written shards (tests/data/conftest.py, no dependency on data_prep) and on the shards
`data_prep` writes from encoded demo videos (tests/conftest.py)."""

import functools
import json
import shutil
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

import zorro.data.shards as shards_module
from zorro.data.mixed import MixedModalityDataModule
from zorro.data.shards import ShardDataModule
from zorro.models import zorro_vit_tiny
from zorro.run import train
from zorro.tasks import SupervisedTask

from ..conftest import compose_cfg
from .conftest import SR, make_clips, write_shards

SIZES = dict(num_frames=4, image_size=32, sample_rate=SR)
N_AUDIO = int(round(4 / 3.125 * SR))


def dm(root, **kw):
    return ShardDataModule(root=str(root), **{**SIZES, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 4, **kw})


def manifest_of(root):
    return json.loads((root / "manifest.json").read_text())


def metas(root, split):
    import webdataset as wds

    urls = [{"url": str(root / s["name"])} for s in manifest_of(root)["splits"][split]["shards"]]
    return {m["key"]: m for m in (json.loads(s["json"]) for s in wds.tariterators.tarfile_samples(urls))}


def without_split(src, root, split):
    shutil.copytree(src, root)
    manifest = manifest_of(root)
    del manifest["splits"][split]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# -- hand-written shards: every field checked against the sample that was written ----------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_contract_and_flags_match_the_samples(tiny_shards, workers):
    module = dm(tiny_shards, num_workers=workers)
    truth = metas(tiny_shards, "train")
    loader = module.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) > 0 and module.info.num_classes == 3
    keys, flags = [], set()
    for b in batches:
        assert b["video"].dtype == torch.uint8 and b["video"].shape == (2, 4, 3, 32, 32)
        assert b["audio"].dtype == torch.int16 and b["audio"].shape == (2, N_AUDIO)
        assert b["label"].dtype == torch.int64 and b["label"].shape == (2,) and b["view"].dtype == torch.int64
        assert b["has_audio"].dtype == torch.bool and b["has_video"].dtype == torch.bool
        assert isinstance(b["key"], list) and len(b["key"]) == 2
        for i, key in enumerate(b["key"]):
            assert bool(b["has_audio"][i]) == truth[key]["has_audio"]
            assert bool(b["has_video"][i]) == truth[key]["has_video"]
            assert b["label"][i].item() == truth[key]["label_ids"][0]
            flags.add((bool(b["has_audio"][i]), bool(b["has_video"][i])))
        assert not b["video"][~b["has_video"]].any() and not b["audio"][~b["has_audio"]].any()  # zeros where absent
        keys += b["key"]
    assert len(keys) == len(set(keys))  # no clip twice within an epoch
    if workers == 0:  # one slot reads the whole split: every clip, so every kind of clip, in one epoch
        assert sorted(keys) == sorted(truth)
        assert flags == {(True, True), (True, False), (False, True)}  # the zero checks above were not vacuous


def test_fewer_shards_than_workers_trains_and_evaluates_without_hanging(tiny_shards):
    # val has 1 shard of 3 clips: with 2 workers both read it and keep every other sample
    module = dm(tiny_shards, train_split="val", num_workers=2, batch_size=1)
    first, second = ([k for b in module.train_dataloader() for k in b["key"]] for _ in range(2))
    assert len(first) == len(second) == len(module.train_dataloader()) == 2 and len(set(first)) == 2
    evaluated = [k for b in dm(tiny_shards, num_workers=2, eval_windows=1, eval_crops=1).val_dataloader()
                 for k in b["key"]]
    assert sorted(evaluated) == sorted(metas(tiny_shards, "val"))  # every clip exactly once


def test_evaluation_views_per_clip(tiny_shards):
    module = dm(tiny_shards, num_frames=2, eval_windows=2, eval_crops=3)  # 0.64 s window < every clip
    truth = metas(tiny_shards, "test")
    batches = list(module.test_dataloader())
    counts = Counter(k for b in batches for k in b["key"])
    assert set(counts) == set(truth)
    for key, n in counts.items():  # audio-only clips: one view per window (crops would be identical)
        assert n == (6 if truth[key]["has_video"] else 2)
    views = Counter((k, v.item()) for b in batches for k, v in zip(b["key"], b["view"]))
    assert all(c == 1 for c in views.values())  # distinct view indices per clip


def test_short_clips_are_looped(tiny_shards):
    import webdataset as wds

    sampler = dm(tiny_shards, num_frames=8).samplers["eval"]  # 2.56 s window, 1 s clip: 6 stored frames
    raw = next(s for s in wds.tariterators.tarfile_samples([{"url": str(tiny_shards / "test-000000.tar")}])
               if s["__key__"] == "te00")
    (view, *_) = list(sampler(raw, __import__("random").Random(0)))
    levels = view["video"].float().mean(dim=(1, 2, 3)).round()  # frame i was filled with 10 * i
    assert levels.tolist() == [0.0, 20.0, 40.0, 0.0, 20.0, 40.0, 0.0, 20.0]
    wav = view["audio"]
    assert wav.shape == (int(2.56 * SR),) and torch.equal(wav[SR : 2 * SR], wav[:SR])


def test_multi_label_is_multi_hot(tiny_multilabel_shards):
    module = dm(tiny_multilabel_shards, batch_size=4)
    truth = metas(tiny_multilabel_shards, "train")
    (b,) = list(module.train_dataloader())
    assert module.info.multi_label and b["label"].dtype == torch.float32 and b["label"].shape == (4, 3)
    for key, y in zip(b["key"], b["label"]):
        assert y.nonzero().flatten().tolist() == sorted(truth[key]["label_ids"])


@pytest.mark.parametrize("split", ["val", "test"])  # val: 1 shard (samples split), test: 2 shards (shards split)
def test_two_ranks_are_disjoint_and_cover_the_split(tiny_shards, monkeypatch, split):
    seen = []
    for rank in range(2):
        monkeypatch.setattr(shards_module, "rank_world", lambda rank=rank: (rank, 2))  # what DDP would report
        loader = getattr(dm(tiny_shards, eval_windows=1, eval_crops=1), f"{split}_dataloader")()
        seen.append([k for b in loader for k in b["key"]])
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(set(seen[0]))
    assert set(seen[0]) | set(seen[1]) == set(metas(tiny_shards, split))


def test_two_ranks_train_the_same_number_of_batches_on_disjoint_clips(tiny_shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setattr(shards_module, "rank_world", lambda rank=rank: (rank, 2))
        loader = dm(tiny_shards).train_dataloader()
        seen.append([k for b in loader for k in b["key"]])
        assert len(seen[-1]) == 2 * len(loader)
    assert len(seen[0]) == len(seen[1]) > 0 and not set(seen[0]) & set(seen[1])


class Consumer(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = Counter()

    def _step(self, batch, stage):
        self.seen[stage] += len(batch["key"])
        return self.w * batch["video"].float().mean() + batch["audio"].float().mean() * 0

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("with_val", [True, False])
def test_trainer_fit_skips_an_absent_split(tiny_shards, tmp_path, with_val):
    root = tiny_shards if with_val else without_split(tiny_shards, tmp_path / "shards", "val")
    module, model = dm(root, eval_windows=1, eval_crops=1), Consumer()
    assert module.has_split("val") == with_val
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=module)
    assert model.seen["train"] == 12 and model.seen["val"] == (3 if with_val else 0)


def test_empty_split_is_absent(tmp_path):
    write_shards(tmp_path, {"train": [make_clips("a", 2)], "val": []})
    module = dm(tmp_path)
    assert not module.has_split("val") and module.val_dataloader() == []


def test_a_run_without_validation_split_trains_and_tests(tiny_shards, tmp_path):
    """train.py's path: no val split, so no val/ metrics; the test split still runs after fitting."""
    root = without_split(tiny_shards, tmp_path / "shards", "val")
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={root}",
                                 "data.num_workers=0", "data.batch_size=4", "data.eval_windows=1",
                                 "data.eval_crops=1", "trainer.max_epochs=1"], output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert "train/loss" in metrics and not any(k.startswith("val/") for k in metrics)
    assert "test/score" in metrics


def test_shards_config_instantiates_with_the_model_sizes(tiny_shards, tmp_path):
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "data=shards", f"data.root={tiny_shards}"],
                      output_dir=tmp_path)
    module = instantiate(cfg.data)
    assert module.info.class_names == ("cat", "dog", "bird") and module.has_split("test")
    sampler = module.samplers["train"]
    assert (sampler.num_frames, sampler.image_size, sampler.sample_rate) == (
        cfg.model.num_frames, cfg.model.image_size, cfg.model.sample_rate)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data_prep"):
        dm(tmp_path)


# -- shards written by data_prep from encoded demo videos --------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_are_reshuffled_with_a_fixed_length(demo_shards, workers):
    loader = dm(demo_shards, num_workers=workers, batch_size=1).train_dataloader()
    first, second = ([k for b in loader for k in b["key"]] for _ in range(2))
    assert len(first) == len(second) == len(loader)
    assert first != second and len(set(first)) == len(first) and len(set(second)) == len(second)
    if workers == 0:  # one slot reads everything: the same clips in a new order
        assert sorted(first) == sorted(second)


def test_feature_loader_gives_one_unaugmented_view_per_training_clip(demo_shards):
    module = dm(demo_shards, eval_windows=2, eval_crops=3)
    keys = [k for b in module.feature_dataloader("train") for k in b["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == manifest_of(demo_shards)["splits"]["train"]["num_samples"]
    again = [k for b in module.feature_dataloader("train") for k in b["key"]]
    assert again == keys  # deterministic: features of a frozen backbone are computed once


def test_audio_only_modality_zeroes_video(demo_shards):
    b = next(iter(dm(demo_shards, modalities=["audio"]).train_dataloader()))
    assert not b["has_video"].any() and not b["video"].any()


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
