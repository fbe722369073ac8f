"""Device-side input front ends: compact batch tensors (int16 waveform, uint8 frames) -> model inputs.

They run on the accelerator inside the model (DESIGN.md, "The batch contract"), so data-loader workers
only decode and crop, and the checkpoint carries its own preprocessing constants.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

# Normalisation of the log-mel: AST's AudioSet statistics for 128-bin log-mel, (x - mean) / (2 std).
# Choice: the Zorro paper does not state its normalisation.
AUDIO_MEAN, AUDIO_STD = -4.27, 4.57
# CAV-MAE: AudioSet kaldi-fbank statistics of the official code (dataset_mean/std of its run scripts), (x - mean) / std.
KALDI_MEAN, KALDI_STD = -5.081, 4.4849
# Choice: the paper does not state the video normalisation; ImageNet statistics (as for ViT init).
VIDEO_MEAN, VIDEO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


log = logging.getLogger(__name__)

WINDOWS = {"hann": torch.hann_window, "hamming": torch.hamming_window}  # Zorro: Hann; MBT: Hamming


class AudioFrontend(nn.Module):
    """Waveform (B x S, int16 or float) -> normalised log-mel (B x 1 x n_mels x frames).

    Paper (appendix B): 48 kHz, 128 mel bins, Hann window. Window/hop lengths are lost in our copies;
    the model configs give 25 ms / 10 ms as in MBT and AST (choice), so 2.56 s -> 256 frames -> 16 x 8 patches.
    In training mode it also applies SpecAugment and frequency jitter (appendix B), which act on the
    model input like dropout does on activations.
    """

    def __init__(self, *, sample_rate: int = 48_000, n_mels: int = 128, win_ms: float = 25.0, hop_ms: float = 10.0,
                 mean: float = AUDIO_MEAN, std: float = AUDIO_STD, spec_augment: bool = True,
                 freq_mask: int | None = None, time_mask: int | None = None, num_masks: int = 2,
                 freq_jitter: int = 4, clip_seconds: float = 2.56, window: str = "hann"):
        super().__init__()
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {sorted(WINDOWS)}, got {window!r}")
        win = round(sample_rate * win_ms / 1000)
        self.hop = round(sample_rate * hop_ms / 1000)
        n_fft = 1 << (win - 1).bit_length()
        # Spectrogram + MelScale = torchaudio's MelSpectrogram, but the power is taken from the real and
        # imaginary parts: under torch_xla, |complex| stays complex and breaks the patch embedding.
        self.spectrogram = torchaudio.transforms.Spectrogram(n_fft=n_fft, win_length=win, hop_length=self.hop,
                                                             window_fn=WINDOWS[window], power=None)
        self.mel_scale = torchaudio.transforms.MelScale(n_mels=n_mels, sample_rate=sample_rate, n_stft=n_fft // 2 + 1)
        self.sample_rate, self.n_mels, self.mean, self.std = sample_rate, n_mels, mean, std
        # SpecAugment mask sizes: the model configs set them (conf/model/*.yaml, with their sources); None keeps
        # the rule they follow for Zorro: AST's 48 of 128 mel bins and 192 of 1024 frames, halved for two masks of
        # each kind, scaled to the input.
        freq_mask = round(24 * n_mels / 128) if freq_mask is None else freq_mask
        time_mask = round(96 * clip_seconds / 10.24) if time_mask is None else time_mask
        self.spec_augment = spec_augment
        self.num_masks, self.freq_mask, self.time_mask = num_masks, freq_mask, time_mask
        self.freq_jitter = freq_jitter  # max |shift| in mel bins; the paper's range is lost (choice)
        # The configured input length: other lengths run (the backbone resamples its position table) but are
        # logged once, so a data / model mismatch (data.audio_seconds vs model.audio_seconds) is never silent.
        self.clip_samples, self._length_warned = round(clip_seconds * sample_rate), False

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.shape[-1] != self.clip_samples and not self._length_warned:
            self._length_warned = True
            log.warning("audio input of %d samples (%.2f s) but the model is configured for %.2f s: its audio position "
                        "table is interpolated; set data.audio_seconds to model.audio_seconds", wav.shape[-1],
                        wav.shape[-1] / self.sample_rate, self.clip_samples / self.sample_rate)
        if wav.dtype == torch.int16:
            wav = wav.float() / 32768.0
        with torch.autocast(wav.device.type, enabled=False):  # the FFT wants fp32
            power = torch.view_as_real(self.spectrogram(wav.float())).square().sum(-1)
            mel = self.mel_scale(power)[..., : self.num_frames(wav.shape[-1])]
            x = ((mel + 1e-6).log() - self.mean) / (2 * self.std)
        x = x.unsqueeze(1)
        if self.training and self.spec_augment:
            x = self.augment(x)
        return x

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_masks):
            x = mask_along(mask_along(x, self.freq_mask, dim=2), self.time_mask, dim=3)
        if self.freq_jitter:
            # Shift each example by its own integer number of mel bins; vacated bins get the batch mean (0).
            B, _, F, _ = x.shape
            shift = torch.randint(-self.freq_jitter, self.freq_jitter + 1, (B, 1, 1, 1), device=x.device)
            src = torch.arange(F, device=x.device).view(1, 1, F, 1) - shift
            valid = (src >= 0) & (src < F)
            x = torch.gather(x, 2, src.clamp(0, F - 1).expand_as(x)) * valid
        return x


class KaldiFbank(nn.Module):
    """Waveform (B x S, int16 or float) -> normalised kaldi log-mel fbank, B x 1 x n_mels x frames.

    AST / CAV-MAE preprocessing: `torchaudio.compliance.kaldi.fbank(w - w.mean(), htk_compat=True,
    use_energy=False, window_type="hanning", dither=0, frame_shift=10)` (25 ms frames, DC removed per frame,
    pre-emphasis 0.97, FFT size 512 at 16 kHz, power spectrum, kaldi mel banks), zero-padded or cut to `frames`
    (1024 for 10 s), then (x - mean) / std. Computed here for the whole batch at once, with the same numbers
    (tests/models/test_cav_mae.py): torchaudio's takes one waveform per call, 72 ms for 48 clips of 10 s on an
    H100 against 1 ms here, and a CAV-MAE-B pre-training step (batch 48, bf16) took 174 ms with it, 91 ms without.

    In training mode it also applies the official data loader's augmentation: SpecAugment (`spec_augment`: one
    frequency band of < freq_mask bins and one time band of < time_mask frames) on the raw log-mel, before the
    normalisation, so a masked band reads (0 - mean) / std; then (`noise`) uniform noise of amplitude U(0, 0.1)
    and a random circular time shift of the normalised fbank. `forward(wav, spec_augment=False)` leaves the
    SpecAugment out (CAV-MAE's pre-training).
    """

    def __init__(self, *, sample_rate: int = 16_000, n_mels: int = 128, frames: int = 1024,
                 mean: float = KALDI_MEAN, std: float = KALDI_STD, spec_augment: bool = False, freq_mask: int = 48,
                 time_mask: int = 192, noise: bool = False):
        super().__init__()
        self.sample_rate, self.n_mels, self.frames, self.mean, self.std = sample_rate, n_mels, frames, mean, std
        self.spec_augment, self.freq_mask, self.time_mask, self.noise = spec_augment, freq_mask, time_mask, noise
        self.win, self.hop = int(sample_rate * 0.025), int(sample_rate * 0.010)
        self.n_fft = 1 << (self.win - 1).bit_length()
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(n_mels, self.n_fft, float(sample_rate), 20.0, 0.0,
                                                              100.0, -500.0, 1.0)
        self.register_buffer("mel_banks", F.pad(banks, (0, 1)), persistent=False)  # n_mels x (n_fft/2 + 1)
        self.register_buffer("window", torch.hann_window(self.win, periodic=False), persistent=False)

    def forward(self, wav: torch.Tensor, *, spec_augment: bool = True) -> torch.Tensor:
        x = self.fbank(wav)
        if self.training:
            if spec_augment and self.spec_augment:
                zero = (0.0 - self.mean) / self.std  # the raw log-mel's 0, as the official loader masks first
                x = mask_along(mask_along(x, self.freq_mask, dim=2, value=zero), self.time_mask, dim=3, value=zero)
            if self.noise:
                x = noise_and_roll(x)
        return x

    def fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """The normalised fbank, B x 1 x n_mels x frames, without augmentation."""
        wav = wav.float() / 32768.0 if wav.dtype == torch.int16 else wav.float()
        with torch.autocast(wav.device.type, enabled=False):
            wav = wav - wav.mean(-1, keepdim=True)
            x = F.pad(wav, (0, max(self.win - wav.shape[-1], 0))).unfold(-1, self.win, self.hop)  # B x T x win
            x = x - x.mean(-1, keepdim=True)
            x = x - 0.97 * torch.cat([x[..., :1], x[..., :-1]], dim=-1)  # pre-emphasis (first sample repeated)
            power = torch.fft.rfft(F.pad(x * self.window, (0, self.n_fft - self.win))).abs().square()
            fbank = (power @ self.mel_banks.T).clamp_min(torch.finfo(torch.float).eps).log()  # B x T x n_mels
            fbank = F.pad(fbank, (0, 0, 0, max(self.frames - fbank.shape[1], 0)))[:, : self.frames]
            fbank = (fbank - self.mean) / self.std
        return fbank.transpose(1, 2).unsqueeze(1)  # B x 1 x F x T: patches in (frequency, time) order


def mask_along(x: torch.Tensor, max_width: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """SpecAugment's mask: per example a band of width U[0, max_width) at a uniform start is set to `value` (0:
    the normalised mean; CAV-MAE masks before normalising, see KaldiFbank). torchaudio's
    FrequencyMasking/TimeMasking(iid_masks=True) compute the same but build the band with a float arange that
    torch_xla rejects, so the TPU path needs this integer version."""
    if max_width <= 0:
        return x
    B, size = x.shape[0], x.shape[dim]
    width = (torch.rand(B, device=x.device) * min(max_width, size)).long()
    start = (torch.rand(B, device=x.device) * (size - width)).long()
    pos = torch.arange(size, device=x.device)
    band = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # B x size
    shape = [B] + [1] * (x.ndim - 1)
    shape[dim] = size
    return x.masked_fill(band.view(shape), value)


def noise_and_roll(spec: torch.Tensor) -> torch.Tensor:
    """CAV-MAE's audio augmentation: per example uniform noise of amplitude U(0, 0.1), then a circular time shift
    by U{-T, T-1} frames (B x 1 x F x T)."""
    B, _, _, T = spec.shape
    spec = spec + torch.rand_like(spec) * torch.rand(B, 1, 1, 1, device=spec.device) / 10
    shift = torch.randint(-T, T, (B, 1), device=spec.device)
    idx = (torch.arange(T, device=spec.device) - shift) % T  # torch.roll with a per-sample shift
    return spec.gather(3, idx.view(B, 1, 1, T).expand_as(spec))


def zero_absent(x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Zero the inputs of samples whose modality is absent (B bool flags): the paper's missing-modality input."""
    return x if present is None else x * present.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)


class VideoFrontend(nn.Module):
    """uint8 (or float in [0, 255]) frames B x T x 3 x H x W -> normalised float frames."""

    def __init__(self, *, mean=VIDEO_MEAN, std=VIDEO_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, 3, 1, 1) * 255, persistent=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be B x T x 3 x H x W, got {tuple(video.shape)}")
        return (video.float() - self.mean) / self.std
