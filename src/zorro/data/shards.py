"""Streaming the WebDataset shards written by `data_prep` (docs/data_format.md) into contract batches.

Splitting work: every (rank, worker) pair is a *slot*. With at least as many shards as slots, each slot reads
its own shards (shuffled per epoch in training); with fewer shards than slots (small data, many workers),
every slot reads all shards and keeps every n-th sample, so no worker sits idle or hangs. Evaluation sees each
clip exactly once across all ranks and workers (no padding, no repeats); training yields a fixed number of
batches per epoch on every rank (DDP needs that), looping over a slot's samples if it runs short.
"""

from __future__ import annotations

import copy
import importlib
import io
import itertools
import json
import logging
import random
import re
import signal
import subprocess
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlparse

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import ConfigError
from .device import EncodedFrames, collate
from .info import DatasetInfo
from .transforms import (AUDIO_ALIGN, View, audio_span, augment, colour_params, eval_crop_boxes, random_resized_box,
                         window_audio, window_frame_indices, window_starts)

log = logging.getLogger(__name__)
FRAME = re.compile(r"^f(\d+)\.jpg$")


class ManifestNotFound(ConfigError, FileNotFoundError):
    """data.root has no readable manifest.json (a one-line error from train.py / evaluate.py)."""


class DataError(RuntimeError):
    """Too much of the training data is unreadable (data.max_bad_fraction)."""


def is_url(root: str | Path) -> bool:
    return isinstance(root, str) and ("://" in root or root.startswith("pipe:"))


def shard_url(root: str | Path, name: str) -> str:
    """Where shard `name` of a shard folder is: a local path, root + "/" + name for a URL (http(s)://, s3://,
    gs://, any fsspec URL), or a `{name}` template (e.g. `pipe:aws s3 cp s3://bucket/as2m/{name} -`)."""
    root = str(root)
    if "{name}" in root:
        return root.replace("{name}", name)
    if is_url(root):
        if root.startswith("pipe:"):
            raise ManifestNotFound(f"data.root={root!r}: a pipe: root needs a {{name}} placeholder for the file name")
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


def _first_line(e: BaseException) -> str:
    # webdataset appends (stream, url) to an exception's args, which would make str(e) a tuple
    text = e.args[0] if len(e.args) > 1 and isinstance(e.args[0], str) else str(e)
    return f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:300]}"


def read_manifest(root: str | Path) -> dict:
    url = shard_url(root, "manifest.json")
    if not is_url(root):
        path = Path(url)
        if not path.exists():
            raise ManifestNotFound(f"no manifest.json in {root}: make shards with `python -m data_prep` first")
        text = path.read_text()
    else:  # read like the shards: fsspec for URLs, the shell for pipe:
        try:
            if url.startswith("pipe:"):
                text = subprocess.run(url[5:], shell=True, check=True, capture_output=True, timeout=300).stdout.decode()
            else:
                import fsspec

                with fsspec.open(url, "rt") as f:
                    text = f.read()
        except Exception as e:
            raise ManifestNotFound(f"cannot read {url} ({_first_line(e)}): is data.root a shard folder "
                                   f"written by `python -m data_prep`, and is it reachable?") from None
    manifest = json.loads(text)
    if manifest.get("format_version") != 1:
        raise ValueError(f"{url}: unsupported format_version {manifest.get('format_version')}")
    return manifest


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    import fsspec

    return fsspec.open(url, mode).open()


def open_shard(url: str, cache_dir: str | None = None):
    """A binary stream of one shard, read as it arrives: local files directly; http(s), pipe:, gs:// through
    webdataset's gopen (curl with retries, shell pipes, gsutil); any other fsspec URL (s3://, az://, gcs://...)
    through fsspec. With `cache_dir`, a remote shard is copied there on first use (webdataset's FileCache) and
    later epochs read the copy."""
    gopen = importlib.import_module("webdataset.gopen")  # the module: `webdataset.gopen` is also its function
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return open(url.removeprefix("file://"), "rb")
    if scheme not in gopen.gopen_schemes:  # webdataset's dispatch table: fsspec for what it lacks
        gopen.gopen_schemes[scheme] = _gopen_fsspec
    if cache_dir:
        import hashlib

        def cache_name(u: str) -> str:  # shard names repeat across datasets (train-000000.tar): prefix a hash
            return hashlib.sha1(u.encode()).hexdigest()[:12] + "-" + u.rstrip("/").rsplit("/", 1)[-1][-100:]

        from webdataset.cache import FileCache

        return open(FileCache(cache_dir, url_to_name=cache_name).get_file(url), "rb")
    return gopen.gopen(url)


