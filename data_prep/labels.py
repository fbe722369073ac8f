"""Label files -> rows (path, labels, split, fold). A generic CSV plus the official layouts of AudioSet,
VGGSound, Kinetics-400 and ESC-50. A row whose file cannot be found keeps `path=None` and a note, so it is
reported as skipped instead of silently dropped."""

from __future__ import annotations

import bisect
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

MEDIA_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".m4v", ".flv", ".wav", ".flac",
                    ".mp3", ".ogg", ".opus", ".m4a", ".aac")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
               "validation": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}


@dataclass
class Row:
    index: int  # 0-based row number in the label file (data rows only)
    path: str | None  # relative to --videos; None when no file matched
    labels: list[str]
    split: str
    fold: int | None = None
    source: str = ""  # what the label file said (for skipped.csv when path is None)
    problem: str | None = field(default=None)  # a reason to skip decided while reading the label file


def _split(value: str | None, default: str) -> str:
    if not value:
        return default
    name = SPLIT_NAMES.get(value.strip().lower())
    if name is None:
        raise ValueError(f"unknown split {value!r}; use train/val/test")
    return name


def normalise_path(path: str | None) -> str | None:
    """One spelling per file, so duplicates are found: `./clip 000.mp4`, `clip 000.mp4` and `a/../clip 000.mp4`
    are the same clip (surrounding spaces dropped, `.`, `..` and repeated separators resolved)."""
    path = (path or "").strip()
    return os.path.normpath(path) if path else None


def read_csv(path: Path, default_split: str) -> list[Row]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise ValueError(f"{path}: a generic label CSV needs a header with 'path' and 'label' columns "
                             f"(and optional 'split', 'fold'); found {reader.fieldnames}")
        rows = []
        for i, r in enumerate(reader):
            labels = [x.strip() for x in (r["label"] or "").split(";") if x.strip()]
            fold = r.get("fold")
            rows.append(Row(index=i, path=normalise_path(r["path"]), labels=labels,
                            split=_split(r.get("split"), default_split), fold=int(fold) if fold else None,
                            source=r["path"] or "", problem=None if labels else "no_label"))
        return rows


class FileIndex:
    """Finds media files below a directory by stem (official datasets name files after YouTube ids)."""

    def __init__(self, root: Path):
        self.root = root
        self.by_stem: dict[str, str] = {}
        for dirpath, _, files in os.walk(root):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in MEDIA_EXTENSIONS:
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    self.by_stem.setdefault(stem, rel)

    def find(self, *stems: str) -> str | None:
        """The first exact stem match, else the first file whose stem extends a candidate after `_` or `.`
        (downloaders append end times or fractions: `{ytid}_{start:06d}_{end:06d}`, `{ytid}_30.000`)."""
        for stem in stems:
            if stem in self.by_stem:
                return self.by_stem[stem]
        if not hasattr(self, "_sorted"):
            self._sorted = sorted(self.by_stem)
        for stem in stems:
            i = bisect.bisect_left(self._sorted, stem)
            while i < len(self._sorted) and self._sorted[i].startswith(stem):
                if self._sorted[i][len(stem)] in "_.":
                    return self.by_stem[self._sorted[i]]
                i += 1
        return None


def read_audioset(path: Path, videos: Path, default_split: str, class_map: Path | None = None) -> list[Row]:
    names = {}
    if class_map:
        with open(class_map, newline="") as f:
            names = {r["mid"]: r["display_name"] for r in csv.DictReader(f)}
    index, rows = FileIndex(videos), []
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip() and not line.startswith("#")]
    for i, r in enumerate(csv.reader(lines, skipinitialspace=True)):
        ytid, start, end, mids = r[0], float(r[1]), float(r[2]), r[3]
        mids = [m.strip() for m in mids.split(",") if m.strip()]
        labels = [names.get(m, m) for m in mids]
        # with a class map, a MID outside it is an error in one of the two files: report the row, don't guess
        unknown = [m for m in mids if names and m not in names]
        found = index.find(f"{ytid}_{start:.3f}", f"{ytid}_{int(start)}", f"{ytid}_{int(start * 1000)}", ytid)
        rows.append(Row(index=i, path=found, labels=labels, split=default_split, source=f"{ytid} {start}-{end}",
                        problem="unknown_label" if unknown else None if labels else "no_label"))
    return rows


