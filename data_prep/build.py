"""Rows -> decoded, encoded samples (in worker processes) -> WebDataset shards, manifest.json, skipped.csv.

Guarantees (docs/data_format.md):
- every row ends in a shard or in skipped.csv with a reason; rows in = written + skipped, checked at the end;
- deterministic: samples keep label-file order within a split, shard boundaries depend only on the data;
- resumable: a shard is written under a temporary name and renamed when complete, then recorded in an
  append-only journal; a restarted run keeps recorded shards and skips, deletes leftovers, and redoes the rest;
- one bad file never stops the run: decoding runs in worker processes, and a crashed or hung decoder only
  costs the rows it was working on, which are retried one by one in isolation;
- partitionable: `Part(K, N)` writes only rows [K*R/N, (K+1)*R/N) under part-tagged shard names, with its own
  journal, manifest and skip report in `parts/` (keys, classes and duplicates still come from all rows, so the
  merged parts hold exactly the samples of a one-machine run; data_prep/parts.py merges them).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import os
import re
import sys
import unicodedata
from collections import Counter, deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .labels import Row

JOURNAL = ".data_prep_journal.jsonl"
PARTS_DIR = "parts"  # a partitioned run's per-part journals, manifests and skip reports


@dataclass(frozen=True)
class Part:
    """Part `index` of `parts`: a contiguous block of label rows, so the parts' shards sorted by name list the
    samples in label-file order, as one machine writes them."""

    index: int
    parts: int

    @property
    def name(self) -> str:
        return f"p{self.index:05d}of{self.parts:05d}"

    def rows(self, n: int) -> range:
        return range(self.index * n // self.parts, (self.index + 1) * n // self.parts)

    def file(self, out: Path, what: str) -> Path:
        return out / PARTS_DIR / f"{self.name}.{what}"


@dataclass(frozen=True)
class Options:
    fps: float = 6.25
    short_side: int = 256
    sample_rate: int = 48_000
    audio_format: str = "flac"
    max_seconds: float = 10.0
    min_seconds: float = 0.0
    require_audio: bool = False
    require_video: bool = False
    jpeg_quality: int = 90
    shard_size_mb: float = 256.0
    max_samples_per_shard: int | None = None


# -- keys --------------------------------------------------------------------------------------------------
def sanitize_key(text: str) -> str:
    """[A-Za-z0-9_-] only: WebDataset splits a key at its first dot (AudioSet's `abc_40.000` breaks otherwise)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "clip"


def assign_keys(rows: list[Row]) -> dict[int, str]:
    """A unique key per row with a file, derived from its path; collisions get -1, -2, ... in row order."""
    keys, used = {}, set()
    for row in rows:
        if row.path is None:
            continue
        base = sanitize_key(os.path.splitext(row.path)[0].replace(os.sep, "_"))
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}-{n}"
        used.add(key)
        keys[row.index] = key
    return keys


# -- worker side -------------------------------------------------------------------------------------------
def encode_sample(task: dict) -> tuple:
    """Decode one file and encode it as shard members. Returns ("ok", members) or ("skip", reason, message)."""
    from PIL import Image

    from zorro.data.media import MediaError, decode_media

    opt = Options(**task["options"])
    try:
        clip = decode_media(task["abs_path"], fps=opt.fps, short_side=opt.short_side, sample_rate=opt.sample_rate,
                            max_seconds=opt.max_seconds, min_seconds=opt.min_seconds,
                            require_audio=opt.require_audio, require_video=opt.require_video)
    except MediaError as e:
        return ("skip", e.reason, e.message)
    except Exception as e:  # anything unexpected is this file's problem, not the run's
        return ("skip", "corrupt", f"{type(e).__name__}: {e}"[:300])
    key = task["key"]
    members: dict = {"__key__": key}
    meta = dict(task["meta"], duration=round(clip.duration, 4), source_duration=round(clip.source_duration, 4),
                truncated=clip.truncated, has_audio=clip.has_audio, has_video=clip.has_video, fps=opt.fps,
                num_frames=0, width=0, height=0, sample_rate=opt.sample_rate, num_samples=0)
    if clip.has_video:
        for t, frame in enumerate(clip.frames):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=opt.jpeg_quality)
            members[f"f{t:03d}.jpg"] = buf.getvalue()
        meta.update(num_frames=len(clip.frames), height=int(clip.frames.shape[1]), width=int(clip.frames.shape[2]))
    if clip.has_audio:
        import soundfile as sf

        buf = io.BytesIO()
        pcm = np.round(np.clip(clip.audio, -1, 1) * 32767).astype(np.int16)
        sf.write(buf, pcm, opt.sample_rate, format=opt.audio_format.upper(), subtype="PCM_16")
        members[opt.audio_format] = buf.getvalue()
        meta["num_samples"] = int(pcm.size)
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return ("ok", members)


