"""Per-clip sampling and augmentation: the parameters are drawn in data-loader workers; the pixels are changed
there too (frames decoded in the worker) or in a batch on the accelerator (zorro.data.device).

Windows (Zorro appendix B): `num_frames` frames at `frame_rate` (AudioSet: 8 at 3.125 FPS = 2.56 s) and audio of
a configured length centred on them (by default the same span; `audio_span`); clips shorter than the window are
looped (the paper loops ESC-50's 5 s clips to the pre-training length).
Training: a random window, a random-resized crop shared by all frames of the clip, a horizontal flip and
colour augmentation (brightness max_delta 32/255, hue max_delta 0.2, saturation and contrast). Evaluation:
`windows` equally spaced windows x `crops` spatial crops per clip.
"""

from __future__ import annotations

import dataclasses
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
    if 0 <= offset and offset + n <= audio.size:
        return audio[offset : offset + n]  # the usual case; indexing 123k samples costs a worker ~2 ms per clip
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


COLOUR_OPS = ("brightness", "saturation", "contrast", "hue")


def colour_params(rng: random.Random, *, brightness: float = 32 / 255, saturation: tuple[float, float] = (0.6, 1.4),
                  contrast: tuple[float, float] = (0.6, 1.4),
                  hue: float = 0.2) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The random part of a colour change: the order of the four COLOUR_OPS and each op's factor (drawn in that
    order). Drawn in the worker on either path, so a seed gives the same change wherever the frames decode.

    Brightness and hue deltas are the paper's max_delta values (TF-style additive brightness); the
    saturation/contrast ranges are lost in our copies (choice: 0.6-1.4).
    """
    ranges = [(-brightness, brightness), saturation, contrast, (-hue, hue)]
    order = list(range(len(COLOUR_OPS)))
    rng.shuffle(order)
    factors = [0.0] * len(order)
    for op in order:
        factors[op] = rng.uniform(*ranges[op])
    return tuple(order), tuple(factors)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (x * ratio + other * (1 - ratio)).clamp_(0, 1)


def _colour_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_* of one op with a factor per clip: x float n x T x 3 x H x W in [0, 1], f n."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    f = f.view(-1, 1, 1, 1, 1)
    if op == 0:  # brightness: additive, as TF's adjust_brightness
        return (x + f).clamp_(0, 1)
    if op == 1:  # saturation: blend with the grey image
        return _blend(x, TF.rgb_to_grayscale(x), f)
    if op == 2:  # contrast: blend with each frame's mean grey
        return _blend(x, TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)
    h, s, v = _rgb_to_hsv(x).unbind(dim=-3)  # hue: rotate H in HSV
    return _hsv_to_rgb(torch.stack(((h + f[..., 0]).remainder_(1.0), s, v), dim=-3))


def apply_colour(videos: torch.Tensor, orders: list[tuple[int, ...] | None], factors: torch.Tensor) -> torch.Tensor:
    """Each clip's own colour change, batched: uint8 B x T x 3 x H x W in and out (on any device); `orders[b]`
    from colour_params (None: clip b is unchanged) and `factors` B x 4 (rows of unchanged clips are ignored).

    Clips that apply the same op at the same position run together, so a batch costs at most 16 op calls."""
    active = [b for b, o in enumerate(orders) if o is not None]
    if not active:
        return videos
    whole = len(active) == len(orders)
    index = None if whole else torch.tensor(active).to(videos.device, non_blocking=True)
    x = (videos if whole else videos.index_select(0, index)).float() / 255
    f = factors.to(device=videos.device, dtype=torch.float32)
    f = f if whole else f.index_select(0, index)
    for position in range(len(COLOUR_OPS)):
        for op in range(len(COLOUR_OPS)):
            sel = [i for i, b in enumerate(active) if orders[b][position] == op]
            if len(sel) == len(active):
                x = _colour_op(op, x, f[:, op])
            elif sel:
                idx = torch.tensor(sel).to(videos.device, non_blocking=True)
                x.index_copy_(0, idx, _colour_op(op, x.index_select(0, idx), f.index_select(0, idx)[:, op]))
    out = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return out if whole else videos.index_copy(0, index, out)


def colour_augment(frames: torch.Tensor, rng: random.Random, **ranges) -> torch.Tensor:
    """Same random colour change for every frame of a clip. uint8 T x 3 x H x W in and out."""
    order, factors = colour_params(rng, **ranges)
    return apply_colour(frames[None], [order], torch.tensor([factors]))[0]


@dataclasses.dataclass(frozen=True)
class View:
    """One view's spatial and colour augmentation, drawn in the worker: crop box (top, left, h, w) of the stored
    frames, horizontal flip, colour change (colour_params) or None."""

    box: tuple[int, int, int, int]
    flip: bool = False
    colour: tuple[tuple[int, ...], tuple[float, ...]] | None = None


def crop_flip(frames: torch.Tensor, view: View, size: int) -> torch.Tensor:
    video = crop_resize(frames, view.box, size)
    return video.flip(-1) if view.flip else video


def augment(frames: torch.Tensor, view: View, size: int) -> torch.Tensor:
    """A decoded clip (uint8 T x 3 x h x w) -> the view (uint8 T x 3 x size x size); the device path does the
    same in a batch (zorro.data.device)."""
    video = crop_flip(frames, view, size)
    if view.colour is None:
        return video
    return apply_colour(video[None], [view.colour[0]], torch.tensor([view.colour[1]]))[0]


def crop_resize(frames: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    top, left, h, w = box
    return TF.resized_crop(frames, top, left, h, w, [size, size], antialias=True)
