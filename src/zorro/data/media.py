"""Decoding of user media files (video with or without sound, audio-only files) into frames and a waveform.

Shared by `data_prep` (offline shard writing) and prediction on a user's files, so both see the same pixels
and samples. decord is the primary decoder (it bundles FFmpeg, so no system libraries are needed); PyAV is
the fallback for files decord cannot open (e.g. some VP9 webm without a duration); soundfile reads plain
audio files. Every failure becomes a `MediaError` with a short machine-readable reason.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma"}


class MediaError(Exception):
    """A file that cannot become a sample. `reason` is one of REASONS; `message` says what happened."""

    REASONS = ("missing_file", "empty_file", "not_media", "corrupt", "no_decodable_stream", "too_short",
               "missing_audio", "missing_video", "decoder_crashed", "timeout")

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


@dataclass
class DecodedClip:
    frames: np.ndarray | None  # T x H x W x 3 uint8 at `fps`, shorter side resized to `short_side`
    audio: np.ndarray | None  # float32 mono in [-1, 1] at `sample_rate`
    fps: float
    sample_rate: int
    duration: float  # seconds kept (after truncation to max_seconds)
    source_duration: float
    truncated: bool

    @property
    def has_video(self) -> bool:
        return self.frames is not None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None


def _short(prefix: str, error: Exception) -> str:
    """One deterministic line: decord prefixes its messages with a clock time and a source location."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(error)).splitlines()
    return f"{prefix}: {text[0] if text else type(error).__name__}"[:200]


def check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError("missing_file", f"{path} does not exist")
    if not os.path.isfile(path):
        raise MediaError("not_media", f"{path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise MediaError("empty_file", f"{path} is empty (0 bytes)")


def _looks_like_text(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.decode("utf-8", errors="ignore")  # media containers have control bytes in their first bytes
    return bool(text) and all(c.isprintable() or c in "\t\n\r" for c in text)


def resize_short_side(frame: np.ndarray, short_side: int | None) -> np.ndarray:
    if not short_side:
        return frame
    h, w = frame.shape[:2]
    scale = short_side / min(h, w)
    if abs(scale - 1) < 1e-6:
        return frame
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC))


def frame_times(duration: float, fps: float) -> np.ndarray:
    """Timestamps of the stored frames: every 1/fps seconds from 0, at least one frame."""
    return np.arange(max(1, math.floor(duration * fps + 1e-6))) / fps


def nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the decoded frame whose timestamp is nearest to each target time (times sorted)."""
    right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1) if len(times) > 1 else np.zeros(len(targets), int)
    if len(times) == 1:
        return right
    left = right - 1
    return np.where(np.abs(times[left] - targets) <= np.abs(times[right] - targets), left, right)


# -- decord ------------------------------------------------------------------------------------------------
def _decord_video(path: str, fps: float, short_side: int | None, max_seconds: float):
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n, native_fps = len(vr), vr.get_avg_fps()
    if n == 0 or not native_fps or native_fps <= 0:
        raise MediaError("no_decodable_stream", "video stream has no frames")
    source_duration = n / native_fps
    try:  # real presentation times, so variable-frame-rate files pick the right frames
        times = np.asarray(vr.get_frame_timestamp(np.arange(n)))[:, 0]
        source_duration = max(source_duration, float(times[-1]) + 1.0 / native_fps)
    except Exception:
        times = np.arange(n) / native_fps
    idx = nearest(times, frame_times(min(source_duration, max_seconds), fps))
    frames = vr.get_batch(list(idx)).asnumpy()
    return np.stack([resize_short_side(f, short_side) for f in frames]), source_duration


def _decord_audio(path: str, sample_rate: int):
    import decord

    ar = decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
    samples = ar[:].asnumpy()
    if samples.size == 0:
        raise MediaError("no_decodable_stream", "audio stream is empty")
    return samples.reshape(-1).astype(np.float32)


# -- PyAV (fallback) -----------------------------------------------------------------------------------------
def _pyav_decode(path: str, fps: float, short_side: int | None, sample_rate: int, max_seconds: float,
                 want_video: bool, want_audio: bool):
    import av

    frames, audio, source_duration = None, None, 0.0
    with av.open(path) as container:
        if want_video and container.streams.video:
            stream = container.streams.video[0]
            decoded = []  # (time, frame) in decode order
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if frame.time > max_seconds + 1.0 / fps:
                    break
                decoded.append((frame.time, frame.to_ndarray(format="rgb24")))
            if decoded:
                times = np.array([t for t, _ in decoded])
                source_duration = float(times[-1] + (times[1] - times[0] if len(times) > 1 else 1.0 / fps))
                duration = min(source_duration, max_seconds)
                order = np.argsort(times, kind="stable")  # decode order may differ from time order
                picks = order[nearest(times[order], frame_times(duration, fps))]
                frames = np.stack([resize_short_side(decoded[i][1], short_side) for i in picks])
    if want_audio:
        with av.open(path) as container:
            if container.streams.audio:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                chunks = []
                for frame in container.decode(container.streams.audio[0]):
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray().reshape(-1))
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
                if chunks:
                    audio = np.concatenate(chunks).astype(np.float32)
    return frames, audio, source_duration


def _soundfile_audio(path: str, sample_rate: int):
    import soundfile as sf

    data, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = data.mean(axis=1)
    if sr != sample_rate:
        import torch
        import torchaudio.functional as AF

        audio = AF.resample(torch.from_numpy(audio), sr, sample_rate).numpy()
    return audio.astype(np.float32)


def decode_media(path: str, *, fps: float = 6.25, short_side: int | None = 256, sample_rate: int = 48_000,
                 max_seconds: float = 10.0, min_seconds: float = 0.0, require_audio: bool = False,
                 require_video: bool = False) -> DecodedClip:
    """Decode `path` into frames at `fps` (shorter side resized) and mono audio at `sample_rate`.

    Audio-only files give frames=None; videos without a sound track give audio=None. Raises MediaError.
    """
    check_file(path)
    if _looks_like_text(path):  # never hand obvious garbage to FFmpeg (it can spin on some inputs)
        raise MediaError("not_media", "not a media file (text content)")
    audio_only = os.path.splitext(path)[1].lower() in AUDIO_EXTENSIONS
    frames = audio = None
    source_duration = 0.0
    errors = []
    if not audio_only:
        try:
            frames, source_duration = _decord_video(path, fps, short_side, max_seconds)
        except MediaError:
            raise
        except Exception as e:  # decord raises its own DECORDError / RuntimeError on unreadable input
            errors.append(_short("decord video", e))
    try:
        audio = _soundfile_audio(path, sample_rate) if audio_only and path.lower().endswith((".wav", ".flac", ".ogg")) \
            else _decord_audio(path, sample_rate)
    except Exception as e:
        errors.append(_short("audio", e))
    if frames is None and not audio_only or audio is None and errors:
        # decord could not read part of it: PyAV reads some containers decord cannot (VP9 webm w/o duration)
        try:
            pv_frames, pv_audio, pv_duration = _pyav_decode(path, fps, short_side, sample_rate, max_seconds,
                                                            want_video=frames is None and not audio_only,
                                                            want_audio=audio is None)
            if frames is None and pv_frames is not None:
                frames, source_duration = pv_frames, pv_duration
            if audio is None and pv_audio is not None:
                audio = pv_audio
        except Exception as e:
            errors.append(_short("pyav", e))

    if frames is None and audio is None:
        if _looks_like_text(path):
            raise MediaError("not_media", f"not a media file (text content); {'; '.join(errors)}")
        opened = not any("pyav" in e for e in errors)
        raise MediaError("no_decodable_stream" if opened else "corrupt",
                         "no decodable audio or video stream" + (f" ({'; '.join(errors)})" if errors else ""))
    if audio is not None:
        audio_seconds = len(audio) / sample_rate
        source_duration = max(source_duration, audio_seconds) if frames is None else source_duration or audio_seconds
        audio = audio[: int(round(min(source_duration, max_seconds) * sample_rate))]
        if audio.size == 0:
            audio = None
    duration = min(source_duration, max_seconds)
    if require_audio and audio is None:
        raise MediaError("missing_audio", "no audio track (audio is required)")
    if require_video and frames is None:
        raise MediaError("missing_video", "no video track (video is required)")
    if duration < max(min_seconds, 1e-3):
        raise MediaError("too_short", f"{duration:.2f} s < minimum {min_seconds:.2f} s")
    return DecodedClip(frames=frames, audio=None if audio is None else np.clip(audio, -1, 1), fps=fps,
                       sample_rate=sample_rate, duration=duration, source_duration=source_duration,
                       truncated=source_duration > max_seconds + 1e-6)
