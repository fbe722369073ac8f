"""python -m data_prep --videos DIR --labels FILE --out DIR [--workers N] [--format csv|audioset|vggsound|kinetics|esc50]

Turns a folder of videos / audio files and a label file into WebDataset shards (docs/data_format.md), with
manifest.json and skipped.csv. Re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .build import Options, build_shards
from .labels import FORMATS, read_labels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=Path, required=True, help="folder with the media files")
    p.add_argument("--labels", type=Path, required=True, help="label file")
    p.add_argument("--out", type=Path, required=True, help="output folder for shards, manifest.json, skipped.csv")
    p.add_argument("--format", default="csv", choices=FORMATS, help="label file layout (default: generic csv)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--fps", type=float, default=6.25,
                   help="stored frame rate (default 6.25 = 2x the paper's 3.125 FPS, for temporal jitter)")
    p.add_argument("--short-side", type=int, default=256, help="frames' shorter side in pixels (224 crops + margin)")
    p.add_argument("--sample-rate", type=int, default=48_000, help="stored audio rate (paper: 48 kHz)")
    p.add_argument("--audio-format", default="flac", choices=["flac", "wav"], help="16-bit mono audio container")
    p.add_argument("--max-seconds", type=float, default=10.0, help="longer clips are truncated (JSON: truncated)")
    p.add_argument("--min-seconds", type=float, default=0.0, help="shorter clips are skipped as too_short")
    p.add_argument("--require-audio", action="store_true", help="skip videos without an audio track")
    p.add_argument("--require-video", action="store_true", help="skip audio-only files")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size")
    p.add_argument("--max-samples-per-shard", type=int, default=None)
    p.add_argument("--splits", default=None, help="comma-separated splits to write (default: all)")
    p.add_argument("--default-split", default="train", help="split for rows without one")
    p.add_argument("--class-map", type=Path, default=None, help="AudioSet class_labels_indices.csv (MID -> name)")
    p.add_argument("--esc50-test-fold", type=int, default=None, help="ESC-50: this fold becomes the test split")
    p.add_argument("--split-by-fold", action="store_true",
                   help="use the fold column as the split (fold1, fold2, ...) for cross-validation (data.cv_fold=K)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a hung decode is given up")
    p.add_argument("--stop-after-rows", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated kill
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.videos, "--videos"), (args.labels, "--labels")):
        if not path.exists():
            print(f"error: {what} {path} does not exist", file=sys.stderr)
            return 2
    try:
        rows = read_labels(args.format, args.labels, args.videos, default_split=args.default_split,
                           class_map=args.class_map, esc50_test_fold=args.esc50_test_fold)
    except (ValueError, KeyError, IndexError) as e:
        print(f"error: cannot read {args.labels} as {args.format}: {e}", file=sys.stderr)
        return 2
    if args.split_by_fold:
        missing = [r.index for r in rows if r.fold is None]
        if missing:
            print(f"error: --split-by-fold but {len(missing)} rows have no fold (first: row {missing[0]})", file=sys.stderr)
            return 2
        for r in rows:
            r.split = f"fold{r.fold}"
    options = Options(fps=args.fps, short_side=args.short_side, sample_rate=args.sample_rate,
                      audio_format=args.audio_format, max_seconds=args.max_seconds, min_seconds=args.min_seconds,
                      require_audio=args.require_audio, require_video=args.require_video,
                      jpeg_quality=args.jpeg_quality, shard_size_mb=args.shard_size_mb,
                      max_samples_per_shard=args.max_samples_per_shard)
    splits = set(args.splits.split(",")) if args.splits else None
    start = time.time()
    manifest = build_shards(rows, videos=args.videos, out=args.out, options=options, workers=args.workers,
                            splits=splits, timeout=args.timeout, stop_after_rows=args.stop_after_rows,
                            progress=not args.quiet)
    s = manifest["summary"]
    per_split = ", ".join(f"{k} {v['num_samples']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items())
    print(f"rows in = {s['rows']}, written = {s['written']}, skipped = {s['skipped']}  ({time.time() - start:.1f} s)")
    print(f"splits: {per_split or 'none'}; classes: {len(manifest['classes'])}; multi-label: {manifest['multi_label']}")
    if s["reasons"]:
        print("skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(s["reasons"].items()))
              + f" (details: {args.out / 'skipped.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
