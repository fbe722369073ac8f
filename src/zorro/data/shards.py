"""`data=shards`: the DataModule over the WebDataset shards written by `data_prep` (docs/data_format.md). Reading
is in reading.py, decoding a sample into views in clips.py, splitting the work over ranks and workers in stream.py."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError
from .clips import ClipSampler
from .device import collate
from .info import DatasetInfo
from .reading import READ_RETRIES, READ_TIMEOUT, is_url, read_manifest, shard_url
from .stream import ShardStream, assign_shards, rank_world, samples_per_slot


class ShardDataModule(pl.LightningDataModule):
    """`data=shards data.root=DIR`: the manifest gives classes, splits and epoch length; absent splits are not run."""

    def __init__(self, *, root: str, batch_size: int = 8, num_workers: int = 4, num_frames: int = 8,
                 frame_rate: float = 3.125, image_size: int = 224, sample_rate: int = 48_000,
                 min_crop_scale: float = 0.3, aspect_ratio: Sequence[float] = (0.75, 1.3333), flip: bool = True,
                 color_prob: float = 0.8, shuffle_buffer: int = 512, eval_windows: int = 4, eval_crops: int = 3,
                 epoch_length: int | None = None, train_split: str = "train", val_split: str = "val",
                 test_split: str = "test", cv_fold: int | None = None,
                 modalities: Sequence[str] = ("audio", "video"), audio_seconds: float | None = None,
                 audio_align: str = "window_centre", pin_memory: bool = False, decode_on_device: bool | str = "auto",
                 seed: int = 0, cache_dir: str | None = None, max_bad_fraction: float = 0.01,
                 read_timeout: float = READ_TIMEOUT, read_retries: int = READ_RETRIES,
                 storage_options: dict | None = None):
        super().__init__()
        if decode_on_device not in ("auto", True, False):
            raise ValueError(f"decode_on_device must be auto, true or false, got {decode_on_device!r}")
        self.decode_on_device = decode_on_device
        self.root = root if is_url(root) else Path(root)  # a folder or a URL (docs/cluster_training.md)
        self.cache_dir, self.max_bad_fraction = cache_dir, max_bad_fraction
        # every remote read: bounded in time and retried (reading.RemoteReader); fsspec's options (an S3
        # endpoint, credentials) as a plain dict, which the loader workers get with the dataset
        self.remote = dict(timeout=float(read_timeout), retries=int(read_retries),
                           storage_options=_plain(storage_options))
        self.manifest = read_manifest(root, **self.remote)
        self.info = DatasetInfo(num_classes=len(self.manifest["classes"]), multi_label=bool(self.manifest["multi_label"]),
                                class_names=tuple(self.manifest["classes"]))
        if not set(modalities) <= {"audio", "video"} or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of (audio, video), got {modalities}")
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.epoch_length, self.shuffle_buffer = epoch_length, shuffle_buffer
        # Each stage reads one or more manifest splits. Cross-validation (ESC-50: shards written with
        # `data_prep --split-by-fold`): fold k is the test set, the other folds train, and there is no
        # validation split (selecting checkpoints on the test fold would leak it).
        self.split_names = {"train": [train_split], "val": [val_split], "test": [test_split]}
        if cv_fold is not None:
            folds = sorted(k for k in self.manifest["splits"] if re.fullmatch(r"fold\d+", k))
            if f"fold{cv_fold}" not in folds:
                raise ValueError(f"cv_fold={cv_fold}: {root} has splits {sorted(self.manifest['splits'])}; "
                                 f"write them with `python -m data_prep ... --split-by-fold`")
            self.split_names = {"train": [f for f in folds if f != f"fold{cv_fold}"], "val": [],
                                "test": [f"fold{cv_fold}"]}
        common = dict(num_classes=self.info.num_classes, multi_label=self.info.multi_label, num_frames=num_frames,
                      frame_rate=frame_rate, image_size=image_size, sample_rate=sample_rate,
                      min_crop_scale=min_crop_scale, aspect_ratio=aspect_ratio, flip=flip, color_prob=color_prob,
                      modalities=modalities, audio_seconds=audio_seconds, audio_align=audio_align)
        self._check_splits(root, cv_fold)
        self.samplers = {"train": ClipSampler(train=True, windows=1, crops=1, **common),
                         "eval": ClipSampler(train=False, windows=eval_windows, crops=eval_crops, **common),
                         "features": ClipSampler(train=False, windows=1, crops=1, **common)}  # linear probe
        self._streams: dict[str, ShardStream] = {}
        self._resume: tuple[int, int] | None = None

    def _shards(self, stage: str) -> list[dict]:
        names = self.split_names.get(stage, [stage])
        return [s for name in names for s in self.manifest["splits"].get(name, {}).get("shards", [])]

    def has_split(self, stage: str) -> bool:
        return self.split_size(stage) > 0

    def split_size(self, stage: str) -> int:
        """Clips the manifest lists for `stage` (what an evaluation of it must score)."""
        return sum(s["num_samples"] for s in self._shards(stage))

    def _check_splits(self, root, cv_fold) -> None:
        """A split named in the config that the manifest lacks is a typo (data.train_split=trian), not an
        absent split: one line naming the splits there are. The default names may be absent (no val split)."""
        if cv_fold is not None:
            return
        have = sorted(self.manifest["splits"])
        for stage, (name,) in self.split_names.items():
            if name and name != stage and name not in self.manifest["splits"]:
                raise ConfigError(f"data.{stage}_split={name}: {root} has no split {name!r}; its manifest has "
                                  f"{', '.join(have) or 'no splits'}")

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.has_split("train"):  # else Lightning trains nothing and says nothing
            name = ", ".join(self.split_names["train"])
            raise ConfigError(f"data.train_split={name}: {self.root} has no training samples in {name!r}; its "
                              f"manifest has {', '.join(sorted(self.manifest['splits'])) or 'no splits'}")

    def _stream(self, stage: str, **kw) -> ShardStream:
        shards = self._shards(stage)
        return ShardStream(shards=[shard_url(self.root, s["name"]) for s in shards],
                           counts=[s["num_samples"] for s in shards], sizes=[s.get("size") for s in shards],
                           digests=[s.get("sha256") for s in shards], cache_dir=self.cache_dir,
                           remote=self.remote, seed=self.seed, workers=max(1, self.num_workers), **kw)

    def modality_counts(self, stages=("train", "val", "test")) -> dict[str, int] | None:
        """{"audio": clips with audio, "video": clips with video} in the splits this run reads for `stages`, from
        the manifest (data_prep counts them per shard); None for shards written before it did."""
        shards = [s for stage in stages for s in self._shards(stage)]
        if not shards or not all("num_audio" in s and "num_video" in s for s in shards):
            return None
        return {m: sum(s[f"num_{m}"] for s in shards) for m in ("audio", "video")}

    def num_batches(self, stage: str) -> int | None:
        """Batches of this rank's `stage` evaluation loader, where that is known before reading it: every clip one
        view (eval_windows=1, and eval_crops=1 or no frames read), so the progress bars can show a total (an
        evaluation stream has no __len__). Unreadable samples end it earlier."""
        sampler = self.samplers["eval"]
        if stage == "train" or sampler.windows != 1 or (sampler.crops != 1 and "video" in sampler.modalities):
            return None
        counts = [s["num_samples"] for s in self._shards(stage)]
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        slots = workers * world
        if len(counts) >= slots:  # as ShardStream._raw splits them: whole shards per slot ...
            per_slot = [sum(counts[i] for i in share) for share in assign_shards(counts, slots)]
        else:  # ... or every slots-th sample of all of them
            per_slot = [len(range(slot, sum(counts), slots)) for slot in range(slots)]
        return sum(-(-n // self.batch_size) for n in per_slot[rank * workers:(rank + 1) * workers])

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer  # None outside a Trainer (tests, benchmarks)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return rank_world()

    def stream(self, stage: str) -> ShardStream:
        counts = [s["num_samples"] for s in self._shards(stage)]
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        if stage != "train":
            return self._stream(stage, sampler=self._sampler("eval"), train=False, rank=rank, world=world)
        slots = workers * world
        per_slot = samples_per_slot(counts, slots)  # no repeats within an epoch
        if self.epoch_length:  # a fixed epoch length (shorter, or longer with repeats)
            per_slot = self.epoch_length // slots
        per_slot = max(per_slot // self.batch_size, 1) * self.batch_size  # whole batches, equal everywhere
        stream = self._stream("train", sampler=self._sampler("train"), train=True, samples_per_slot=per_slot,
                              length=per_slot * workers, shuffle_buffer=self.shuffle_buffer, rank=rank, world=world,
                              batch_size=self.batch_size)
        if self._resume:  # the epoch a resumed fit starts in, without the batches trained (see ShardStream._loop)
            epoch, done = self._resume
            stream.epoch, stream.resume = epoch, self._resume if done else None
            self._resume = None
        return stream

    def frames_on_device(self) -> bool:
        """data.decode_on_device: `auto` decodes the frames on the device when the trainer runs on CUDA (nvJPEG);
        outside a trainer (tests, benchmarks, evaluate.py's linear probe) and on CPU the workers decode them."""
        if self.decode_on_device == "auto":
            from lightning.pytorch.accelerators import CUDAAccelerator

            return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return bool(self.decode_on_device)

    def _sampler(self, name: str) -> ClipSampler:
        sampler = copy.copy(self.samplers[name])
        sampler.encoded = self.frames_on_device()
        return sampler

    # Lightning saves these in checkpoints and restores them before it builds the loaders.
    def state_dict(self) -> dict:
        trainer = self.trainer
        # During fit, including its validation (a preemption checkpoint can be written mid-validation); not
        # for validate()/test() runs, which have no training stream to continue.
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # The epoch the resumed fit starts in and the batches of it already trained, as Lightning resumes: inside
        # an epoch's loop (training or its validation) it restarts that epoch, even with all its batches trained
        # (it then validates again: zorro.preemption), except from a checkpoint written as the epoch's last batch
        # ended (every_n_train_steps); from the epoch's end hooks on, it starts the next epoch.
        epochs = trainer.fit_loop.epoch_progress.current
        batches = trainer.fit_loop.epoch_loop.batch_progress
        if epochs.started == epochs.ready and epochs.processed == epochs.ready - 1:
            if not (batches.is_last_batch and batches.current.completed < batches.current.processed):
                return {"epoch": epochs.processed, "batches": batches.current.processed}
            return {"epoch": epochs.processed + 1, "batches": 0}
        return {"epoch": epochs.processed, "batches": 0}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (state["epoch"], state["batches"]) if "epoch" in state else None

    def skipped(self, stage: str = "train") -> int:
        """Unreadable samples skipped so far by this process's `stage` stream (all its workers, all epochs)."""
        stream = self._streams.get(stage)
        return stream.skipped if stream is not None else 0

    def check_skipped(self, skipped: int, epochs: int = 1) -> None:
        """Fail when more than max_bad_fraction of this rank's `epochs` epochs was unreadable: a few bad clips in a
        large dataset are skipped, a broken dataset is not silently trained on."""
        stream = self._streams.get("train")
        if stream is None or skipped <= self.max_bad_fraction * len(stream) * epochs:
            return
        raise DataError(f"{skipped} unreadable training samples in {epochs} epoch(s) of {len(stream)} samples on "
                        f"this rank: more than data.max_bad_fraction={self.max_bad_fraction:g}; the warnings above "
                        f"name them (re-run data_prep for those shards, or raise data.max_bad_fraction)")

    def _loader(self, stage: str):
        if not self.has_split(stage):
            return []  # Lightning skips a stage whose loader is empty
        if stage not in self._streams:
            self._streams[stage] = self.stream(stage)
        return DataLoader(self._streams[stage], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
                          drop_last=stage == "train", collate_fn=collate)

    def feature_dataloader(self, stage: str):
        """Deterministic loader for frozen-feature extraction (linear probe): the train split as one central,
        unaugmented view per clip; other splits with their evaluation views."""
        if stage != "train":
            if not self.has_split(stage):
                return []
            stream = self.stream(stage)  # encoded frames where the trainer decodes them (the probe's trainer.predict)
            return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)
        sampler = self._sampler("features")
        rank, world = self._rank_world()
        stream = self._stream("train", sampler=sampler, train=False, rank=rank, world=world)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")


def _plain(options) -> dict:
    """storage_options as a plain dict (an OmegaConf node from Hydra is neither picklable nor what fsspec takes)."""
    if options is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(options):
            return OmegaConf.to_container(options, resolve=True)
    except ImportError:
        pass
    return dict(options)
