import random

import numpy as np
import pytest
import torch

from zorro.data.transforms import (colour_augment, eval_crop_boxes, random_resized_box, window_audio,
                                   window_frame_indices, window_starts)


def test_window_frames_take_every_other_stored_frame_and_loop():
    # paper: 8 frames at 3.125 FPS from frames stored at 6.25 FPS -> every 2nd stored frame
    assert window_frame_indices(start=0.0, num_frames=8, frame_rate=3.125, stored_fps=6.25, num_stored=64) == \
        list(range(0, 16, 2))
    # a 1 s clip (6 stored frames) is looped to fill the 2.56 s window
    assert window_frame_indices(start=0.0, num_frames=8, frame_rate=3.125, stored_fps=6.25, num_stored=6) == \
        [0, 2, 4, 0, 2, 4, 0, 2]


def test_window_audio_loops_short_clips():
    audio = np.arange(10, dtype=np.int16)
    out = window_audio(audio, start=0.5, seconds=2.0, sample_rate=10)
    assert out.tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4] * 2
    assert window_audio(audio, start=0.2, seconds=0.5, sample_rate=10).tolist() == [2, 3, 4, 5, 6]  # inside: a slice


def test_window_starts_are_equally_spaced():
    assert window_starts(10.0, 2.56, 4) == pytest.approx([0.0, (10 - 2.56) / 3, 2 * (10 - 2.56) / 3, 10 - 2.56])
    assert window_starts(2.0, 2.56, 4) == [0.0]  # shorter than a window: one (looped) window
    assert window_starts(10.0, 2.56, 1) == [(10 - 2.56) / 2]


def test_crop_boxes():
    rng = random.Random(0)
    for _ in range(50):
        top, left, h, w = random_resized_box(80, 120, scale=(0.3, 1.0), ratio=(0.75, 1.333), rng=rng)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 120
        assert 0.3 * 80 * 120 * 0.9 <= h * w <= 80 * 120
    assert eval_crop_boxes(80, 120, 3) == [(0, 0, 80, 80), (0, 20, 80, 80), (0, 40, 80, 80)]
    assert eval_crop_boxes(120, 80, 1) == [(20, 0, 80, 80)]


def test_colour_augment_is_shared_by_the_frames_of_a_clip():
    frame = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    clip = frame.repeat(4, 1, 1, 1)
    out = colour_augment(clip, random.Random(1))
    assert out.dtype == torch.uint8 and out.shape == clip.shape
    assert all(torch.equal(out[0], out[t]) for t in range(4)) and not torch.equal(out, clip)
