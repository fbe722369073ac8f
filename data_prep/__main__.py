"""python -m data_prep --videos DIR --labels FILE --out DIR [--workers N] [--format csv|audioset|vggsound|kinetics|esc50]

Turns a folder of videos / audio files and a label file into WebDataset shards (docs/data_format.md), with
manifest.json and skipped.csv. Re-running the same command resumes an interrupted run.

On many machines: `--part K --parts N` writes part K (0-based) of N, `--merge OUT` joins finished parts into
manifest.json / skipped.csv; `--slurm` (or `--slurm-local`) runs the N parts as one submitit job array and
merges when they finish (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .build import Part
from .labels import FORMATS
from .prepare import CommandError, run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=Path, help="folder with the media files")
    p.add_argument("--labels", type=Path, help="label file")
    p.add_argument("--out", type=Path, help="output folder for shards, manifest.json, skipped.csv")
    p.add_argument("--format", default="csv", choices=FORMATS, help="label file layout (default: generic csv)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (per part with --slurm; default: --slurm-cpus, else 1)")
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
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="hold out a seeded, stratified (by first label) fraction F of train as a val split, "
                        "for label files without one")
    p.add_argument("--val-seed", type=int, default=0, help="seed of the --val-fraction draw (default 0)")
    p.add_argument("--class-map", type=Path, default=None, help="AudioSet class_labels_indices.csv (MID -> name)")
    p.add_argument("--esc50-test-fold", type=int, default=None, help="ESC-50: this fold becomes the test split")
    p.add_argument("--split-by-fold", action="store_true",
                   help="use the fold column as the split (fold1, fold2, ...) for cross-validation (data.cv_fold=K)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a hung decode is given up")
    p.add_argument("--stop-after-rows", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated kill
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("many machines")
    g.add_argument("--part", type=int, default=None, help="write only part K (0-based) of --parts N")
    g.add_argument("--parts", type=int, default=None, help="number of parts the label rows are split into")
    g.add_argument("--merge", type=Path, default=None, metavar="OUT",
                   help="join the finished parts in OUT into OUT/manifest.json and OUT/skipped.csv")
    g.add_argument("--slurm", action="store_true", help="submit the --parts N parts as one SLURM job array, then merge")
    g.add_argument("--slurm-local", action="store_true",
                   help="the --slurm path with submitit's local executor (all parts on this machine)")
    g.add_argument("--slurm-partition", default=None, help="SLURM partition")
    g.add_argument("--slurm-time", type=int, default=24 * 60, help="time limit per part in minutes (default 1440)")
    g.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per part (default: --workers)")
    g.add_argument("--slurm-mem-gb", type=float, default=None, help="memory per part (default: the cluster's)")
    g.add_argument("--slurm-array-parallelism", type=int, default=256, help="parts running at once (default 256)")
    args = p.parse_args(argv)
    if args.merge is None:
        missing = [f"--{k}" for k in ("videos", "labels", "out") if getattr(args, k) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)} (or --merge OUT)")
    if (args.part is not None or args.slurm or args.slurm_local) and args.parts is None:
        p.error("--part, --slurm and --slurm-local need --parts N")
    if args.parts is not None and args.parts < 1:
        p.error("--parts must be at least 1")
    if args.part is not None and not 0 <= args.part < args.parts:
        p.error(f"--part must be in 0..{args.parts - 1} (0-based)")
    if args.parts is not None and args.part is None and not (args.slurm or args.slurm_local):
        p.error("--parts N needs --part K (one part) or --slurm / --slurm-local (all parts)")
    if args.workers is None:
        args.workers = args.slurm_cpus or 1
    return args


def report(manifest: dict, out: Path, seconds: float) -> None:
    skipped_csv = Part(manifest["part"]["index"], manifest["part"]["parts"]).file(out, "skipped.csv") \
        if "part" in manifest else out / "skipped.csv"
    s = manifest["summary"]
    per_split = ", ".join(f"{k} {v['num_samples']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items())
    what = f"part {manifest['part']['index']} of {manifest['part']['parts']}: " if "part" in manifest else ""
    print(f"{what}rows in = {s['rows']}, written = {s['written']}, skipped = {s['skipped']}  ({seconds:.1f} s)")
    print(f"splits: {per_split or 'none'}; classes: {len(manifest['classes'])}; multi-label: {manifest['multi_label']}")
    if s.get("held_out_val") is not None:
        print(f"val: {s['held_out_val']} rows held out of train (--val-fraction, seeded, stratified by first label)")
    if s["reasons"]:
        print("skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(s["reasons"].items()))
              + f" (details: {skipped_csv})")
    if s["reasons"].get("duplicate_across_splits"):
        print(f"warning: {s['reasons']['duplicate_across_splits']} clip(s) listed in more than one split; each is "
              f"kept in the first split that lists it only (duplicate_across_splits in {skipped_csv})")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    from .parts import MergeError, merge

    try:
        if args.merge is not None:
            manifest, out = merge(args.merge), args.merge
        elif args.slurm or args.slurm_local:
            from .slurm import submit

            manifest, out = submit(args), args.out
        else:
            manifest, out = run(args), args.out
    except (CommandError, MergeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(manifest, out, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
