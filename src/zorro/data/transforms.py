"""Per-clip sampling and augmentation, run in data-loader workers on one decoded clip.

Windows (Zorro appendix B): `num_frames` frames at `frame_rate` (AudioSet: 8 at 3.125 FPS = 2.56 s) and audio of
a configured length centred on them (by default the same span; `audio_span`); clips shorter than the window are
looped (the paper loops ESC-50's 5 s clips to the pre-training length).
Training: a random window, a random-resized crop shared by all frames of the clip, a horizontal flip and
colour augmentation (brightness max_delta 32/255, hue max_delta 0.2, saturation and contrast). Evaluation:
`windows` equally spaced windows x `crops` spatial crops per clip.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


def window_frame_indices(*, start: float, num_frames: int, frame_rate: float, stored_fps: float,
                         num_stored: int) -> list[int]:
    """Indices of the stored frames nearest to start + k / frame_rate; beyond the clip's end they loop."""
    times = start + np.arange(num_frames) / frame_rate
    return [int(i) % num_stored for i in np.round(times * stored_fps).astype(int)]


def window_audio(audio: np.ndarray, *, start: float, seconds: float, sample_rate: int) -> np.ndarray:
    """`seconds` of audio from `start`, looping a clip that is too short."""
    n, offset = int(round(seconds * sample_rate)), int(round(start * sample_rate))
    if audio.size == 0:
        return np.zeros(n, dtype=audio.dtype)
    idx = (offset + np.arange(n)) % audio.size
    return audio[idx]


AUDIO_ALIGN = ("window_centre", "clip_start")


def audio_span(start: float, *, window: float, seconds: float, duration: float, align: str = "window_centre") -> float:
    """Start time of a view's `seconds` of audio, for frames spanning [start, start + window).

    window_centre: the audio is centred on the frames' window (the same span when seconds == window, as in Zorro
    and MBT), moved inside the clip when the clip is long enough; in a clip shorter than `seconds` it stays centred
    and window_audio loops the clip around it, so the audio under the frames is still the frames' own.
    clip_start: the clip's first `seconds` for every view (CAV-MAE: 10 s of audio with a one-frame view).
    """
    if align == "clip_start":
        return 0.0
    if align != "window_centre":
        raise ValueError(f"audio_align must be one of {AUDIO_ALIGN}, got {align!r}")
    begin = start + window / 2 - seconds / 2
    if duration >= seconds:
        begin = min(max(begin, 0.0), duration - seconds)
    return round(begin, 6)


def window_starts(duration: float, window: float, count: int) -> list[float]:
    """`count` equally spaced window starts covering the clip (one at 0 if the clip is not longer than a window)."""
    span = max(duration - window, 0.0)
    if span <= 1e-6 or count <= 1:
        return [span / 2] if count == 1 and span > 1e-6 else [0.0]
    return [span * i / (count - 1) for i in range(count)]


def random_resized_box(height: int, width: int, *, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) covering a random fraction `scale` of the frame with aspect ratio in `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)  # fallback: the largest centred square
    return (height - side) // 2, (width - side) // 2, side, side


def eval_crop_boxes(height: int, width: int, crops: int) -> list[tuple[int, int, int, int]]:
    """`crops` square boxes along the longer side (1: centre; 3: start/centre/end), as in multi-crop evaluation."""
    side = min(height, width)
    positions = [0.5] if crops == 1 else [i / (crops - 1) for i in range(crops)]
    if width >= height:
        return [(0, int(round(p * (width - side))), side, side) for p in positions]
    return [(int(round(p * (height - side))), 0, side, side) for p in positions]


def colour_augment(frames: torch.Tensor, rng: random.Random, *, brightness: float = 32 / 255,
                   saturation: tuple[float, float] = (0.6, 1.4), contrast: tuple[float, float] = (0.6, 1.4),
                   hue: float = 0.2) -> torch.Tensor:
    """Same random colour change for every frame of a clip. uint8 T x 3 x H x W in and out.

    Brightness and hue deltas are the paper's max_delta values (TF-style additive brightness); the
    saturation/contrast ranges are lost in our copies (choice: 0.6-1.4).
    """
    x = frames.float() / 255
    ops = [lambda t: (t + rng.uniform(-brightness, brightness)).clamp(0, 1),
           lambda t: TF.adjust_saturation(t, rng.uniform(*saturation)),
           lambda t: TF.adjust_contrast(t, rng.uniform(*contrast)),
           lambda t: TF.adjust_hue(t, rng.uniform(-hue, hue))]
    rng.shuffle(ops)
    for op in ops:
        x = op(x)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def crop_resize(frames: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    top, left, h, w = box
    return TF.resized_crop(frames, top, left, h, w, [size, size], antialias=True)
