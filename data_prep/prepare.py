"""One machine or one part: the label file -> rows -> build_shards; shared by the command line and the
submitit array tasks (data_prep/slurm.py)."""

from __future__ import annotations

import argparse

from .build import Options, Part, build_shards
from .labels import hold_out_val, read_labels


class CommandError(Exception):
    """A one-line reason the command cannot run (exit code 2)."""


def load_rows(args: argparse.Namespace) -> list:
    for path, what in ((args.videos, "--videos"), (args.labels, "--labels")):
        if not path.exists():
            raise CommandError(f"{what} {path} does not exist")
    try:
        rows = read_labels(args.format, args.labels, args.videos, default_split=args.default_split,
                           class_map=args.class_map, esc50_test_fold=args.esc50_test_fold)
    except (ValueError, KeyError, IndexError) as e:
        raise CommandError(f"cannot read {args.labels} as {args.format}: {e}") from None
    if args.split_by_fold:
        missing = [r.index for r in rows if r.fold is None]
        if missing:
            raise CommandError(f"--split-by-fold but {len(missing)} rows have no fold (first: row {missing[0]})")
        for r in rows:
            r.split = f"fold{r.fold}"
    args.held_out = None
    if getattr(args, "val_fraction", None) is not None:
        if args.split_by_fold:
            raise CommandError("--val-fraction and --split-by-fold: the folds are the splits (cross-validation "
                               "has no val split)")
        val = sum(r.split == "val" for r in rows)
        if val:
            raise CommandError(f"--val-fraction {args.val_fraction:g}: {args.labels} already has a val split "
                               f"({val} rows); drop --val-fraction, or the val rows' split")
        try:
            args.held_out = hold_out_val(rows, args.val_fraction, args.val_seed)
        except ValueError as e:
            raise CommandError(str(e)) from None
    return rows


def options_of(args: argparse.Namespace) -> Options:
    return Options(fps=args.fps, short_side=args.short_side, sample_rate=args.sample_rate,
                   audio_format=args.audio_format, max_seconds=args.max_seconds, min_seconds=args.min_seconds,
                   require_audio=args.require_audio, require_video=args.require_video,
                   jpeg_quality=args.jpeg_quality, shard_size_mb=args.shard_size_mb,
                   max_samples_per_shard=args.max_samples_per_shard)


def splits_of(args: argparse.Namespace) -> set[str] | None:
    return set(args.splits.split(",")) if args.splits else None


def run(args: argparse.Namespace) -> dict:
    """One machine, or one part (--part K --parts N): returns the (part) manifest with its summary."""
    rows = load_rows(args)
    part = Part(args.part, args.parts) if args.part is not None else None
    manifest = build_shards(rows, videos=args.videos, out=args.out, options=options_of(args), workers=args.workers,
                            splits=splits_of(args), timeout=args.timeout, stop_after_rows=args.stop_after_rows,
                            progress=not args.quiet, part=part, holdout=holdout_of(args))
    manifest["summary"]["held_out_val"] = args.held_out
    return manifest


def holdout_of(args: argparse.Namespace) -> dict | None:
    """--val-fraction's settings: a resumed run must draw the same val rows (the journal compares them)."""
    if getattr(args, "val_fraction", None) is None:
        return None
    return {"val_fraction": args.val_fraction, "val_seed": args.val_seed}