def _init_worker() -> None:
    # Die with the parent: a killed run must not leave decoders behind (Linux; elsewhere best effort).
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    # FFmpeg/decord print decode errors straight to stderr; they are in skipped.csv already.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(max_workers=workers, initializer=_init_worker)


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    for p in list(getattr(pool, "_processes", {}).values()):
        p.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _run_isolated(task: dict, timeout: float, fn=encode_sample) -> tuple:
    pool = _pool(1)
    try:
        return pool.submit(fn, task).result(timeout=timeout)
    except cf.TimeoutError:
        return ("skip", "timeout", f"decoding took longer than {timeout:.0f} s")
    except BrokenProcessPool:
        return ("skip", "decoder_crashed", "the decoder process crashed on this file")
    finally:
        _kill(pool)


def run_tasks(tasks, *, workers: int, timeout: float, fn=encode_sample):
    """Yield (task, result) in task order, running `fn` on up to `workers` tasks at a time in worker processes."""
    tasks = iter(tasks)
    pool = _pool(workers)
    window: deque = deque()

    def refill():
        while len(window) < 4 * workers:
            task = next(tasks, None)
            if task is None:
                return
            window.append((task, pool.submit(fn, task)))

    refill()
    try:
        while window:
            task, future = window.popleft()
            try:
                result = future.result(timeout=timeout)
            except (BrokenProcessPool, cf.TimeoutError):
                # Some file crashed or hung a worker: retry every in-flight file alone to find which.
                in_flight = [task] + [t for t, _ in window]
                window.clear()
                _kill(pool)
                for t in in_flight:
                    yield t, _run_isolated(t, timeout, fn)
                pool = _pool(workers)
                refill()
                continue
            yield task, result
            refill()
    finally:
        _kill(pool)


