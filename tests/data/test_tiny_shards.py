"""ShardDataModule on hand-written shards (tests/data/conftest.py): no dependency on data_prep."""

import json
import shutil
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import zorro.data.shards as shards_module
from zorro.data.shards import ShardDataModule

from .conftest import SR, write_shards, make_clips

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
SIZES = dict(num_frames=4, image_size=32, sample_rate=SR)
N_AUDIO = int(round(4 / 3.125 * SR))


def dm(root, **kw):
    return ShardDataModule(root=str(root), **{**SIZES, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 4, **kw})


def metas(root, split):
    import webdataset as wds

    manifest = json.loads((root / "manifest.json").read_text())
    urls = [{"url": str(root / s["name"])} for s in manifest["splits"][split]["shards"]]
    return {m["key"]: m for m in (json.loads(s["json"]) for s in wds.tariterators.tarfile_samples(urls))}


@pytest.mark.parametrize("workers", [0, 2])
def test_contract_and_flags_match_the_samples(tiny_shards, workers):
    module = dm(tiny_shards, num_workers=workers)
    truth = metas(tiny_shards, "train")
    batches = list(module.train_dataloader())
    assert len(batches) == len(module.train_dataloader()) > 0
    keys = []
    for b in batches:
        assert b["video"].dtype == torch.uint8 and b["video"].shape == (2, 4, 3, 32, 32)
        assert b["audio"].dtype == torch.int16 and b["audio"].shape == (2, N_AUDIO)
        assert b["label"].dtype == torch.int64 and b["view"].dtype == torch.int64
        for i, key in enumerate(b["key"]):
            assert bool(b["has_audio"][i]) == truth[key]["has_audio"]
            assert bool(b["has_video"][i]) == truth[key]["has_video"]
            assert b["label"][i].item() == truth[key]["label_ids"][0]
        assert not b["video"][~b["has_video"]].any() and not b["audio"][~b["has_audio"]].any()
        keys += b["key"]
    assert len(keys) == len(set(keys))  # no clip twice within an epoch


def test_fewer_shards_than_workers_trains_without_hanging(tiny_shards):
    # val has 1 shard of 3 clips: with 2 workers both read it and keep every other sample
    module = dm(tiny_shards, train_split="val", num_workers=2, batch_size=1)
    first, second = ([k for b in module.train_dataloader() for k in b["key"]] for _ in range(2))
    assert len(first) == len(second) == len(module.train_dataloader()) == 2 and len(set(first)) == 2


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
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    if not with_val:
        manifest = json.loads((root / "manifest.json").read_text())
        del manifest["splits"]["val"]
        (root / "manifest.json").write_text(json.dumps(manifest))
    module, model = dm(root, eval_windows=1, eval_crops=1), Consumer()
    assert module.has_split("val") == with_val
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=module)
    assert model.seen["train"] == 12 and model.seen["val"] == (3 if with_val else 0)


def test_config_instantiates_with_plain_values(tiny_shards):
    cfg = OmegaConf.load(ROOT / "conf/data/shards.yaml")
    cfg.num_frames, cfg.image_size, cfg.sample_rate, cfg.seed = 4, 32, SR, 0  # interpolations into model/seed
    cfg.audio_seconds = 1.28
    module = instantiate(cfg, root=str(tiny_shards))
    assert module.info.class_names == ("cat", "dog", "bird") and module.has_split("test")


def test_empty_split_is_absent(tmp_path):
    write_shards(tmp_path, {"train": [make_clips("a", 2)], "val": []})
    module = dm(tmp_path)
    assert not module.has_split("val") and module.val_dataloader() == []
