"""Tiny hand-written shards (docs/data_format.md), independent of `data_prep`: a few 1-3 s clips, 6.25 fps
JPEG frames (64 px shorter side), 16-bit FLAC/wav, some without audio or video."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

FPS, SR, CLASSES = 6.25, 16000, ["cat", "dog", "bird"]


def clip_members(key: str, *, seconds: float, label_ids: list[int], has_audio=True, has_video=True,
                 audio_format="flac", width=96, height=64, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    num_frames = int(round(seconds * FPS)) if has_video else 0
    num_samples = int(round(seconds * SR)) if has_audio else 0
    sample = {"__key__": key}
    for i in range(num_frames):
        buf = io.BytesIO()  # frame i is filled with value 10 * i, so tests can tell which frames were taken
        Image.fromarray(np.full((height, width, 3), (10 * i) % 256, np.uint8)).save(buf, format="JPEG", quality=95)
        sample[f"f{i:03d}.jpg"] = buf.getvalue()
    if has_audio:
        buf = io.BytesIO()
        wav = (rng.uniform(-0.5, 0.5, num_samples) * 32767).astype(np.int16)
        sf.write(buf, wav, SR, format=audio_format.upper(), subtype="PCM_16")
        sample[audio_format] = buf.getvalue()
    sample["json"] = json.dumps({
        "key": key, "source": f"{key}.mp4", "row": 0, "labels": [CLASSES[i] for i in label_ids],
        "label_ids": label_ids, "split": None, "fold": None, "duration": seconds, "source_duration": seconds,
        "truncated": False, "has_audio": has_audio, "has_video": has_video, "fps": FPS if has_video else None,
        "num_frames": num_frames, "width": width if has_video else None, "height": height if has_video else None,
        "sample_rate": SR if has_audio else None, "num_samples": num_samples}).encode()
    return sample


def write_shards(root, splits: dict[str, list[list[dict]]], *, multi_label=False, counted=True) -> None:
    """splits: name -> shards -> samples. Writes the tars and manifest.json (with the clips with audio / video
    counted per shard, split and in all, as data_prep writes it; counted=False: as it wrote it before)."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": 1, "classes": CLASSES, "multi_label": multi_label, "fps": FPS, "sample_rate": SR,
                "short_side": 64, "audio_format": "flac", "max_seconds": 10.0, "splits": {}}
    for split, shards in splits.items():
        entries = []
        for i, samples in enumerate(shards):
            name = f"{split}-{i:06d}.tar"
            with wds.TarWriter(str(root / name)) as sink:
                for s in samples:
                    sink.write(s)
            entries.append({"name": name, "num_samples": len(samples)})
            if counted:
                for m in ("audio", "video"):
                    entries[-1][f"num_{m}"] = sum(_has(s, m) for s in samples)
        keys = ("num_samples", "num_audio", "num_video") if counted else ("num_samples",)
        manifest["splits"][split] = {**{k: sum(e[k] for e in entries) for k in keys}, "shards": entries}
    if counted:
        manifest["modalities"] = {m: sum(s[f"num_{m}"] for s in manifest["splits"].values()) for m in ("audio", "video")}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _has(sample: dict, modality: str) -> bool:
    try:
        return bool(json.loads(sample["json"]).get(f"has_{modality}"))
    except (KeyError, ValueError, AttributeError):  # the corrupt samples of test_bad_samples
        return False


def make_clips(prefix: str, n: int, *, multi_label=False) -> list[dict]:
    clips = []
    for i in range(n):
        labels = [i % 3, (i + 1) % 3] if multi_label and i % 2 else [i % 3]
        clips.append(clip_members(f"{prefix}{i:02d}", seconds=(1.0, 2.0, 3.0)[i % 3], label_ids=labels,
                                  has_audio=i % 4 != 1, has_video=i % 4 != 2,
                                  audio_format="wav" if i % 5 == 3 else "flac", seed=i))
    return clips


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """train: 3 shards x 4 clips; val: 1 shard x 3 clips; test: 2 shards (3 + 2 clips). Single-label."""
    root = tmp_path_factory.mktemp("tiny_shards")
    train = make_clips("tr", 12)
    test = make_clips("te", 5)
    write_shards(root, {"train": [train[0:4], train[4:8], train[8:12]], "val": [make_clips("va", 3)],
                        "test": [test[:3], test[3:]]})
    return root


@pytest.fixture(scope="session")
def tiny_multilabel_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_multilabel")
    write_shards(root, {"train": [make_clips("ml", 4, multi_label=True)]}, multi_label=True)
    return root
