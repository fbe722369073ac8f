"""Inputs shared by the model and task tests (plain functions; the fixtures are in conftest.py)."""

import torch


def inputs(batch: int = 2, seed: int = 0, *, seconds: float = 1.28, frames: int = 4, size: int = 64,
           sample_rate: int = 16_000):
    """A random int16 waveform (B x S) and uint8 clip (B x T x 3 x H x W): the tiny models' configured input."""
    g = torch.Generator().manual_seed(seed)
    audio = (torch.randn(batch, round(seconds * sample_rate), generator=g) * 3000).to(torch.int16)
    video = torch.randint(0, 256, (batch, frames, 3, size, size), generator=g, dtype=torch.uint8)
    return audio, video
