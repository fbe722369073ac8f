"""An in-memory dataset of random tensors with a real audio-visual signal, for tests and quick runs.

Each clip shows a coloured square (red or blue) moving over noise and plays a tone (low or high) in noise.
The 4 classes are colour x pitch, so audio alone or video alone reaches at most 50% top-1 and both
together 100% (chance: 25%): the A / V / A+V table of a run says whether fusion works.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .info import DatasetInfo

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
PITCHES = {"low": 440.0, "high": 1760.0}
CLASSES = tuple(f"{c}_{p}" for c in COLOURS for p in PITCHES)


class SyntheticAVDataset(Dataset):
    """`views` > 1: each clip is `views` items with the same key and audio and successive frames of one
    longer clip (num_frames x views frames), like several evaluation windows of a real clip."""

    def __init__(self, *, size: int, seed: int, num_frames: int, image_size: int, sample_rate: int,
                 clip_seconds: float, multi_label: bool = False, missing_prob: float = 0.0, views: int = 1):
        self.size, self.seed, self.views = size, seed, views
        self.num_frames, self.image_size = num_frames, image_size
        self.sample_rate, self.num_samples = sample_rate, round(clip_seconds * sample_rate)
        self.multi_label, self.missing_prob = multi_label, missing_prob

    def __len__(self) -> int:
        return self.size * self.views

    def __getitem__(self, item: int) -> dict:
        index, view = divmod(item, self.views)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        colour, pitch = int(torch.randint(2, (1,), generator=g)), int(torch.randint(2, (1,), generator=g))
        T, S = self.num_frames * self.views, self.image_size
        video = torch.randint(0, 96, (T, 3, S, S), generator=g, dtype=torch.uint8)
        side = max(S // 4, 2)
        x0, y0 = torch.randint(0, S - side, (2,), generator=g).tolist()
        dx, dy = torch.randint(-3, 4, (2,), generator=g).tolist()
        rgb = torch.tensor(list(COLOURS.values())[colour], dtype=torch.uint8).view(3, 1, 1)
        for t in range(T):
            x, y = min(max(x0 + dx * t, 0), S - side), min(max(y0 + dy * t, 0), S - side)
            video[t, :, y : y + side, x : x + side] = rgb
        video = video[view * self.num_frames : (view + 1) * self.num_frames]
        time = torch.arange(self.num_samples) / self.sample_rate
        freq = list(PITCHES.values())[pitch] * float(1 + 0.05 * torch.randn(1, generator=g))
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        wave = 0.3 * torch.sin(2 * math.pi * freq * time + phase) + 0.1 * torch.randn(self.num_samples, generator=g)
        audio = (wave.clamp(-1, 1) * 32767).to(torch.int16)
        has_audio = has_video = True
        if self.missing_prob and float(torch.rand(1, generator=g)) < self.missing_prob:
            if float(torch.rand(1, generator=g)) < 0.5:
                has_audio, audio = False, torch.zeros_like(audio)
            else:
                has_video, video = False, torch.zeros_like(video)
        cls = colour * len(PITCHES) + pitch
        label = torch.zeros(len(CLASSES)) if self.multi_label else torch.tensor(cls)
        if self.multi_label:  # multi-hot over the 4 classes: the true one and its same-colour neighbour
            label[cls] = label[colour * len(PITCHES) + (1 - pitch)] = 1.0
        return {"video": video, "audio": audio, "label": label, "has_audio": torch.tensor(has_audio),
                "has_video": torch.tensor(has_video), "key": f"synthetic-{self.seed}-{index:06d}"}


class SyntheticDataModule(pl.LightningDataModule):
    """Synthetic batches that follow the batch contract (docs/data_format.md)."""

    def __init__(self, *, num_train: int = 256, num_val: int = 64, num_test: int = 64, batch_size: int = 16,
                 num_workers: int = 0, num_frames: int = 8, image_size: int = 224, sample_rate: int = 48_000,
                 clip_seconds: float = 2.56, multi_label: bool = False, missing_prob: float = 0.0,
                 eval_views: int = 1, seed: int = 0):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.info = DatasetInfo(num_classes=len(CLASSES), multi_label=multi_label, class_names=CLASSES)
        common = dict(num_frames=num_frames, image_size=image_size, sample_rate=sample_rate,
                      clip_seconds=clip_seconds, multi_label=multi_label)
        self.splits = {
            name: SyntheticAVDataset(size=n, seed=seed * 3 + i, missing_prob=missing_prob if name == "train" else 0.0,
                                     views=1 if name == "train" else eval_views, **common)
            for i, (name, n) in enumerate((("train", num_train), ("val", num_val), ("test", num_test))) if n > 0
        }

    def has_split(self, name: str) -> bool:
        return name in self.splits

    def _loader(self, name: str, shuffle: bool):
        if name not in self.splits:
            return []
        return DataLoader(self.splits[name], batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def feature_dataloader(self, stage: str):
        return self._loader(stage, shuffle=False)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)
