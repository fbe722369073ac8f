"""Mixed unimodal training (Zorro section 4.4): e.g. AudioSet audio only + Kinetics-400 video only.

Each training batch comes whole from one of two shard datasets, audio-only with probability `p_audio`, with
the other modality zeroed and flagged absent (so the task computes no loss for it). The class space is the
union of both datasets' classes (labels are remapped into it), so one set of heads serves both.
"""

from __future__ import annotations

import random

import lightning.pytorch as pl
import torch
from torch.utils.data import IterableDataset

from .info import DatasetInfo
from .shards import ShardDataModule


class _Remap:
    """Maps a dataset's label indices / multi-hot vectors into the union class space."""

    def __init__(self, own: DatasetInfo, union: list[str], multi_label: bool):
        self.index = torch.tensor([union.index(c) for c in own.class_names])
        self.num_classes, self.multi_label, self.own_multi = len(union), multi_label, own.multi_label

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        if not self.multi_label:
            return self.index[label]
        out = torch.zeros(label.shape[0], self.num_classes)
        if self.own_multi:
            out[:, self.index] = label
        else:
            out[torch.arange(label.shape[0]), self.index[label]] = 1.0
        return out


class _MixedBatches(IterableDataset):
    def __init__(self, loaders: dict, remaps: dict, p_audio: float, length: int, seed: int):
        self.loaders, self.remaps, self.p_audio, self.length, self.seed = loaders, remaps, p_audio, length, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rng = random.Random(hash((self.seed, self.epoch)))
        self.epoch += 1
        iters = {k: iter(v) for k, v in self.loaders.items()}
        for _ in range(self.length):
            source = "audio" if rng.random() < self.p_audio else "video"
            try:
                batch = next(iters[source])
            except StopIteration:  # that dataset's epoch ended first: start it again
                iters[source] = iter(self.loaders[source])
                batch = next(iters[source])
            batch["label"] = self.remaps[source](batch["label"])
            batch["source"] = source
            yield batch


class MixedModalityDataModule(pl.LightningDataModule):
    """`data=mixed data.audio_root=AUDIOSET data.video_root=K400`: batches from one dataset at a time.

    Validation and test use the audio dataset's splits (set `eval_source: video` for the other).
    """

    def __init__(self, *, audio_root: str, video_root: str, p_audio: float = 0.5, eval_source: str = "audio",
                 seed: int = 0, **shard_kwargs):
        super().__init__()
        if not 0.0 <= p_audio <= 1.0:
            raise ValueError(f"p_audio must be in [0, 1], got {p_audio}")
        self.modules = {"audio": ShardDataModule(root=audio_root, modalities=("audio",), seed=seed, **shard_kwargs),
                        "video": ShardDataModule(root=video_root, modalities=("video",), seed=seed, **shard_kwargs)}
        infos = {k: m.info for k, m in self.modules.items()}
        union = sorted(set(infos["audio"].class_names) | set(infos["video"].class_names))
        multi = any(i.multi_label for i in infos.values())
        self.info = DatasetInfo(num_classes=len(union), multi_label=multi, class_names=tuple(union))
        self.remaps = {k: _Remap(i, union, multi) for k, i in infos.items()}
        self.p_audio, self.eval_source, self.seed = p_audio, eval_source, seed

    def has_split(self, stage: str) -> bool:
        if stage == "train":
            return all(m.has_split("train") for m in self.modules.values())
        return self.modules[self.eval_source].has_split(stage)

    def _share_trainer(self) -> None:
        for m in self.modules.values():  # data.decode_on_device=auto asks the trainer for its accelerator
            m.trainer = self.trainer

    def train_dataloader(self):
        self._share_trainer()
        loaders = {k: m.train_dataloader() for k, m in self.modules.items()}
        length = sum(len(v) for v in loaders.values())
        # batches are already collated: an outer loader with batch_size=None just passes them through
        return torch.utils.data.DataLoader(_MixedBatches(loaders, self.remaps, self.p_audio, length, self.seed),
                                           batch_size=None)

    def _eval(self, stage: str):
        if not self.has_split(stage):
            return []
        self._share_trainer()
        module = self.modules[self.eval_source]
        remap = self.remaps[self.eval_source]

        class _Remapped(IterableDataset):
            def __iter__(self_inner):
                for batch in getattr(module, f"{stage}_dataloader")():
                    batch["label"] = remap(batch["label"])
                    yield batch

        return torch.utils.data.DataLoader(_Remapped(), batch_size=None)

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")