def read_vggsound(path: Path, videos: Path, default_split: str) -> list[Row]:
    index, rows = FileIndex(videos), []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.reader(f)):
            ytid, start, label, split = r[0], int(float(r[1])), r[2].strip(), r[3]
            found = index.find(f"{ytid}_{start:06d}", f"{ytid}_{start}", ytid)
            rows.append(Row(index=i, path=found, labels=[label], split=_split(split, default_split),
                            source=f"{ytid} {start}"))
    return rows


def read_kinetics(path: Path, videos: Path, default_split: str) -> list[Row]:
    index, rows = FileIndex(videos), []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            ytid, start, end = r["youtube_id"], int(float(r["time_start"])), int(float(r["time_end"]))
            found = index.find(f"{ytid}_{start:06d}_{end:06d}", f"{ytid}_{start}_{end}", ytid)
            rows.append(Row(index=i, path=found, labels=[r["label"].strip()], split=_split(r.get("split"), default_split),
                            source=f"{ytid} {start}-{end}"))
    return rows


def read_esc50(path: Path, videos: Path, default_split: str, test_fold: int | None = None) -> list[Row]:
    index, rows = FileIndex(videos), []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            fold = int(r["fold"])
            found = index.find(os.path.splitext(r["filename"])[0])
            split = "test" if test_fold is not None and fold == test_fold else default_split
            rows.append(Row(index=i, path=found, labels=[r["category"].strip()], split=split, fold=fold,
                            source=r["filename"]))
    return rows


FORMATS = ("csv", "audioset", "vggsound", "kinetics", "esc50")


def read_labels(fmt: str, path: Path, videos: Path, *, default_split: str = "train", class_map: Path | None = None,
                esc50_test_fold: int | None = None) -> list[Row]:
    if fmt == "csv":
        return read_csv(path, default_split)
    if fmt == "audioset":
        return read_audioset(path, videos, default_split, class_map)
    if fmt == "vggsound":
        return read_vggsound(path, videos, default_split)
    if fmt == "kinetics":
        return read_kinetics(path, videos, default_split)
    if fmt == "esc50":
        return read_esc50(path, videos, default_split, esc50_test_fold)
    raise ValueError(f"unknown label format {fmt!r}; choose one of {FORMATS}")


def hold_out_val(rows: list[Row], fraction: float, seed: int = 0) -> int:
    """Move a seeded, stratified `fraction` of the train rows to a new val split (`--val-fraction`); returns how
    many moved. Strata are the first label of a row (the label of single-label data): each class gives
    floor(fraction * its rows), and the rows left to reach round(fraction * all) come from the classes with the
    largest remainders, so small classes are not rounded away together. Only rows that can be written (a file,
    labels, no problem) are drawn; the draw depends on the rows and the seed alone (every part of a partitioned
    run draws the same)."""
    import math
    import random

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {fraction:g}")
    strata: dict[str, list[Row]] = {}
    for r in rows:
        if r.split == "train" and r.path is not None and r.labels and not r.problem:
            strata.setdefault(r.labels[0], []).append(r)
    total = sum(len(v) for v in strata.values())
    rng = random.Random(seed)
    quota = {k: fraction * len(v) for k, v in strata.items()}
    take = {k: math.floor(q) for k, q in quota.items()}
    # the largest remainders first; ties broken by the seeded draw, not by class name
    order = sorted(strata, key=lambda k: (-(quota[k] - take[k]), rng.random()))
    for k in order[:max(0, round(fraction * total) - sum(take.values()))]:
        take[k] += 1
    moved = 0
    for k in sorted(strata):
        members = sorted(strata[k], key=lambda r: r.index)
        for r in random.Random(f"{seed}:{k}").sample(members, take[k]):
            r.split = "val"
            moved += 1
    return moved
