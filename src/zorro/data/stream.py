"""Streaming the WebDataset shards written by `data_prep` (docs/data_format.md) into contract batches.

Splitting work: every (rank, worker) pair is a *slot*. With at least as many shards as slots, each slot reads
its own shards (shuffled per epoch in training); with fewer shards than slots (small data, many workers),
every slot reads all shards and keeps every n-th sample, so no worker sits idle or hangs. Evaluation sees each
clip exactly once across all ranks and workers (no padding, no repeats); training yields a fixed number of
batches per epoch on every rank (DDP needs that), looping over a slot's samples if it runs short.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
from typing import Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError  # noqa: F401  (zorro.data.stream.DataError)
from .clips import ClipSampler
from .reading import Counted, first_line, open_shard, stream_samples

log = logging.getLogger(__name__)


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


def rank_world() -> tuple[int, int]:
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
                 cache_dir: str | None = None, sizes: Sequence[int | None] | None = None,
                 digests: Sequence[str | None] | None = None, remote: dict | None = None):
        self.shards, self.counts, self.sampler, self.train = list(shards), list(counts), sampler, train
        # What the manifest records of each shard (data_prep writes sizes and sha256 digests; older manifests
        # have only counts): every read is checked against it (_raw), a cached copy before it is kept.
        self.sizes = list(sizes) if sizes is not None else [None] * len(self.shards)
        self.digests = list(digests) if digests is not None else [None] * len(self.shards)
        self.remote = dict(remote or {})  # open_shard's timeout, retries, storage_options
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

    def _count_bad(self, n: int, what: str, e: BaseException | str) -> None:
        info = get_worker_info()
        self.bad[(info.id if info else 0) % len(self.bad)] += n
        log.warning("skipping unreadable %s: %s", what, e if isinstance(e, str) else first_line(e))

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
            read, problem, size = 0, None, None
            try:
                stream = Counted(open_shard(self.shards[i], self.cache_dir, size=self.sizes[i],
                                            sha256=self.digests[i], count=self.counts[i], **self.remote))
                try:
                    for sample in stream_samples(stream, self.shards[i]):
                        read += 1
                        if keep is None or n % slots == keep:
                            yield sample
                        n += 1
                    size = stream.drain()
                finally:
                    try:
                        stream.stream.close()
                    except Exception:  # a command cut off by an epoch that ends mid-shard reports SIGPIPE
                        pass
            except Exception as e:  # an unreadable (missing, truncated) shard: its unread samples count as skipped
                problem = first_line(e)
            if problem is None and read < self.counts[i]:  # a valid tar, but shorter than data_prep wrote it
                problem = f"it ends after {read} of the {self.counts[i]} samples the manifest lists"
            if problem is not None:
                lost = max(self.counts[i] - read, 1)
                # this slot's share of the lost samples: the positions it would have kept (all slots see the
                # same shard, so together they count each lost sample once)
                mine_lost = lost if keep is None else len(range((keep - n) % slots, lost, slots))
                n += max(self.counts[i] - read, 0)
                if mine_lost:
                    share = "" if keep is None else f", {mine_lost} of them by this worker"
                    self._count_bad(mine_lost, f"shard {self.shards[i]}",
                                    f"{problem} ({lost} samples counted as unreadable{share})")
            elif read > self.counts[i] or (self.sizes[i] is not None and size != self.sizes[i]):
                log.warning("shard %s differs from the manifest (%d samples, %s bytes; the manifest: %d, %s): "
                            "was it rewritten after data_prep?", self.shards[i], read, size, self.counts[i],
                            self.sizes[i])

    def _decode(self, raws, rngs):
        for raw, rng in zip(raws, rngs):
            try:
                yield from self.sampler(raw, rng)
            except Exception as e:  # one unreadable sample must not end the epoch: count it and go on
                self._count_bad(1, f"sample {raw.get('__key__')} ({raw.get('__url__')})", e)

    def __iter__(self):
        if get_worker_info() is not None:
            # A scheduler's SIGTERM goes to the whole process group: the loader's workers keep serving until the
            # trainer, which got it too, finishes its step and shuts them down (killing those that do not stop:
            # zorro.preemption.kill_loader_workers).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # An epoch is counted when its iteration is asked for, not when its first sample is read: an iteration the
        # trainer starts and never reads (a resumed run's restarted epoch) moves on to the next epoch alike with or
        # without loader workers (a worker reads ahead at once; the main process only reads when asked).
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._samples(epoch)

    def _samples(self, epoch: int):
        slot, slots = _slot(self.rank, self.world)
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
