"""Shard path vs raw decoding, and data_prep throughput. Not a test; prints what it measures.

    python benchmarks/loader.py [--clips 24] [--seconds 10] [--workers 0 1 2]

1. Makes `--clips` videos (640x360 like AudioSet's typical 360p, 25 fps, 48 kHz; mostly H.264/AAC) with
   data_prep.make_demo and runs data_prep on them (1 and 2 workers): clips/s and real-time factor (seconds of
   media per second of processing).
2. Clips/s of training samples (8 frames at 3.125 FPS, 224^2 random-resized crop, 2.56 s of 48 kHz audio)
   through the ShardDataModule, vs decoding the same window straight from the source videos with decord
   (VideoReader + AudioReader, same crop), per number of loader workers. Both sides do the same work (the
   shard path's flip and colour augmentation are off here); the ratio is the shard path's speed-up.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zorro.data.shards import ShardDataModule
from zorro.data.transforms import crop_resize, random_resized_box

NUM_FRAMES, FRAME_RATE, IMAGE, SR = 8, 3.125, 224, 48_000


class RawDecode(IterableDataset):
    """The same training sample, decoded from the source video every time (no shards)."""

    def __init__(self, paths, count):
        self.paths, self.count = paths, count

    def __iter__(self):
        import decord

        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(wid)
        for i in range(wid, self.count, n):
            path = self.paths[i % len(self.paths)]
            vr = decord.VideoReader(path, num_threads=1)
            fps, window = vr.get_avg_fps(), NUM_FRAMES / FRAME_RATE
            start = rng.uniform(0, max(len(vr) / fps - window, 0))
            idx = [min(int(round((start + k / FRAME_RATE) * fps)), len(vr) - 1) for k in range(NUM_FRAMES)]
            frames = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
            h, w = frames.shape[-2:]
            video = crop_resize(frames, random_resized_box(h, w, scale=(0.3, 1), ratio=(0.75, 1.333), rng=rng), IMAGE)
            ar = decord.AudioReader(path, sample_rate=SR, mono=True)
            a0 = int(start * SR)
            audio = torch.from_numpy(ar[a0 : a0 + int(window * SR)].asnumpy().reshape(-1))
            yield {"video": video, "audio": (audio.clamp(-1, 1) * 32767).to(torch.int16)}


def rate(loader, limit: int) -> float:
    it = iter(loader)
    next(it)  # workers started, first batch out: exclude start-up
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += batch["video"].shape[0]
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=48, help="training samples timed per measurement")
    p.add_argument("--dir", type=Path, default=None, help="keep the generated data here")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    args = p.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="zorro-loader-bench-"))
    videos, labels = root / "videos", root / "videos" / "labels.csv"

    from data_prep.make_demo import make_demo

    if not labels.exists():
        make_demo(videos, num_clips=args.clips, seconds=args.seconds, width=args.width, height=args.height, num_no_audio=0,
                  num_audio_only=0, broken=False)
    media_seconds = args.seconds * args.clips
    print(f"{args.clips} clips of ~{args.seconds:.0f} s, {args.width}x{args.height} H.264/AAC etc.; "
          f"torch threads {torch.get_num_threads()}")
    print("\ndata_prep (6.25 FPS JPEG at short side 256, 48 kHz FLAC):")
    shards = None
    for workers in (1, 2):
        out = root / f"shards_w{workers}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep", "--videos", str(videos), "--labels", str(labels),
                        "--out", str(out), "--workers", str(workers), "--quiet", "--max-samples-per-shard", "8"],
                       check=True, capture_output=True)
        dt = time.perf_counter() - t0
        print(f"  workers {workers}: {args.clips / dt:6.2f} clips/s, real-time factor {media_seconds / dt:6.1f}x")
        shards = out
    paths = sorted(str(p) for p in videos.iterdir() if p.suffix in (".mp4", ".webm", ".mkv"))

    print(f"\ntraining samples ({NUM_FRAMES} x {IMAGE}^2 frames + {NUM_FRAMES / FRAME_RATE:.2f} s audio), clips/s:")
    print(f"  {'workers':>8} {'shards':>9} {'raw decord':>11} {'speed-up':>9}")
    for workers in args.workers:
        dm = ShardDataModule(root=str(shards), batch_size=4, num_workers=workers, num_frames=NUM_FRAMES,
                             frame_rate=FRAME_RATE, image_size=IMAGE, sample_rate=SR, epoch_length=10_000,
                             flip=False, color_prob=0.0)
        shard_rate = rate(dm.train_dataloader(), args.samples)
        raw = DataLoader(RawDecode(paths, 10_000), batch_size=4, num_workers=workers)
        raw_rate = rate(raw, args.samples)
        print(f"  {workers:>8} {shard_rate:9.2f} {raw_rate:11.2f} {shard_rate / raw_rate:8.2f}x")


if __name__ == "__main__":
    main()
