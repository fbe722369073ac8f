"""data.decode_on_device: frames travel JPEG-encoded and are decoded + augmented in on_after_batch_transfer.
On CPU both paths decode with libjpeg, so the same seed must give the same pixels."""

import functools
import io
import random
import tarfile

import lightning.pytorch as pl
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import zorro.data.device as device_module
from zorro.data.device import EncodedFrames, decode_on_device
from zorro.data.reading import tar_samples
from zorro.data.shards import ShardDataModule
from zorro.data.transforms import _colour_op, apply_colour, colour_params
from zorro.models import zorro_vit_tiny
from zorro.tasks import SupervisedTask

from ..conftest import ROOT, run_script

SIZES = dict(num_frames=4, image_size=32, sample_rate=16000)


def dm(root, **kw):
    return ShardDataModule(root=str(root), **{**SIZES, "batch_size": 3, "num_workers": 0, **kw})


def batches(root, stage, on_device, **kw):
    module = dm(root, decode_on_device=on_device, **kw)
    loader = module.train_dataloader() if stage == "train" else module.test_dataloader()
    return [decode_on_device(b, "cpu") for b in loader]


def test_batched_colour_ops_match_torchvision():
    x = torch.rand(3, 2, 3, 12, 10)
    ops = [lambda v, f: (v + f).clamp(0, 1), TF.adjust_saturation, TF.adjust_contrast, TF.adjust_hue]
    factors = {0: [-0.1, 0.0, 0.12], 1: [0.6, 1.0, 1.4], 2: [0.6, 1.0, 1.4], 3: [-0.2, 0.0, 0.15]}
    for op, f in factors.items():
        out = _colour_op(op, x.clone(), torch.tensor(f))
        ref = torch.stack([ops[op](x[b], f[b]) for b in range(3)])
        assert torch.allclose(out, ref, atol=2e-6), op


def test_batched_colour_is_each_clips_own_change():
    videos = torch.randint(0, 256, (5, 2, 3, 8, 8), dtype=torch.uint8)
    params = [colour_params(random.Random(i)) for i in range(5)]
    orders = [o for o, _ in params]
    orders[2] = None  # clip 2 unchanged
    out = apply_colour(videos, orders, torch.tensor([f for _, f in params]))
    assert torch.equal(out[2], videos[2])
    assert len({o for o in orders if o}) > 1  # the batch mixes op orders
    for b in (0, 1, 3, 4):
        assert torch.equal(out[b], apply_colour(videos[b : b + 1], [orders[b]], torch.tensor([params[b][1]]))[0])
        assert not torch.equal(out[b], videos[b])


@pytest.mark.parametrize("workers", [0, 2])
def test_training_views_are_the_same_on_either_path(demo_shards, workers):
    cpu = batches(demo_shards, "train", False, num_workers=workers)
    dev = batches(demo_shards, "train", True, num_workers=workers)
    assert len(cpu) == len(dev) > 0
    flips = colours = 0
    for a, b in zip(cpu, dev):
        assert a["key"] == b["key"] and set(a) == set(b)
        for k in ("audio", "label", "has_audio", "has_video", "view"):
            assert torch.equal(a[k], b[k]), k
        assert b["video"].dtype == torch.uint8 and b["video"].shape == a["video"].shape == (3, 4, 3, 32, 32)
        # both decode with libjpeg and resize/colour with the same functions: the pixels agree
        assert (a["video"].int() - b["video"].int()).abs().max() <= 1
    # the augmentation is really on (so the comparison covers flips and colour): same seeds, drawn again
    loader = dm(demo_shards, decode_on_device=True, num_workers=workers).train_dataloader()
    for batch in (b for _ in range(3) for b in loader):  # a few epochs: a tiny epoch may draw no flip
        views = [v for v in batch["frames"].views if v is not None]
        flips += sum(v.flip for v in views)
        colours += sum(v.colour is not None for v in views)
        assert all(len(j) == 4 for j, v in zip(batch["frames"].jpegs, batch["frames"].views) if v is not None)
        assert isinstance(batch["frames"], EncodedFrames) and len(batch["frames"]) == 3 and "video" not in batch
    assert flips > 0 and colours > 0


