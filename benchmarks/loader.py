"""Shard loader costs: data_prep throughput, shards vs raw decoding, and one loader worker's CPU per clip.

    python benchmarks/loader.py [--clips 24] [--seconds 10] [--workers 0 1 2] [--sections prep throughput worker]

1. prep: makes `--clips` videos (640x360 like AudioSet's typical 360p, 25 fps, 48 kHz; mostly H.264/AAC) with
   data_prep.make_demo and runs data_prep on them (1 and 2 workers): clips/s and real-time factor (seconds of
   media per second of processing).
2. throughput: clips/s of training samples (8 frames at 3.125 FPS, 224^2 random-resized crop, 2.56 s of 48 kHz
   audio) through the ShardDataModule, vs decoding the same window straight from the source videos with decord
   (VideoReader + AudioReader, same crop), per number of loader workers. Both sides do the same work (the
   shard path's flip and colour augmentation are off here); the ratio is the shard path's speed-up.
3. worker: the CPU time one loader worker spends per training clip at the base settings (augmentation on:
   random-resized crop 0.3-1, flip, colour with p=0.8), by stage, with the frames decoded in the worker and with
   data.decode_on_device (the worker reads bytes; the device decodes and augments). The stage table is timed
   in this process on one thread (a worker's setting); the totals are the CPU time of a real DataLoader worker
   process (/proc), which also pays for iteration and the hand-over to the main process. Then the device side
   (decode + augment a batch of 64) on this CPU, for the record. The last line reads
   `worker CPU per training clip: X ms (frames decoded on the device), Y ms (frames decoded in the worker)`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from zorro.data.clips import jpeg_size
from zorro.data.device import collate, decode_on_device
from zorro.data.reading import tar_samples
from zorro.data.shards import ShardDataModule
from zorro.data.transforms import apply_colour, crop_flip, crop_resize, random_resized_box, window_frame_indices

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


PREP = ["--short-side", "256", "--sample-rate", "48000", "--max-samples-per-shard", "8", "--quiet"]


def base_module(shards: Path, **kw) -> ShardDataModule:
    """The base training settings (conf/data/shards.yaml defaults: crop 0.3-1, flip, colour p=0.8)."""
    return ShardDataModule(root=str(shards), num_frames=NUM_FRAMES, frame_rate=FRAME_RATE, image_size=IMAGE,
                           sample_rate=SR, epoch_length=100_000, **kw)


def stage_costs(shards: Path, clips: int, batch: int) -> tuple[dict, dict]:
    """ms of this thread's CPU per training clip, by stage, for (frames decoded in the worker, on the device).
    Runs the same functions as ClipSampler, one stage at a time, on one thread like a loader worker."""
    module = base_module(shards)
    sampler = module.samplers["train"]
    urls = [str(shards / s["name"]) for s in module._shards("train")]
    cpu, dev = defaultdict(float), defaultdict(float)
    clock = time.thread_time
    rng, n, views, encoded = random.Random(0), 0, [], []
    enc_sampler = copy.copy(sampler)
    enc_sampler.encoded = True
    while n < clips:
        stream = tar_samples(urls)
        while n < clips:
            t0 = clock()
            raw = next(stream, None)
            if raw is None:
                break
            meta = json.loads(raw["json"])
            t1 = clock()
            names = sorted(k for k in raw if k.startswith("f") and k.endswith(".jpg"))
            start = rng.uniform(0, max(float(meta["duration"]) - sampler.window, 0.0))
            audio = sampler.audio(raw, meta, span=(start, sampler.window))
            t2 = clock()
            idx = window_frame_indices(start=start, num_frames=NUM_FRAMES, frame_rate=FRAME_RATE,
                                       stored_fps=float(meta["fps"]), num_stored=len(names))
            jpegs = [raw[names[i]] for i in idx]
            width, height = jpeg_size(jpegs[0])
            view = sampler._views(height, width, random.Random(n))
            t3 = clock()
            clip = torch.stack([decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8), mode=ImageReadMode.RGB)
                                for j in jpegs])
            t4 = clock()
            video = crop_flip(clip, view[0], IMAGE)
            t5 = clock()
            if view[0].colour is not None:
                video = apply_colour(video[None], [view[0].colour[0]], torch.tensor([view[0].colour[1]]))[0]
            t6 = clock()
            for stages in (cpu, dev):
                stages["tar read + JSON"] += t1 - t0
                stages["audio window decode"] += t2 - t1
            dev["JPEG header + view parameters"] += t3 - t2
            cpu["JPEG decode (8 frames)"] += t4 - t3
            cpu["crop/resize + flip"] += t5 - t4
            cpu["colour (p=0.8)"] += t6 - t5
            views.append({"video": video, "audio": torch.from_numpy(audio), "label": sampler.label(meta)})
            encoded.extend(enc_sampler(raw, random.Random(n)))  # for the collate and the device side
            n += 1
    for stages, samples, fn in ((cpu, views, default_collate), (dev, encoded, collate)):
        t0 = clock()
        for i in range(0, len(samples), batch):
            fn(samples[i : i + batch])
        stages[f"collate (batch {batch})"] += clock() - t0
    costs = tuple({k: 1e3 * v / n for k, v in stages.items()} for stages in (cpu, dev))
    return costs, encoded, (width, height)


def _cpu_seconds(pid: int) -> float:
    """CPU time of all threads of a process (ns precision from schedstat)."""
    return sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
               for t in os.listdir(f"/proc/{pid}/task")) / 1e9


def _idle(pid: int) -> float:
    """Wait until the worker has filled its prefetch queue and blocks; its CPU time then."""
    last = _cpu_seconds(pid)
    while True:
        time.sleep(0.3)
        now = _cpu_seconds(pid)
        if now - last < 1e-3:
            return now
        last = now


def worker_cpu(shards: Path, on_device: bool, batches: int, batch: int) -> float:
    """ms of CPU per training clip in one real DataLoader worker process (steady state, start-up excluded)."""
    loader = base_module(shards, batch_size=batch, num_workers=1, decode_on_device=on_device).train_dataloader()
    it = iter(loader)
    next(it)
    pid = it._workers[0].pid
    c0 = _idle(pid)
    for _ in range(batches):
        b = next(it)
        assert ("frames" in b) == on_device and ("video" in b) != on_device
    c1 = _idle(pid)  # produced = consumed + the same prefetch at both reads
    del it
    return 1e3 * (c1 - c0) / (batches * batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=48, help="training samples timed per measurement")
    p.add_argument("--dir", type=Path, default=None, help="keep the generated data here (reused when present)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--sections", nargs="+", default=["prep", "throughput", "worker"],
                   choices=["prep", "throughput", "worker"])
    p.add_argument("--worker-clips", type=int, default=96, help="training clips per worker-cost measurement")
    p.add_argument("--batch", type=int, default=32, help="loader batch size in the worker section")
    p.add_argument("--shards", type=Path, default=None, help="worker section: these shards instead of DIR/shards")
    args = p.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="zorro-loader-bench-"))
    videos, labels = root / "videos", root / "videos" / "labels.csv"

    from data_prep.make_demo import make_demo

    if not labels.exists():
        make_demo(videos, num_clips=args.clips, seconds=args.seconds, width=args.width, height=args.height, num_no_audio=0,
                  num_audio_only=0, broken=False)
    clips = sum(1 for f in videos.iterdir() if f.name != labels.name)
    print(f"{clips} clips of ~{args.seconds:.0f} s, {args.width}x{args.height} H.264/AAC etc. (data_prep.make_demo); "
          f"torch threads {torch.get_num_threads()}")
    shards = root / "shards"
    if "prep" in args.sections:
        print("\ndata_prep (6.25 FPS JPEG at short side 256, 48 kHz FLAC):")
        for workers in (1, 2):
            out = root / f"shards_w{workers}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "data_prep", "--videos", str(videos), "--labels", str(labels),
                            "--out", str(out), "--workers", str(workers), *PREP], check=True, capture_output=True)
            dt = time.perf_counter() - t0
            print(f"  workers {workers}: {clips / dt:6.2f} clips/s, real-time factor {clips * args.seconds / dt:6.1f}x")
            shards = out
    elif not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data_prep", "--videos", str(videos), "--labels", str(labels),
                        "--out", str(shards), "--workers", "2", *PREP], check=True, capture_output=True)

    if "throughput" in args.sections:
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

    if "worker" not in args.sections:
        return
    shards = args.shards or shards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    (cpu, dev), encoded, (width, height) = stage_costs(shards, args.worker_clips, args.batch)
    audio = json.loads((shards / "manifest.json").read_text())["audio_format"].upper()
    print(f"\none loader worker, CPU ms per training clip ({NUM_FRAMES} frames of {width}x{height} "
          f"JPEG -> {IMAGE}^2, random-resized crop 0.3-1 + flip + colour p=0.8, {NUM_FRAMES / FRAME_RATE:.2f} s of "
          f"{SR // 1000} kHz {audio}; {args.worker_clips} clips):")
    print(f"  {'stage':<34} {'frames decoded in the worker':>29} {'on the device':>14}")
    for name in dict.fromkeys([*cpu, *dev]):
        a, b = (f"{s[name]:.2f}" if name in s else "-" for s in (cpu, dev))
        print(f"  {name:<34} {a:>29} {b:>14}")
    print(f"  {'sum of the stages':<34} {sum(cpu.values()):>29.2f} {sum(dev.values()):>14.2f}")
    y = worker_cpu(shards, False, max(args.worker_clips // args.batch, 2), args.batch)
    x = worker_cpu(shards, True, max(args.worker_clips // args.batch, 2), args.batch)
    print(f"  {'a real loader worker (process CPU)':<34} {y:>29.2f} {x:>14.2f}")
    print(f"  ratio {y / x:.1f}x less worker CPU per clip with the frames decoded on the device (target: <= 5 ms)")

    torch.set_num_threads(threads)
    batch = collate(encoded[:64])
    decode_on_device(batch, "cpu")  # warm-up
    times = []
    for _ in range(3):
        t0 = time.process_time()  # CPU time: this machine's cores are shared
        out = decode_on_device(batch, "cpu")
        times.append(time.process_time() - t0)
    ms = 1e3 * min(times)
    print(f"\ndevice side on this CPU ({threads} threads, CPU time): decode + crop/resize/flip/colour of a batch of "
          f"{out['video'].shape[0]}: {ms:.0f} ms ({ms / out['video'].shape[0]:.1f} ms per clip); on a GPU: "
          f"benchmarks/gpu.sh")
    print(f"worker CPU per training clip: {x:.1f} ms (frames decoded on the device), "
          f"{y:.1f} ms (frames decoded in the worker)")


if __name__ == "__main__":
    main()
