"""One raw shard sample (JPEG frames, FLAC/wav audio, JSON metadata) -> contract samples: the training view, or
the evaluation windows x crops."""

from __future__ import annotations

import io
import json
import random
import re
from typing import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .device import EncodedFrames
from .transforms import (AUDIO_ALIGN, View, audio_span, augment, colour_params, eval_crop_boxes, random_resized_box,
                         window_audio, window_frame_indices, window_starts)

FRAME = re.compile(r"^f(\d+)\.jpg$")


class ClipSampler:
    """Raw shard sample -> one (training) or windows x crops (evaluation) contract samples."""

    def __init__(self, *, num_classes: int, multi_label: bool, num_frames: int, frame_rate: float, image_size: int,
                 sample_rate: int, train: bool, min_crop_scale: float, aspect_ratio: Sequence[float], flip: bool,
                 color_prob: float, windows: int, crops: int, modalities: Sequence[str],
                 audio_seconds: float | None = None, audio_align: str = "window_centre"):
        self.num_classes, self.multi_label = num_classes, multi_label
        self.num_frames, self.frame_rate, self.image_size, self.sample_rate = num_frames, frame_rate, image_size, sample_rate
        self.window = num_frames / frame_rate
        self.train, self.min_crop_scale, self.aspect_ratio = train, min_crop_scale, tuple(aspect_ratio)
        self.flip, self.color_prob, self.windows, self.crops = flip, color_prob, windows, crops
        self.modalities = set(modalities)
        # The audio of a view is `audio_seconds` long (None: the frames' window), placed by `audio_align`
        # (audio_span): window_centre centres it on the frames' window (Zorro, MBT: the same span); clip_start gives
        # every view the clip's first `audio_seconds` whatever its frames (CAV-MAE: 10 s of audio, one frame).
        if audio_align not in AUDIO_ALIGN:
            raise ValueError(f"audio_align must be one of {AUDIO_ALIGN}, got {audio_align!r}")
        if audio_seconds is not None and audio_seconds <= 0:
            raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
        self.audio_seconds, self.audio_align = audio_seconds or self.window, audio_align
        self.encoded = False  # True: views carry JPEG bytes + augmentation for the device (zorro.data.device)

    def label(self, meta: dict) -> torch.Tensor:
        ids = meta.get("label_ids", [])
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.num_classes)]
        if bad:  # else a CUDA assert or an IndexError deep in the loss, far from the clip that caused it
            raise ValueError(f"clip {meta.get('key')} has label id(s) {bad}, outside the manifest's "
                             f"{self.num_classes} classes")
        if self.multi_label:
            y = torch.zeros(self.num_classes)
            y[ids] = 1.0
            return y
        if len(ids) != 1:
            raise ValueError(f"single-label data but clip {meta.get('key')} has labels {ids}")
        return torch.tensor(ids[0])

    def audio(self, raw: dict, meta: dict, span: tuple[float, float] | None = None) -> np.ndarray | None:
        """The clip's audio at the model's rate; only `span` = (start, seconds) of it when given and inside
        the clip (training reads 2.56 s, not the whole 10 s clip)."""
        if not meta.get("has_audio") or "audio" not in self.modalities:
            return None
        import soundfile as sf

        with sf.SoundFile(io.BytesIO(raw.get("flac") or raw.get("wav"))) as f:
            sr = f.samplerate
            if span is not None:
                f.seek(min(int(round(span[0] * sr)), f.frames))  # rounded as window_audio does
                wav = f.read(int(round(span[1] * sr)), dtype="int16")
            else:
                wav = f.read(dtype="int16")
        if wav.ndim > 1:
            wav = wav.mean(axis=1).astype(np.int16)
        if sr != self.sample_rate:
            import torchaudio.functional as AF

            wav = AF.resample(torch.from_numpy(wav.astype(np.float32) / 32768), sr, self.sample_rate)
            wav = (wav.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
        return wav

    def __call__(self, raw: dict, rng: random.Random):
        meta = json.loads(raw["json"])
        key, label = meta["key"], self.label(meta)
        frames = sorted(((int(m.group(1)), k) for k in raw if (m := FRAME.match(k))))
        has_video = bool(meta.get("has_video")) and bool(frames) and "video" in self.modalities
        duration = float(meta.get("duration") or 0.0)
        if self.train:
            starts = [rng.uniform(0, max(duration - self.window, 0.0))]
        else:
            starts = window_starts(duration, self.window, self.windows)
        offset, audio_seconds = 0.0, self.audio_seconds  # offset: time of the first sample of `audio`
        spans = [audio_span(start, window=self.window, seconds=audio_seconds, duration=duration, align=self.audio_align)
                 for start in starts]
        if len(set(spans)) == 1 and 0.0 <= spans[0] and spans[0] + audio_seconds <= duration:
            offset = spans[0]  # one span inside the clip: read only that (training reads 2.56 s of a 10 s clip)
            audio = self.audio(raw, meta, span=(offset, audio_seconds))
        else:  # several spans, or a short clip to loop
            audio = self.audio(raw, meta)
        n_audio = int(round(audio_seconds * self.sample_rate))
        for view_w, start in enumerate(starts):
            if has_video:
                idx = window_frame_indices(start=start, num_frames=self.num_frames, frame_rate=self.frame_rate,
                                           stored_fps=float(meta["fps"]), num_stored=len(frames))
                jpegs = [raw[frames[i][1]] for i in idx]
                if self.encoded:  # the device decodes; the box only needs the frame size, from the JPEG header
                    width, height = jpeg_size(jpegs[0])
                else:
                    clip = torch.stack([decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8),
                                                    mode=ImageReadMode.RGB) for j in jpegs])
                    height, width = clip.shape[-2:]
                views = self._views(height, width, rng)
            else:
                jpegs, views = [], [None]  # no frames: spatial crops would be identical views
            wav = torch.zeros(n_audio, dtype=torch.int16) if audio is None else torch.from_numpy(
                window_audio(audio, start=spans[view_w] - offset, seconds=audio_seconds,
                             sample_rate=self.sample_rate).astype(np.int16))
            for view_c, view in enumerate(views):
                sample = {"audio": wav, "label": label, "has_video": torch.tensor(has_video),
                          "has_audio": torch.tensor(audio is not None), "key": key,
                          "view": torch.tensor(view_w * len(views) + view_c)}
                if self.encoded:
                    sample["frames"] = EncodedFrames([jpegs], [view], size=self.image_size, num_frames=self.num_frames)
                elif has_video:
                    sample["video"] = augment(clip, view, self.image_size)
                else:
                    sample["video"] = torch.zeros(self.num_frames, 3, self.image_size, self.image_size,
                                                  dtype=torch.uint8)
                yield sample

    def _views(self, height: int, width: int, rng: random.Random) -> list[View]:
        """The views of one window: crop boxes, then per box (training only) flip and colour, in this order of
        draws from `rng` on either path."""
        if not self.train:
            return [View(box) for box in eval_crop_boxes(height, width, self.crops)]
        box = random_resized_box(height, width, scale=(self.min_crop_scale, 1.0), ratio=self.aspect_ratio, rng=rng)
        flip = self.flip and rng.random() < 0.5
        colour = colour_params(rng) if rng.random() < self.color_prob else None
        return [View(box, flip, colour)]


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG header alone."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        return image.size