def test_evaluation_views_are_the_same_on_either_path_and_frames_decode_once(demo_shards, monkeypatch):
    kw = dict(eval_windows=2, eval_crops=3)
    cpu = batches(demo_shards, "test", False, **kw)
    decoded = []
    real = device_module.decode_jpeg
    monkeypatch.setattr(device_module, "decode_jpeg", lambda data, **k: decoded.append(len(data)) or real(data, **k))
    module = dm(demo_shards, decode_on_device=True, **kw)
    dev, views = [], 0
    for batch in module.test_dataloader():
        views += sum(len(j) for j in batch["frames"].jpegs)
        distinct = len({id(f) for j in batch["frames"].jpegs for f in j})
        dev.append(decode_on_device(batch, "cpu"))
        assert decoded[-1] == distinct
    assert sum(decoded) < views  # crops of one window (and looped frames) share their decode
    assert [k for b in cpu for k in b["key"]] == [k for b in dev for k in b["key"]]
    for a, b in zip(cpu, dev):
        assert torch.equal(a["view"], b["view"]) and torch.equal(a["has_video"], b["has_video"])
        assert (a["video"].int() - b["video"].int()).abs().max() <= 1
        assert not b["video"][~b["has_video"]].any()  # audio-only clips: zero frames


def test_auto_decodes_on_the_device_only_under_a_cuda_trainer(demo_shards):
    module = dm(demo_shards)
    assert module.decode_on_device == "auto" and not module.frames_on_device()  # no trainer: workers decode
    module.trainer = pl.Trainer(accelerator="cpu", logger=False)
    assert not module.frames_on_device()
    assert "video" in next(iter(module.train_dataloader()))
    with pytest.raises(ValueError, match="decode_on_device must be auto, true or false"):
        dm(demo_shards, decode_on_device="gpu")


class _Batches(pl.Callback):
    def __init__(self):
        self.video = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.video.append(batch["video"])


def test_the_model_receives_decoded_frames_from_the_hook(demo_shards):
    module = dm(demo_shards, decode_on_device=True, image_size=64)
    task = SupervisedTask(backbone=zorro_vit_tiny(num_frames=4, image_size=64), dataset=module.info,
                          optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    seen = _Batches()
    trainer = pl.Trainer(fast_dev_run=2, callbacks=[seen], logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(task, datamodule=module)
    expected = batches(demo_shards, "train", False, image_size=64)[:2]
    assert [v.shape for v in seen.video] == [(3, 4, 3, 64, 64)] * 2
    assert all((v.int() - e["video"].int()).abs().max() <= 1 for v, e in zip(seen.video, expected))


def test_train_py_fast_dev_run_with_frames_decoded_on_the_device(demo_shards, tmp_path):
    run_script(ROOT / "train.py", "model=zorro_vit_tiny", "data=shards", f"data.root={demo_shards}",
               "data.decode_on_device=true", "data.num_workers=0", "data.batch_size=2", "trainer.fast_dev_run=true",
               "logger=none", f"hydra.run.dir={tmp_path}")


def test_tar_samples_reads_what_webdataset_reads(demo_shards, tiny_shards, tmp_path):
    import webdataset as wds

    for url in [*sorted(demo_shards.glob("*.tar")), *sorted(tiny_shards.glob("*.tar"))]:
        assert list(tar_samples([str(url)])) == list(wds.tariterators.tarfile_samples([{"url": str(url)}]))
    members = {"a/" + "d" * 120 + "/clip1.f000.JPG": b"x" * 700, "a/" + "d" * 120 + "/clip1.json": b"{}",
               "clip2.flac": b"y", "__meta__": b"", "clíp3.json": b"[]"}  # long names, upper case, non-ASCII
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt, encoding="utf-8") as tar:
            for name, data in members.items():
                if fmt == tarfile.USTAR_FORMAT and not name.isascii():
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        ours = list(tar_samples([str(path)]))
        assert ours == list(wds.tariterators.tarfile_samples([{"url": str(path)}])) and len(ours) >= 2, fmt
        assert ours[0]["f000.jpg"] == b"x" * 700
    data = (tmp_path / f"{tarfile.PAX_FORMAT}.tar").read_bytes()
    for cut in (1500, 1536 + 300):  # in a header, in a member's data
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated tar"):
            list(tar_samples([str(tmp_path / "cut.tar")]))
    (tmp_path / "bad.tar").write_bytes(data[:100] + b"?" + data[101:])
    with pytest.raises(ValueError, match="corrupt tar header"):
        list(tar_samples([str(tmp_path / "bad.tar")]))
