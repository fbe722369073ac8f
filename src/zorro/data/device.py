"""Frames decoded on the accelerator (`data.decode_on_device`, DESIGN.md "the batch contract").

Workers only read bytes: each view carries its window's JPEG frames still encoded plus the crop box, flip and
colour change drawn from the sample's seed (transforms.View). The task's `on_after_batch_transfer` decodes the
whole batch at once (`torchvision.io.decode_jpeg(list, device=...)`: nvJPEG on CUDA, libjpeg on CPU) and applies
the same crop/resize/flip/colour functions as the worker path, so a seed gives the same views on either path and
the model still receives `video` B x T x 3 x H x W uint8.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from .transforms import View, apply_colour, crop_flip


class EncodedFrames:
    """The JPEG frames (bytes) of a batch of views and each view's augmentation, with the output size.

    Deliberately neither a tensor nor a dataclass: Lightning moves only those to the device, and decode_jpeg
    reads its input from host memory whatever the output device. A view without video has no frames."""

    def __init__(self, jpegs: list[list[bytes]], views: list[View | None], *, size: int, num_frames: int):
        self.jpegs, self.views, self.size, self.num_frames = jpegs, views, size, num_frames

    def __len__(self) -> int:
        return len(self.jpegs)

    @classmethod
    def cat(cls, parts: Sequence[EncodedFrames]) -> EncodedFrames:
        sizes = {(p.size, p.num_frames) for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"encoded frames of different output shapes in one batch: {sorted(sizes)}")
        return cls([j for p in parts for j in p.jpegs], [v for p in parts for v in p.views],
                   size=parts[0].size, num_frames=parts[0].num_frames)


def collate(samples: list[dict]) -> dict:
    """default_collate, with the views' EncodedFrames gathered into one (the loaders' collate_fn)."""
    if not samples or "frames" not in samples[0]:
        return default_collate(samples)
    batch = default_collate([{k: v for k, v in s.items() if k != "frames"} for s in samples])
    batch["frames"] = EncodedFrames.cat([s["frames"] for s in samples])
    return batch


def decode_views(frames: EncodedFrames, device: torch.device | str) -> torch.Tensor:
    """EncodedFrames -> uint8 B x T x 3 x size x size on `device` (zeros for views without video)."""
    # One decode per distinct frame: evaluation crops of a window, and looped short clips, share frames (the
    # same bytes object, also after the worker -> main process pickle, which keeps shared references).
    slot: dict[int, int] = {}
    data = []
    with warnings.catch_warnings():  # decode_jpeg only reads the (immutable) bytes: no copy needed
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        for clip in frames.jpegs:
            for jpeg in clip:
                if id(jpeg) not in slot:
                    slot[id(jpeg)] = len(data)
                    data.append(torch.frombuffer(jpeg, dtype=torch.uint8))
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
    s, t = frames.size, frames.num_frames
    out = torch.zeros(len(frames), t, 3, s, s, dtype=torch.uint8, device=device)
    for b, (clip, view) in enumerate(zip(frames.jpegs, frames.views)):
        if clip:  # crops differ per view (boxes and source sizes), so resize view by view
            out[b] = crop_flip(torch.stack([decoded[slot[id(j)]] for j in clip]), view, s)
    orders = [v.colour[0] if v is not None and v.colour is not None and clip else None
              for v, clip in zip(frames.views, frames.jpegs)]
    factors = torch.tensor([v.colour[1] if o is not None else (0.0,) * 4 for v, o in zip(frames.views, orders)])
    factors = factors.to(device, non_blocking=True)
    # CUDA: the whole batch at once (few launches); CPU: clip by clip, which stays in cache (2x faster here)
    step = len(frames) if out.is_cuda else 1
    for i in range(0, len(frames), step):
        out[i : i + step] = apply_colour(out[i : i + step], orders[i : i + step], factors[i : i + step])
    return out


def decode_on_device(batch, device: torch.device | str):
    """`batch` with its EncodedFrames ("frames") replaced by the contract's `video`; other batches unchanged."""
    if not isinstance(batch, dict) or not isinstance(batch.get("frames"), EncodedFrames):
        return batch
    batch = dict(batch)
    batch["video"] = decode_views(batch.pop("frames"), device)
    return batch