class ClipSampler:
    """Raw shard sample -> one (training) or windows x crops (evaluation) contract samples."""

    def __init__(self, *, num_classes: int, multi_label: bool, num_frames: int, frame_rate: float, image_size: int,
                 sample_rate: int, train: bool, min_crop_scale: float, aspect_ratio: Sequence[float], flip: bool,
                 color_prob: float, windows: int, crops: int, modalities: Sequence[str],
                 audio_seconds: float | None = None, audio_align: str = "window_centre"):
        self.num_classes, self.multi_label = num_classes, multi_label
        self.num_frames, self.frame_rate, self.image_size, self.sample_rate = num_frames, frame_rate, image_size, sample_rate
        self.window = num_frames / frame_rate
        self.train, self.min_crop_scale, self.aspect_ratio = train, min_crop_scale, tuple(aspect_ratio)
        self.flip, self.color_prob, self.windows, self.crops = flip, color_prob, windows, crops
        self.modalities = set(modalities)
        # The audio of a view is `audio_seconds` long (None: the frames' window), placed by `audio_align`
        # (audio_span): window_centre centres it on the frames' window (Zorro, MBT: the same span); clip_start gives
        # every view the clip's first `audio_seconds` whatever its frames (CAV-MAE: 10 s of audio, one frame).
        if audio_align not in AUDIO_ALIGN:
            raise ValueError(f"audio_align must be one of {AUDIO_ALIGN}, got {audio_align!r}")
        if audio_seconds is not None and audio_seconds <= 0:
            raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
        self.audio_seconds, self.audio_align = audio_seconds or self.window, audio_align
        self.encoded = False  # True: views carry JPEG bytes + augmentation for the device (zorro.data.device)

    def label(self, meta: dict) -> torch.Tensor:
        ids = meta.get("label_ids", [])
        if self.multi_label:
            y = torch.zeros(self.num_classes)
            y[ids] = 1.0
            return y
        if len(ids) != 1:
            raise ValueError(f"single-label data but clip {meta.get('key')} has labels {ids}")
        return torch.tensor(ids[0])

    def audio(self, raw: dict, meta: dict, span: tuple[float, float] | None = None) -> np.ndarray | None:
        """The clip's audio at the model's rate; only `span` = (start, seconds) of it when given and inside
        the clip (training reads 2.56 s, not the whole 10 s clip)."""
        if not meta.get("has_audio") or "audio" not in self.modalities:
            return None
        import soundfile as sf

        with sf.SoundFile(io.BytesIO(raw.get("flac") or raw.get("wav"))) as f:
            sr = f.samplerate
            if span is not None:
                f.seek(min(int(round(span[0] * sr)), f.frames))  # rounded as window_audio does
                wav = f.read(int(round(span[1] * sr)), dtype="int16")
            else:
                wav = f.read(dtype="int16")
        if wav.ndim > 1:
            wav = wav.mean(axis=1).astype(np.int16)
        if sr != self.sample_rate:
            import torchaudio.functional as AF

            wav = AF.resample(torch.from_numpy(wav.astype(np.float32) / 32768), sr, self.sample_rate)
            wav = (wav.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
        return wav

    def __call__(self, raw: dict, rng: random.Random):
        meta = json.loads(raw["json"])
        key, label = meta["key"], self.label(meta)
        frames = sorted(((int(m.group(1)), k) for k in raw if (m := FRAME.match(k))))
        has_video = bool(meta.get("has_video")) and bool(frames) and "video" in self.modalities
        duration = float(meta.get("duration") or 0.0)
        if self.train:
            starts = [rng.uniform(0, max(duration - self.window, 0.0))]
        else:
            starts = window_starts(duration, self.window, self.windows)
        offset, audio_seconds = 0.0, self.audio_seconds  # offset: time of the first sample of `audio`
        spans = [audio_span(start, window=self.window, seconds=audio_seconds, duration=duration, align=self.audio_align)
                 for start in starts]
        if len(set(spans)) == 1 and 0.0 <= spans[0] and spans[0] + audio_seconds <= duration:
            offset = spans[0]  # one span inside the clip: read only that (training reads 2.56 s of a 10 s clip)
            audio = self.audio(raw, meta, span=(offset, audio_seconds))
        else:  # several spans, or a short clip to loop
            audio = self.audio(raw, meta)
        n_audio = int(round(audio_seconds * self.sample_rate))
        for view_w, start in enumerate(starts):
            if has_video:
                idx = window_frame_indices(start=start, num_frames=self.num_frames, frame_rate=self.frame_rate,
                                           stored_fps=float(meta["fps"]), num_stored=len(frames))
                jpegs = [raw[frames[i][1]] for i in idx]
                if self.encoded:  # the device decodes; the box only needs the frame size, from the JPEG header
                    width, height = _jpeg_size(jpegs[0])
                else:
                    clip = torch.stack([decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8),
                                                    mode=ImageReadMode.RGB) for j in jpegs])
                    height, width = clip.shape[-2:]
                views = self._views(height, width, rng)
            else:
                jpegs, views = [], [None]  # no frames: spatial crops would be identical views
            wav = torch.zeros(n_audio, dtype=torch.int16) if audio is None else torch.from_numpy(
                window_audio(audio, start=spans[view_w] - offset, seconds=audio_seconds,
                             sample_rate=self.sample_rate).astype(np.int16))
            for view_c, view in enumerate(views):
                sample = {"audio": wav, "label": label, "has_video": torch.tensor(has_video),
                          "has_audio": torch.tensor(audio is not None), "key": key,
                          "view": torch.tensor(view_w * len(views) + view_c)}
                if self.encoded:
                    sample["frames"] = EncodedFrames([jpegs], [view], size=self.image_size, num_frames=self.num_frames)
                elif has_video:
                    sample["video"] = augment(clip, view, self.image_size)
                else:
                    sample["video"] = torch.zeros(self.num_frames, 3, self.image_size, self.image_size,
                                                  dtype=torch.uint8)
                yield sample

    def _views(self, height: int, width: int, rng: random.Random) -> list[View]:
        """The views of one window: crop boxes, then per box (training only) flip and colour, in this order of
        draws from `rng` on either path."""
        if not self.train:
            return [View(box) for box in eval_crop_boxes(height, width, self.crops)]
        box = random_resized_box(height, width, scale=(self.min_crop_scale, 1.0), ratio=self.aspect_ratio, rng=rng)
        flip = self.flip and rng.random() < 0.5
        colour = colour_params(rng) if rng.random() < self.color_prob else None
        return [View(box, flip, colour)]


