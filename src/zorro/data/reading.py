"""Where a shard folder's files are (a local folder, a URL, a `pipe:` template) and how they are read: the
manifest, and the samples of a WebDataset tar as a stream (docs/data_format.md)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

from ..errors import ConfigError

log = logging.getLogger(__name__)

READ_TIMEOUT, READ_RETRIES = 60.0, 5  # data.read_timeout, data.read_retries
CHUNK = 1 << 20


class ManifestNotFound(ConfigError, FileNotFoundError):
    """data.root has no readable manifest.json (a one-line error from train.py / evaluate.py)."""


class ManifestError(ConfigError, ValueError):
    """data.root's manifest.json is truncated or not a data_prep manifest (a one-line error)."""


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


def first_line(e: BaseException) -> str:
    # webdataset appends (stream, url) to an exception's args, which would make str(e) a tuple
    text = e.args[0] if len(e.args) > 1 and isinstance(e.args[0], str) else str(e)
    return f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:300]}"


def read_manifest(root: str | Path, *, timeout: float = READ_TIMEOUT, retries: int = READ_RETRIES,
                  storage_options: dict | None = None) -> dict:
    """manifest.json of a shard folder; a one-line ManifestNotFound / ManifestError when it is missing,
    unreachable, truncated or not a data_prep manifest."""
    url = shard_url(root, "manifest.json")
    if not is_url(root):
        path = Path(url)
        if not path.exists():
            raise ManifestNotFound(f"no manifest.json in {root}: make shards with `python -m data_prep` first")
        text = path.read_bytes()
    else:  # read like the shards: bounded in time, retried (open_remote)
        try:
            with open_remote(url, timeout=timeout, retries=retries, storage_options=storage_options) as f:
                text = f.read()
        except Exception as e:
            raise ManifestNotFound(f"cannot read {url} ({first_line(e)}): is data.root a shard folder "
                                   f"written by `python -m data_prep`, and is it reachable?") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{url} is not valid JSON ({len(text)} bytes; {first_line(e)}): truncated or "
                            f"overwritten? Copy it again, or re-run `python -m data_prep` (it rewrites the "
                            f"manifest from its journal)") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ManifestError(f"{url}: not a data_prep manifest (format_version {version!r}, expected 1)")
    try:
        for name, split in manifest["splits"].items():
            for shard in split["shards"]:
                if not isinstance(shard["name"], str) or int(shard["num_samples"]) < 0:
                    raise ValueError(shard)
        if not isinstance(manifest["classes"], list) or "multi_label" not in manifest:
            raise ValueError("classes")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"{url}: incomplete data_prep manifest (bad or missing {first_line(e)}); "
                            f"re-run `python -m data_prep`") from None
    return manifest


# -- remote reads: bounded in time, retried ----------------------------------------------------------------
class ReadError(OSError):
    """A remote shard that could not be read within data.read_timeout and data.read_retries."""


def _retryable(e: BaseException, delivered: bool) -> bool:
    """Worth another try: a stall, a dropped or cut connection, a server error; not a missing file, a refused
    connection or an unknown host (a wrong data.root), nor a command that fails before printing anything."""
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        return e.code in (408, 425, 429) or e.code >= 500
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, ConnectionRefusedError, ValueError)):
        return False
    if isinstance(e, _CommandFailed):
        return delivered
    import socket

    return not isinstance(e, socket.gaierror)


class _CommandFailed(OSError):
    pass


class _HttpSource:
    """An HTTP(S) body from byte `offset` on (a Range request; re-read and skipped where the server ignores
    ranges). A body that ends before its Content-Length is an error (http.client returns b"" for it)."""

    def __init__(self, url: str, offset: int, timeout: float):
        import urllib.error
        import urllib.request

        headers = {"Range": f"bytes={offset}-", "User-Agent": "zorro"} if offset else {"User-Agent": "zorro"}
        try:
            self.resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"HTTP 404 for {url}") from None
            raise
        length = self.resp.headers.get("Content-Length")
        self.left = int(length) if length is not None else None
        if offset and self.resp.status != 206:
            _skip(self, offset)

    def read(self, n: int) -> bytes:
        data = self.resp.read1(n)  # what has arrived: a slow but moving body is not a stall
        if self.left is not None:
            self.left -= len(data)
            if not data and self.left > 0:
                raise ConnectionError(f"the connection closed {self.left} bytes before the end of the body "
                                      f"(Content-Length)")
        return data

    def close(self) -> None:
        self.resp.close()