# -- main-process side -----------------------------------------------------------------------------------------
class Journal:
    """Append-only record of finished shards and skipped rows: what a restarted run must not redo."""

    def __init__(self, path: Path, options: Options, splits: set[str] | None = None, extra: dict | None = None):
        # The selected splits are part of the settings: journalled `split_not_selected` skips depend on them.
        settings = dict(asdict(options), splits=sorted(splits) if splits else None, **(extra or {}))
        self.path = path
        self.shards: list[dict] = []
        self.skipped: dict[int, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if rec["type"] == "options" and {"splits": None, **rec["options"]} != settings:
                    raise SystemExit(f"error: {path.parent} was written with other options {rec['options']}; "
                                     f"use the same options to resume, or a new --out")
                elif rec["type"] == "shard":
                    self.shards.append(rec)
                elif rec["type"] == "skip":
                    self.skipped[rec["row"]] = rec
        self.file = open(path, "a")
        try:  # two processes appending to one journal (a part submitted twice) would interleave shards
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another process is writing {path.parent} ({path.name}); "
                             f"wait for it or stop it") from None
        except (ImportError, OSError):  # no locks here (Windows, some network file systems): best effort
            pass
        if not path.stat().st_size:
            self.append({"type": "options", "options": settings})

    def append(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def done_rows(self) -> set[int]:
        return {r for s in self.shards for r in s["rows"]} | set(self.skipped)


class Digesting:
    """A file being written, with its size and sha256 computed on the way (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.size, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class SplitWriter:
    """Writes one split's shards in order: `{split}{tag}-{n:06d}.tar`, via a temporary file renamed when full.
    `tag` is "" on one machine and `-pKKKKKofNNNNN` for a part, so parts never write the same name."""

    def __init__(self, out: Path, split: str, journal: Journal, options: Options, tag: str = ""):
        import webdataset as wds

        self._wds = wds
        self.out, self.split, self.journal, self.options, self.tag = out, split, journal, options, tag
        self.index = sum(1 for s in journal.shards if s["split"] == split)
        self.tar = None

    def add(self, members: dict, row: int) -> None:
        if self.tar is None:
            self.tmp = self.out / f"{self.split}{self.tag}-{self.index:06d}.tar.tmp"
            self.stream = Digesting(open(self.tmp, "wb"))
            self.tar = self._wds.TarWriter(self.stream, mtime=0)  # fixed mtime: same input -> byte-identical shards
            self.rows, self.size, self.modalities = [], 0, {"audio": 0, "video": 0}
        self.tar.write(members)
        self.rows.append(row)
        meta = json.loads(members["json"])
        for m in self.modalities:  # per shard, for the manifest: which modalities the data has (docs/data_format.md)
            self.modalities[m] += bool(meta.get(f"has_{m}"))
        self.size += sum(len(v) for k, v in members.items() if k != "__key__")
        full_size = self.size >= self.options.shard_size_mb * 2**20
        full_count = self.options.max_samples_per_shard and len(self.rows) >= self.options.max_samples_per_shard
        if full_size or full_count:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.stream.close()
        name = f"{self.split}{self.tag}-{self.index:06d}.tar"
        os.replace(self.tmp, self.out / name)
        # count, size and digest: what readers check each shard against (a shard cut short is never silent);
        # the samples with audio / video: which modalities the data has (docs/data_format.md)
        record = {"split": self.split, "name": name, "rows": self.rows, "num_samples": len(self.rows),
                  "num_audio": self.modalities["audio"], "num_video": self.modalities["video"],
                  "size": self.stream.size, "sha256": self.stream.sha256.hexdigest()}
        self.journal.append({"type": "shard", **record})
        self.journal.shards.append(record)
        self.index += 1
        self.tar = None


def rows_settings(rows: list[Row], options: Options, splits: set[str] | None, parts: int) -> dict:
    """What a part's output depends on besides its index: the options, the selected splits, the number of parts
    and every label row (a digest). Parts merge only when these agree."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.index, r.path, r.labels, r.split, r.fold, r.problem, r.source]).encode() + b"\n")
    return {"options": asdict(options), "splits": sorted(splits) if splits else None, "parts": parts,
            "rows": len(rows), "rows_sha256": h.hexdigest()}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_shards(rows: list[Row], *, videos: Path, out: Path, options: Options, workers: int = 1,
                 splits: set[str] | None = None, timeout: float = 600.0, stop_after_rows: int | None = None,
                 progress: bool = True, part: Part | None = None, holdout: dict | None = None) -> dict:
    """Write shards for `rows` (only part `part`'s rows when given); returns the manifest (the part manifest for
    a part). `stop_after_rows` stops abruptly (tests of resume)."""
    out.mkdir(parents=True, exist_ok=True)
    if part is None and (out / PARTS_DIR).is_dir() and any((out / PARTS_DIR).glob("p*of*.journal.jsonl")):
        raise SystemExit(f"error: {out} holds a partitioned run (parts/); pass --part/--parts, --merge, or a new --out")
    if part is not None and (out / JOURNAL).exists():
        raise SystemExit(f"error: {out} holds a one-machine run; write the parts to a new --out")
    settings = extra = None
    if part is not None:
        (out / PARTS_DIR).mkdir(exist_ok=True)
        settings = rows_settings(rows, options, splits, part.parts)
        extra = {"parts": part.parts, "rows_sha256": settings["rows_sha256"]}
    if holdout:
        extra = {**(extra or {}), **holdout}
    journal = Journal(part.file(out, "journal.jsonl") if part else out / JOURNAL, options, splits, extra)
    tag = f"-{part.name}" if part else ""  # (after the journal's lock: never delete a running writer's shard)
    for leftover in out.glob(f"*{tag}-[0-9][0-9][0-9][0-9][0-9][0-9].tar.tmp"):  # a shard interrupted by a kill
        leftover.unlink()  # (its rows were never journalled); a part removes only its own
    lost = [s["name"] for s in journal.shards if not (out / s["name"]).exists()]
    if lost:  # someone deleted finished shards: their rows cannot be told apart from done ones
        raise SystemExit(f"error: {out} lacks shards its journal lists as finished ({', '.join(lost[:3])}); "
                         f"use a new --out")
    # Classes, keys and duplicates come from all rows, also for a part: its samples equal one machine's.
    classes = sorted({label for r in rows for label in r.labels})
    class_index = {c: i for i, c in enumerate(classes)}
    multi_label = any(len(r.labels) > 1 for r in rows)
    keys = assign_keys(rows)
    done = journal.done_rows()
    mine = rows[part.rows(len(rows)).start:part.rows(len(rows)).stop] if part else rows
    mine_index = {r.index for r in mine}

    def skip(row: Row, reason: str, message: str) -> None:
        rec = {"type": "skip", "row": row.index, "path": row.path or row.source, "reason": reason, "message": message}
        journal.append(rec)
        journal.skipped[row.index] = rec

    first_of: dict[str, Row] = {}  # normalised path -> the row that keeps it
    tasks = []
    for row in rows:
        if row.path is not None:
            kept = first_of.setdefault(os.path.normpath(row.path), row)
            first = kept is row
        if row.index in done or row.index not in mine_index:
            continue
        if row.problem:
            skip(row, row.problem, "the label file gives no label for this row" if row.problem == "no_label"
                 else f"label(s) not in the class list: {row.labels}")
        elif row.path is None:
            skip(row, "missing_file", f"no file in --videos matches {row.source!r}")
        elif not first and kept.split != row.split:  # the same clip in train and test would leak the test set
            skip(row, "duplicate_across_splits", f"{row.path} is also row {kept.index} of split {kept.split!r} "
                 f"(kept there, not in {row.split!r})")
        elif not first:
            skip(row, "duplicate_row", f"{row.path} is listed more than once (first occurrence kept)")
        elif splits is not None and row.split not in splits:
            skip(row, "split_not_selected", f"split {row.split!r} is not in --splits")
        else:
            meta = {"key": keys[row.index], "source": row.path, "labels": row.labels,
                    "label_ids": [class_index[c] for c in row.labels], "split": row.split, "fold": row.fold,
                    "row": row.index}
            tasks.append({"row": row.index, "split": row.split, "key": keys[row.index], "meta": meta,
                          "abs_path": str(videos / row.path), "options": asdict(options)})

    writers: dict[str, SplitWriter] = {}
    rows_by_index = {r.index: r for r in mine}
    bar = _progress(total=len(mine), initial=len(mine) - len(tasks), enabled=progress)
    for n, (task, result) in enumerate(run_tasks(tasks, workers=max(1, workers), timeout=timeout)):
        if stop_after_rows is not None and n >= stop_after_rows:
            os._exit(3)  # as abrupt as a kill: nothing is flushed or finalised
        if result[0] == "ok":
            split = task["split"]
            if split not in writers:
                writers[split] = SplitWriter(out, split, journal, options, tag)
            writers[split].add(result[1], task["row"])
        else:
            skip(rows_by_index[task["row"]], result[1], result[2])
        bar.update(1)
    bar.close()
    for writer in writers.values():
        writer.close()
    journal.file.close()
    manifest = make_manifest(journal.shards, classes, multi_label, options)
    skipped = sorted(journal.skipped.values(), key=lambda r: r["row"])
    if part is None:
        return write_outputs(out / "manifest.json", out / "skipped.csv", manifest, skipped, len(rows))
    rng = part.rows(len(rows))
    manifest["part"] = {"index": part.index, "parts": part.parts, "rows": [rng.start, rng.stop],
                        "fingerprint": fingerprint(settings), "settings": settings}
    return write_outputs(part.file(out, "manifest.json"), part.file(out, "skipped.csv"), manifest, skipped, len(mine))


def make_manifest(shards: list[dict], classes: list[str], multi_label: bool, options: Options | dict) -> dict:
    """manifest.json (docs/data_format.md) for shard records {split, name, num_samples, num_audio, num_video[, size,
    sha256]}: shards sorted by name; the samples with audio / video counted per shard, split and in all
    (`modalities`), where every shard record has the counts (journals of older runs have none)."""
    opt = asdict(options) if isinstance(options, Options) else options
    splits: dict[str, dict] = {}
    counted = all("num_audio" in shard and "num_video" in shard for shard in shards)
    keys = ("num_samples", "num_audio", "num_video") if counted else ("num_samples",)
    for shard in shards:
        s = splits.setdefault(shard["split"], {**{k: 0 for k in keys}, "shards": []})
        # size and sha256: absent in journals of data_prep runs from before they were recorded
        s["shards"].append({"name": shard["name"], **{k: shard[k] for k in keys},
                            **{k: shard[k] for k in ("size", "sha256") if shard.get(k) is not None}})
        for k in keys:
            s[k] += shard[k]
    for s in splits.values():
        s["shards"].sort(key=lambda x: x["name"])
    modalities = {m: sum(s[f"num_{m}"] for s in splits.values()) for m in ("audio", "video")} if counted else None
    return {"format_version": 1, "classes": classes, "multi_label": multi_label, "fps": opt["fps"],
            "sample_rate": opt["sample_rate"], "short_side": opt["short_side"],
            "audio_format": opt["audio_format"], "max_seconds": opt["max_seconds"],
            **({"modalities": modalities} if modalities is not None else {}), "splits": dict(sorted(splits.items()))}


SKIPPED_HEADER = ["row", "path", "reason", "message"]


def write_outputs(manifest_path: Path, skipped_path: Path, manifest: dict, skipped: list[dict], rows: int) -> dict:
    """Checks that every row is accounted for, writes the skip report, then the manifest (last: a folder with a
    manifest is complete); returns the manifest with a `summary`."""
    written = sum(s["num_samples"] for s in manifest["splits"].values())
    if written + len(skipped) != rows:  # every row is accounted for, or this is a bug
        raise RuntimeError(f"rows in = {rows} but written {written} + skipped {len(skipped)}")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SKIPPED_HEADER)
    w.writerows([[r["row"], r["path"], r["reason"], r["message"]] for r in skipped])
    _atomic_write(skipped_path, buf.getvalue())
    _atomic_write(manifest_path, json.dumps(manifest, indent=2))
    reasons = Counter(r["reason"] for r in skipped)
    return dict(manifest, summary={"rows": rows, "written": written, "skipped": len(skipped), "reasons": dict(reasons)})


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a SLURM log gets the summary line, not \r updates)
    return tqdm(total=total, initial=initial, unit="clip", file=sys.stderr, disable=None if enabled else True)