def _jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG header alone."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        return image.size


def assign_shards(counts: Sequence[int], slots: int) -> list[list[int]]:
    """Shards per slot, balanced by sample count (largest first, each to the emptiest slot). Fixed across
    epochs, so every rank knows every slot's share and an epoch can be cut to the smallest share: no sample
    repeats within an epoch and every rank runs the same number of steps."""
    if len(counts) < slots:
        return [[] for _ in range(slots)]
    shares, totals = [[] for _ in range(slots)], [0] * slots
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        s = min(range(slots), key=lambda s: (totals[s], s))
        shares[s].append(i)
        totals[s] += counts[i]
    return [sorted(share) for share in shares]


def samples_per_slot(counts: Sequence[int], slots: int) -> int:
    """The smallest slot's sample count (what every slot can deliver without repeating)."""
    if len(counts) < slots:
        return sum(counts) // slots
    return min(sum(counts[i] for i in share) for share in assign_shards(counts, slots))


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _slot(rank: int, world: int) -> tuple[int, int]:
    """(this slot, number of slots) over all ranks and data-loader workers. The rank is read in the main
    process when the loader is made and travels with the dataset: a spawned worker has no process group."""
    info = get_worker_info()
    wid, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + wid, world * workers


class ShardStream(IterableDataset):
    def __init__(self, *, shards: Sequence[str], counts: Sequence[int], sampler: ClipSampler, train: bool,
                 samples_per_slot: int | None = None, length: int | None = None, shuffle_buffer: int = 0,
                 seed: int = 0, rank: int = 0, world: int = 1, batch_size: int = 1, workers: int = 1,
                 cache_dir: str | None = None):
        self.shards, self.counts, self.sampler, self.train = list(shards), list(counts), sampler, train
        self.rank, self.world = rank, world
        self.samples_per_slot, self.length, self.shuffle_buffer, self.seed = samples_per_slot, length, shuffle_buffer, seed
        self.epoch = 0  # advanced by every __iter__ (workers are persistent, so each keeps its own count)
        self.resume: tuple[int, int] | None = None  # (epoch, batches this rank trained on) from a checkpoint
        self.batch_size, self.cache_dir = batch_size, cache_dir
        # Unreadable samples skipped, one cell per data-loader worker: shared memory, so the main process (the
        # SkippedSamples callback) sees the workers' counts.
        self.bad = torch.zeros(max(1, workers), dtype=torch.int64).share_memory_()

    @property
    def skipped(self) -> int:
        return int(self.bad.sum())

    def _count_bad(self, n: int, what: str, e: BaseException) -> None:
        info = get_worker_info()
        self.bad[(info.id if info else 0) % len(self.bad)] += n
        log.warning("skipping unreadable %s: %s", what, _first_line(e))

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("evaluation streams have no fixed length")
        return self.length

    def _raw(self, slot: int, slots: int, order_rng: random.Random):
        mine, keep = assign_shards(self.counts, slots)[slot], None
        if len(self.shards) < slots:  # fewer shards than slots: everyone reads all, keeps every slots-th sample
            mine, keep = list(range(len(self.shards))), slot
        if self.train:  # a new shard order every epoch (the same in every slot); the shuffle buffer mixes further
            order_rng.shuffle(mine)
        n = 0
        for i in mine:
            read = 0
            try:
                stream = open_shard(self.shards[i], self.cache_dir)
                try:
                    for sample in _tar_samples(stream, self.shards[i]):
                        read += 1
                        if keep is None or n % slots == keep:
                            yield sample
                        n += 1
                finally:
                    try:
                        stream.close()
                    except Exception:  # curl cut off by an epoch that ends mid-shard reports SIGPIPE
                        pass
            except Exception as e:  # an unreadable (missing, truncated) shard: its unread samples count as skipped
                lost = max(self.counts[i] - read, 1)
                self._count_bad(lost if keep is None else -(-lost // slots), f"shard {self.shards[i]}", e)

    def _decode(self, raws, rngs):
        for raw, rng in zip(raws, rngs):
            try:
                yield from self.sampler(raw, rng)
            except Exception as e:  # one unreadable sample must not end the epoch: count it and go on
                self._count_bad(1, f"sample {raw.get('__key__')} ({raw.get('__url__')})", e)

    def __iter__(self):
        if get_worker_info() is not None:
            # A scheduler's SIGTERM goes to the whole process group: the loader's workers keep serving until the
            # trainer, which got it too, finishes its step and shuts them down (see zorro.preemption).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        slot, slots = _slot(self.rank, self.world)
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.train:
            rng = random.Random(self.seed)
            yield from self._decode(self._raw(slot, slots, random.Random(self.seed)), itertools.repeat(rng))
            return
        skip, self.resume = self._resumed_samples(epoch), None
        for _, sample in zip(range(self.samples_per_slot - skip), self._loop(slot, slots, epoch, skip)):
            yield sample

    def _resumed_samples(self, epoch: int) -> int:
        """Samples this slot already gave in the epoch a mid-epoch checkpoint interrupted. The DataLoader takes
        batch k from worker k % W, so after `done` batches worker w has given ceil((done - w) / W) of them."""
        if self.resume is None or self.resume[0] != epoch:
            return 0
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        return max(0, -(-(self.resume[1] - w) // W)) * self.batch_size

    def _loop(self, slot, slots, epoch, skip=0):
        """This slot's samples (shard order shuffled, then a shuffle buffer), looping only if the epoch asks for
        more than the slot has: the buffer works within one pass, so a pass never repeats a sample.

        The buffer shuffles the raw (undecoded) samples and each sample's crops/flips come from its own seeded
        generator, so a resumed epoch drops the `skip` samples already trained on without decoding them and
        continues with exactly the samples the uninterrupted run would have given."""
        for rep in range(1 << 30):
            produced = False
            rng = random.Random(hash((self.seed, epoch, slot, rep)))  # this slot's buffer
            raws = self._raw(slot, slots, order_rng=random.Random(hash((self.seed, epoch, rep))))
            if self.shuffle_buffer > 1:
                raws = _shuffled(raws, self.shuffle_buffer, rng)
            rngs = (random.Random(hash((self.seed, epoch, slot, rep, n))) for n in itertools.count())
            if skip and rep == 0:
                raws, rngs = itertools.islice(raws, skip, None), itertools.islice(rngs, skip, None)
            for sample in self._decode(raws, rngs):
                produced = True
                yield sample
            if not produced and not (skip and rep == 0):
                raise DataError(f"slot {slot}/{slots} found no readable samples in {len(self.shards)} shards")


def tar_samples(urls: Iterable[str]) -> Iterator[dict]:
    """The samples of WebDataset tars, as webdataset's tarfile_samples gives them ({"__key__", "__url__",
    extension: bytes}), opened like the training stream (open_shard), read ~5x faster: Python's tarfile in
    stream mode costs ~40 us per member, ~2 ms of a worker's CPU per clip of 60 frames, more than everything
    else a worker does when the frames decode on the device. ustar, GNU long names and pax headers."""
    for url in urls:
        with open_shard(url) as stream:
            yield from _tar_samples(stream, url)


def _tar_samples(stream, url: str) -> Iterator[dict]:
    from webdataset.tariterators import base_plus_ext

    sample, long_name, pax = None, None, {}
    while True:
        header = stream.read(512)
        if not header or header.count(0) == 512:
            break  # end of archive (zero blocks; a stream may omit them)
        if len(header) < 512:
            raise ValueError(f"{url}: truncated tar (a header of {len(header)} bytes)")
        checksum, unsigned = int(header[148:156].strip(b"\0 ") or b"0", 8), sum(header) - sum(header[148:156]) + 256
        if checksum != unsigned and checksum != unsigned - 256 * sum(b > 127 for b in header):  # some write signed
            raise ValueError(f"{url}: corrupt tar header after sample {sample and sample['__key__']!r}")
        size = int(pax["size"]) if "size" in pax else int(header[124:136].strip(b"\0 ") or b"0", 8)
        data = stream.read(size)
        if len(data) < size:
            raise ValueError(f"{url}: truncated tar (a member of {size} bytes has {len(data)})")
        stream.read(-size % 512)
        kind = header[156:157]
        if kind in (b"x", b"g"):  # pax records "LEN key=value\n" for the next member (g: global, ignored)
            if kind == b"x":
                pax = dict(r.split(b" ", 1)[1].decode().split("=", 1) for r in data.split(b"\n") if r)
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode()
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode()
            if header[257:263] == b"ustar\0" and header[345]:  # POSIX ustar: a directory prefix
                name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        long_name, pax = None, {}
        if kind not in (b"0", b"\0") or ("__" in name and re.match(r"__[^/]*__($|/)", name)):
            continue  # directories, links; webdataset's metadata members
        key, ext = base_plus_ext(name)  # as webdataset: the key is the name up to the basename's first dot
        if key is None:
            continue
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        ext = ext.lower()
        if ext in sample:
            raise ValueError(f"{url}: {name} appears twice in sample {key!r}")
        sample[ext] = data
    if sample is not None:
        yield sample


def _shuffled(stream, size: int, rng: random.Random):
    buffer = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardDataModule(pl.LightningDataModule):
    """`data=shards data.root=DIR`: the manifest gives classes, splits and epoch length; absent splits are not run."""

    def __init__(self, *, root: str, batch_size: int = 8, num_workers: int = 4, num_frames: int = 8,
                 frame_rate: float = 3.125, image_size: int = 224, sample_rate: int = 48_000,
                 min_crop_scale: float = 0.3, aspect_ratio: Sequence[float] = (0.75, 1.3333), flip: bool = True,
                 color_prob: float = 0.8, shuffle_buffer: int = 512, eval_windows: int = 4, eval_crops: int = 3,
                 epoch_length: int | None = None, train_split: str = "train", val_split: str = "val",
                 test_split: str = "test", cv_fold: int | None = None,
                 modalities: Sequence[str] = ("audio", "video"), audio_seconds: float | None = None,
                 audio_align: str = "window_centre", pin_memory: bool = False, decode_on_device: bool | str = "auto",
                 seed: int = 0, cache_dir: str | None = None, max_bad_fraction: float = 0.01):
        super().__init__()
        if decode_on_device not in ("auto", True, False):
            raise ValueError(f"decode_on_device must be auto, true or false, got {decode_on_device!r}")
        self.decode_on_device = decode_on_device
        self.root = root if is_url(root) else Path(root)  # a folder or a URL (docs/cluster_training.md)
        self.cache_dir, self.max_bad_fraction = cache_dir, max_bad_fraction
        self.manifest = read_manifest(root)
        self.info = DatasetInfo(num_classes=len(self.manifest["classes"]), multi_label=bool(self.manifest["multi_label"]),
                                class_names=tuple(self.manifest["classes"]))
        if not set(modalities) <= {"audio", "video"} or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of (audio, video), got {modalities}")
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.epoch_length, self.shuffle_buffer = epoch_length, shuffle_buffer
        # Each stage reads one or more manifest splits. Cross-validation (ESC-50: shards written with
        # `data_prep --split-by-fold`): fold k is the test set, the other folds train, and there is no
        # validation split (selecting checkpoints on the test fold would leak it).
        self.split_names = {"train": [train_split], "val": [val_split], "test": [test_split]}
        if cv_fold is not None:
            folds = sorted(k for k in self.manifest["splits"] if re.fullmatch(r"fold\d+", k))
            if f"fold{cv_fold}" not in folds:
                raise ValueError(f"cv_fold={cv_fold}: {root} has splits {sorted(self.manifest['splits'])}; "
                                 f"write them with `python -m data_prep ... --split-by-fold`")
            self.split_names = {"train": [f for f in folds if f != f"fold{cv_fold}"], "val": [],
                                "test": [f"fold{cv_fold}"]}
        common = dict(num_classes=self.info.num_classes, multi_label=self.info.multi_label, num_frames=num_frames,
                      frame_rate=frame_rate, image_size=image_size, sample_rate=sample_rate,
                      min_crop_scale=min_crop_scale, aspect_ratio=aspect_ratio, flip=flip, color_prob=color_prob,
                      modalities=modalities, audio_seconds=audio_seconds, audio_align=audio_align)
        self.samplers = {"train": ClipSampler(train=True, windows=1, crops=1, **common),
                         "eval": ClipSampler(train=False, windows=eval_windows, crops=eval_crops, **common),
                         "features": ClipSampler(train=False, windows=1, crops=1, **common)}  # linear probe
        self._streams: dict[str, ShardStream] = {}
        self._resume: tuple[int, int] | None = None

    def _shards(self, stage: str) -> list[dict]:
        names = self.split_names.get(stage, [stage])
        return [s for name in names for s in self.manifest["splits"].get(name, {}).get("shards", [])]

    def has_split(self, stage: str) -> bool:
        return sum(s["num_samples"] for s in self._shards(stage)) > 0

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer  # None outside a Trainer (tests, benchmarks)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return _rank_world()

    def stream(self, stage: str) -> ShardStream:
        shards = [shard_url(self.root, s["name"]) for s in self._shards(stage)]
        counts = [s["num_samples"] for s in self._shards(stage)]
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        if stage != "train":
            return ShardStream(shards=shards, counts=counts, sampler=self._sampler("eval"), train=False, seed=self.seed,
                               rank=rank, world=world, workers=workers, cache_dir=self.cache_dir)
        slots = workers * world
        per_slot = samples_per_slot(counts, slots)  # no repeats within an epoch
        if self.epoch_length:  # a fixed epoch length (shorter, or longer with repeats)
            per_slot = self.epoch_length // slots
        per_slot = max(per_slot // self.batch_size, 1) * self.batch_size  # whole batches, equal everywhere
        stream = ShardStream(shards=shards, counts=counts, sampler=self._sampler("train"), train=True,
                           samples_per_slot=per_slot, length=per_slot * workers, shuffle_buffer=self.shuffle_buffer,
                           seed=self.seed, rank=rank, world=world, batch_size=self.batch_size, workers=workers,
                           cache_dir=self.cache_dir)
        if self._resume:  # continue the checkpoint's epoch where it stopped (see ShardStream._loop), or the next
            epoch, done = self._resume
            finished = done >= len(stream) // self.batch_size
            stream.epoch, stream.resume = (epoch + 1, None) if finished else (epoch, self._resume)
            self._resume = None
        return stream

    def frames_on_device(self) -> bool:
        """data.decode_on_device: `auto` decodes the frames on the device when the trainer runs on CUDA (nvJPEG);
        outside a trainer (tests, benchmarks, the linear probe) and on CPU the workers decode them."""
        if self.decode_on_device == "auto":
            from lightning.pytorch.accelerators import CUDAAccelerator

            return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return bool(self.decode_on_device)

    def _sampler(self, name: str) -> ClipSampler:
        sampler = copy.copy(self.samplers[name])
        sampler.encoded = self.frames_on_device()
        return sampler

    # Lightning saves these in checkpoints and restores them before it builds the loaders.
    def state_dict(self) -> dict:
        trainer = self.trainer
        # During fit, including its validation (a preemption checkpoint can be written mid-validation); not
        # for validate()/test() runs, which have no training stream to continue.
        if trainer is None or trainer.state.fn != "fit":
            return {}
        return {"epoch": trainer.current_epoch,
                "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (state["epoch"], state["batches"]) if state.get("batches") else None

    def skipped(self, stage: str = "train") -> int:
        """Unreadable samples skipped so far by this process's `stage` stream (all its workers, all epochs)."""
        stream = self._streams.get(stage)
        return stream.skipped if stream is not None else 0

    def check_skipped(self, skipped: int, epochs: int = 1) -> None:
        """Fail when more than max_bad_fraction of this rank's `epochs` epochs was unreadable: a few bad clips in a
        large dataset are skipped, a broken dataset is not silently trained on."""
        stream = self._streams.get("train")
        if stream is None or skipped <= self.max_bad_fraction * len(stream) * epochs:
            return
        raise DataError(f"{skipped} unreadable training samples in {epochs} epoch(s) of {len(stream)} samples on "
                        f"this rank: more than data.max_bad_fraction={self.max_bad_fraction:g}; the warnings above "
                        f"name them (re-run data_prep for those shards, or raise data.max_bad_fraction)")

    def _loader(self, stage: str):
        if not self.has_split(stage):
            return []  # Lightning skips a stage whose loader is empty
        if stage not in self._streams:
            self._streams[stage] = self.stream(stage)
        return DataLoader(self._streams[stage], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
                          drop_last=stage == "train", collate_fn=collate)

    def feature_dataloader(self, stage: str):
        """Deterministic loader for frozen-feature extraction (linear probe): the train split as one central,
        unaugmented view per clip; other splits with their evaluation views."""
        if stage != "train":
            if not self.has_split(stage):
                return []
            stream = self.stream(stage)
            stream.sampler.encoded = False  # the probe runs the backbone outside Lightning: decode in the workers
            return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)
        sampler = self.samplers["features"]
        rank, world = self._rank_world()
        stream = ShardStream(shards=[shard_url(self.root, s["name"]) for s in self._shards("train")],
                             counts=[s["num_samples"] for s in self._shards("train")], sampler=sampler, train=False,
                             seed=self.seed, rank=rank, world=world, workers=max(1, self.num_workers),
                             cache_dir=self.cache_dir)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")