class _PipeSource:
    """The stdout of a shell command (`pipe:CMD`, gsutil for gs://); its exit status is checked at the end."""

    def __init__(self, command: str, offset: int):
        import tempfile

        self.command, self.stderr = command, tempfile.TemporaryFile()  # a file: a chatty command never blocks
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr)
        _skip(self, offset)

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read1(n)  # what has arrived: a slow but moving command is not a stall
        if not data:
            status = self.proc.wait()
            if status:
                self.stderr.seek(0)
                err = self.stderr.read()[-2000:].decode(errors="replace").strip().splitlines()
                raise _CommandFailed(f"`{self.command}` exited with {status}" + (f": {err[-1]}" if err else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


def _skip(source, n: int) -> None:
    while n > 0:
        data = source.read(min(n, 1 << 20))
        if not data:
            raise ConnectionError(f"the resumed read ended before byte {n}")
        n -= len(data)


def _opener(url: str, timeout: float, storage_options: dict | None):
    """offset -> a source with read(n) / close() of `url` from that byte on."""
    scheme = urlparse(url).scheme
    if url.startswith("pipe:"):
        return lambda offset: _PipeSource(url[5:], offset)
    if scheme in ("http", "https"):
        return lambda offset: _HttpSource(url, offset, timeout)
    if scheme == "gs":  # as WebDataset reads gs://; gcs:// goes through gcsfs
        return lambda offset: _PipeSource(f"gsutil cat {shlex.quote(url)}", offset)

    def fsspec_source(offset: int):
        import fsspec

        f = fsspec.open(url, "rb", **(storage_options or {})).open()
        if offset:
            f.seek(offset)
        return f

    return fsspec_source


class _Fetch(threading.Thread):
    """One connection: reads chunks from byte `offset` into a small queue (the consumer's pace holds it back);
    an exception or b"" (the end) is the last item."""

    def __init__(self, opener, offset: int):
        super().__init__(daemon=True)
        self.opener, self.offset = opener, offset
        self.items: queue.Queue = queue.Queue(maxsize=4)
        self.stopped, self.source = threading.Event(), None
        self.start()

    def run(self) -> None:
        try:
            self.source = self.opener(self.offset)
            while not self.stopped.is_set():
                data = self.source.read(CHUNK)
                self._put(data)
                if not data:
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which decides
            self._put(e)
        finally:
            self.cancel()

    def _put(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def cancel(self) -> None:
        """Stop, and release the connection (a stalled one too: a killed command, a closed socket)."""
        self.stopped.set()
        source, self.source = self.source, None
        if source is not None:
            try:
                source.close()
            except Exception:  # a connection that failed already
                pass


class RemoteReader(io.RawIOBase):
    """A remote file, read as it arrives. Every wait for data is bounded by `timeout` seconds (a stalled server
    or command is given up, not waited on forever); a failed, stalled or cut connection is reopened at the byte
    it stopped at, `retries` times (backoff 1, 2, 4 ... s), then the read fails with one line naming the URL."""

    def __init__(self, url: str, *, timeout: float = READ_TIMEOUT, retries: int = READ_RETRIES,
                 storage_options: dict | None = None):
        super().__init__()
        self.url, self.timeout, self.retries = url, timeout, retries
        self._opener = _opener(url, timeout, storage_options)
        self.received, self.tries, self._buf, self._eof = 0, 0, b"", False
        self._delivered = False  # this connection gave bytes (a command failing later is worth a retry)
        self._fetch = _Fetch(self._opener, 0)

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._buf and not self._eof:
            try:
                item = self._fetch.items.get(timeout=self.timeout)
            except queue.Empty:
                item = TimeoutError(f"no data for {self.timeout:g} s")
            if isinstance(item, bytes):
                self._buf, self._eof = item, not item
                self.received += len(item)
                self._delivered = self._delivered or bool(item)
                continue
            self._fetch.cancel()
            if not _retryable(item, self._delivered):
                raise item
            if self.tries >= self.retries:
                tries = f" after {self.tries} retries" if self.tries else ""
                raise ReadError(f"{self.url}: {first_line(item)} at byte {self.received}{tries} "
                                f"(data.read_timeout={self.timeout:g}, data.read_retries={self.retries})") from None
            self.tries += 1
            wait = min(2.0 ** (self.tries - 1), 30.0)
            log.warning("%s: %s at byte %d; retry %d of %d in %g s", self.url, first_line(item), self.received,
                        self.tries, self.retries, wait)
            time.sleep(wait)
            self._delivered = False
            self._fetch = _Fetch(self._opener, self.received)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        out = []
        while n > 0:
            self._fill()
            if not self._buf:
                break
            out.append(self._buf[:n])
            self._buf = self._buf[n:]
            n -= len(out[-1])
        return b"".join(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._fetch.cancel()
        super().close()


def open_remote(url: str, *, timeout: float = READ_TIMEOUT, retries: int = READ_RETRIES,
                storage_options: dict | None = None) -> RemoteReader:
    return RemoteReader(url, timeout=timeout, retries=retries, storage_options=storage_options)


class ShardMismatch(ValueError):
    """A shard whose bytes differ from what the manifest recorded (size, sha256 or sample count)."""


def cache_name(url: str) -> str:
    """Shard names repeat across datasets (train-000000.tar): prefixed by a hash of the URL."""
    return hashlib.sha1(url.encode()).hexdigest()[:12] + "-" + url.rstrip("/").rsplit("/", 1)[-1][-100:]


def cached_copy(url: str, cache_dir: str, *, size: int | None = None, sha256: str | None = None,
                count: int | None = None, **remote) -> Path:
    """A local copy of remote shard `url` in `cache_dir`, fetched on first use. A copy is written under a
    temporary name, checked against the manifest (size and sha256 where recorded, else the sample count) and
    only then renamed into place: a truncated or corrupt download is never cached (ShardMismatch)."""
    dest = Path(cache_dir) / cache_name(url)
    if dest.exists() and (size is None or dest.stat().st_size == size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        digest, got = hashlib.sha256(), 0
        with open_remote(url, **remote) as src, open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
        if size is not None and got != size:
            raise ShardMismatch(f"{url}: {got} bytes, the manifest records {size}; not cached")
        if sha256 and digest.hexdigest() != sha256:
            raise ShardMismatch(f"{url}: its sha256 differs from the manifest's; not cached")
        if not sha256 and count is not None:  # an older manifest: the sample count is what it knows
            with open(tmp, "rb") as f:
                found = sum(1 for _ in stream_samples(f, url))
            if found != count:
                raise ShardMismatch(f"{url}: {found} samples, the manifest lists {count}; not cached")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def open_shard(url: str, cache_dir: str | None = None, *, size: int | None = None, sha256: str | None = None,
               count: int | None = None, timeout: float = READ_TIMEOUT, retries: int = READ_RETRIES,
               storage_options: dict | None = None):
    """A binary stream of one shard, read as it arrives: local files directly; http(s) (Range requests),
    `pipe:` commands, gs:// (gsutil) and any fsspec URL (s3://, gcs://, az://: fsspec with `storage_options`)
    through RemoteReader, every read bounded by `timeout` and retried `retries` times. With `cache_dir`, a
    remote shard is copied there on first use, verified before it is kept (cached_copy), and later epochs
    read the copy."""
    scheme = urlparse(url).scheme
    if not url.startswith("pipe:") and scheme in ("", "file"):
        return open(url.removeprefix("file://"), "rb")
    remote = dict(timeout=timeout, retries=retries, storage_options=storage_options)
    if cache_dir:
        return open(cached_copy(url, cache_dir, size=size, sha256=sha256, count=count, **remote), "rb")
    return open_remote(url, **remote)


class Counted:
    """A stream that counts the bytes read through it (a shard's size, checked against the manifest)."""

    def __init__(self, stream):
        self.stream, self.bytes = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.bytes += len(data)
        return data

    def drain(self) -> int:
        """Read to the end (the tar's zero blocks and padding after its last member); the total size."""
        while self.read(1 << 16):
            pass
        return self.bytes


def tar_samples(urls: Iterable[str]) -> Iterator[dict]:
    """The samples of WebDataset tars, as webdataset's tarfile_samples gives them ({"__key__", "__url__",
    extension: bytes}), opened like the training stream (open_shard), read ~5x faster: Python's tarfile in
    stream mode costs ~40 us per member, ~2 ms of a worker's CPU per clip of 60 frames, more than everything
    else a worker does when the frames decode on the device. ustar, GNU long names and pax headers."""
    for url in urls:
        with open_shard(url) as stream:
            yield from stream_samples(stream, url)


def stream_samples(stream, url: str) -> Iterator[dict]:
    from webdataset.tariterators import base_plus_ext

    sample, long_name, pax, members = None, None, {}, 0
    while True:
        header = stream.read(512)
        if not header:  # tar writers end with zero blocks: a stream that stops before them was cut off, and
            # its last sample may lack members (a cut at a member boundary) -- never passed on
            raise ValueError(f"{url}: empty file (0 bytes)" if not members else
                             f"{url}: truncated tar (it ends after {members} members, without the end-of-archive "
                             f"blocks)")
        if header.count(0) == 512:
            break  # end of archive
        members += 1
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
