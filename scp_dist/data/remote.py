"""Shards that are not (only) a local folder: http(s)://, s3:// (fsspec/s3fs), webdataset brace sets
and `pipe:` commands, i.e. everything `data.root` may name besides a directory (docs/DESIGN.md,
"Shards from anywhere").

What it does, one job per part:
- where a split is and which shards it has (`split_location`, `open_split`), with the manifest and
  the shards' counts when they can be had (manifest.json beside the shards, else the .idx headers);
- small files whole and byte ranges (`fetch`, `read_range`): what random access needs;
- a shard as a byte stream (`open_stream`) that resumes a dropped HTTP connection at the byte it
  lost (a Range request where the server takes them, else from the start, skipping what was read),
  gives up after `retries` with an OSError naming the shard, and never waits longer than
  `timeout_s` for a byte;
- a bounded local cache of whole shards (`ShardCache`), safe for several ranks on one node.

HTTP goes through the standard library's http.client, not fsspec's HTTP file system: explicit
timeouts on every read, one kept-alive connection per process and host for range reads, and no
event-loop thread that DataLoader workers would inherit across their fork.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from scp_dist.shards.format import INDEX_VERSION
from scp_dist.shards.manifest import MANIFEST_NAME, Manifest, ShardError, order_problem, parse_manifest

log = logging.getLogger("scp_dist")

KINDS = ("local", "http", "s3", "pipe")
_DRAIN_ON_CLOSE = 1 << 20  # a cached shard closed this close to its end is read to the end and kept
_STALE_PART_S = 3600.0  # a cache temporary untouched this long was left by a killed writer
_warned: set[str] = set()


def kind_of(location: str) -> str:
    """local | http | s3 | pipe."""
    if location.startswith("pipe:"):
        return "pipe"
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    if scheme in ("http", "https"):
        return "http"
    if scheme == "s3":
        return "s3"
    return "local"


def is_shard_set(root: str) -> bool:
    """A root that names shards, not a data set folder: a brace set, one .tar, or a pipe: command."""
    return root.startswith("pipe:") or ("{" in root and "}" in root) or root.rstrip("/").endswith(".tar")


def is_remote(root: str) -> bool:
    """A root the local loader cannot read by path."""
    return kind_of(root) != "local" or is_shard_set(root)


def split_location(root: str, split: str) -> str:
    """Where a split is: `root/split` for a folder or a URL prefix; a shard set names the training
    split's shards itself (config.validate refuses a test split beside one)."""
    if is_shard_set(root):
        return root
    if kind_of(root) == "local":
        return str(Path(root) / split)
    return f"{root.rstrip('/')}/{split}"


def root_name(root: str) -> str:
    """A data set's default name (data.name) from its root: the folder or URL's last part."""
    if kind_of(root) == "local" and not is_shard_set(root):
        return Path(root).resolve().name
    part = root
    if root.startswith("pipe:"):
        tars = [a for a in root[5:].split() if a.endswith(".tar")]
        part = tars[-1] if tars else ""
    parts = [p for p in part.split("://", 1)[-1].rstrip("/").split("/") if p]
    if parts and is_shard_set(parts[-1]) and len(parts) > 1:
        parts = parts[:-1]  # .../name/shard-{0..9}.tar -> name
    return parts[-1] if parts else ""


@dataclass
class RemoteOptions:
    """How remote shards are read (config: data.timeout_s, data.retries, data.storage_options,
    data.cache_dir, data.cache_max_gb)."""

    timeout_s: float = 60.0
    retries: int = 3
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = ""
    cache_max_bytes: int = 0  # 0: no bound

    @classmethod
    def from_config(cls, data_cfg: Any) -> RemoteOptions:
        from omegaconf import OmegaConf

        so = data_cfg.get("storage_options", None)
        so = OmegaConf.to_container(so, resolve=True) if so is not None and not isinstance(so, dict) else so
        return cls(float(data_cfg.get("timeout_s", 60.0)), int(data_cfg.get("retries", 3)), dict(so or {}),
                   str(data_cfg.get("cache_dir", "") or ""), int(float(data_cfg.get("cache_max_gb", 0)) * 2**30))


# --- HTTP ------------------------------------------------------------------------------------------


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return cls(u.hostname, u.port, timeout=timeout), path


_pool: dict[tuple[int, int, str], http.client.HTTPConnection] = {}  # (pid, thread, netloc) -> connection


def _pooled_get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One GET on this process and thread's kept-alive connection to the host, read whole. A
    connection the server closed since its last use gets one fresh try."""
    netloc = urlsplit(url).netloc
    key = (os.getpid(), threading.get_ident(), netloc)
    u = urlsplit(url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    for attempt in (0, 1):
        conn = _pool.get(key)
        if conn is None:
            conn, _ = _connection(url, timeout)
            _pool[key] = conn
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            body = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body
        except (http.client.HTTPException, OSError):
            conn.close()
            _pool.pop(key, None)
            if attempt:
                raise
    raise AssertionError("unreachable")


def _http_error(url: str, status: int, what: str = "") -> OSError:
    if status == 404:
        return FileNotFoundError(2, f"not found (HTTP 404){what}", url)
    return OSError(f"{url}: HTTP {status}{what}")


class HTTPStream:
    """A GET as a read-only stream that resumes where a dropped connection stopped (module doc)."""

    def __init__(self, url: str, timeout: float, retries: int) -> None:
        self.url, self.timeout, self.retries = url, timeout, retries
        self.pos, self.length, self.resumed = 0, None, 0
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._open(0)

    def _open(self, start: int) -> None:
        self._close_conn()
        conn, path = _connection(self.url, self.timeout)
        self._conn = conn
        conn.request("GET", path, headers={"Range": f"bytes={start}-"} if start else {})
        r = conn.getresponse()
        if r.status not in (200, 206) or (r.status == 206 and not start):
            r.read(0)
            raise _http_error(self.url, r.status)
        self._resp = r
        n = r.getheader("Content-Length")
        if r.status == 200:
            self.length = int(n) if n is not None else None
            if start:  # the server ignores ranges: read again from the start up to where we were
                left = start
                while left:
                    chunk = r.read(min(left, 1 << 20))
                    if not chunk:
                        raise ConnectionError(f"connection closed at byte {start - left} while skipping to {start}")
                    left -= len(chunk)
        elif n is not None:
            self.length = start + int(n)

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data = self._resp.read(n if n is not None and n >= 0 else None)
            except (http.client.HTTPException, OSError) as e:
                err: BaseException = e
            else:
                self.pos += len(data)
                if data or n == 0 or self.length is None or self.pos >= self.length:
                    return data
                err = ConnectionError(f"connection closed at byte {self.pos} of {self.length}")
            self._resume(err)

    def _resume(self, err: BaseException) -> None:
        while True:
            if self.resumed >= self.retries:
                raise OSError(f"{self.url}: {type(err).__name__}: {err} (after {self.resumed} retries)") from err
            self.resumed += 1
            log.debug("%s: %s; retry %d from byte %d", self.url, err, self.resumed, self.pos)
            try:
                self._open(self.pos)
                return
            except FileNotFoundError:
                raise
            except (http.client.HTTPException, OSError) as e:
                err = e

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None

    def close(self) -> None:
        self._close_conn()

    def __enter__(self) -> HTTPStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- pipe: ---------------------------------------------------------------------------------------


class PipeStream:
    """stdout of a shell command (an object-store client writing the shard), webdataset's `pipe:`.
    A read waits at most `timeout` s for a byte; a non-zero exit at the end is an OSError with the
    command's last error line."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command, self.timeout = command, timeout
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close(); a pipe could fill and block
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._err,
                                     start_new_session=True)
        self._fd = self.proc.stdout.fileno()

    def read(self, n: int = -1) -> bytes:
        if not select.select([self._fd], [], [], self.timeout)[0]:
            self.close()
            raise TimeoutError(f"pipe:{self.command}: no output for {self.timeout:g} s (data.timeout_s)")
        data = os.read(self._fd, n if n and n > 0 else 1 << 20)
        if not data:
            rc = self.proc.wait(timeout=self.timeout)
            if rc != 0:
                self._err.seek(0)
                lines = self._err.read().decode(errors="replace").strip().splitlines()
                raise OSError(f"pipe:{self.command}: exit status {rc}" + (f": {lines[-1]}" if lines else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc.stdout.close()
        self._err.close()

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- S3 (fsspec/s3fs) ----------------------------------------------------------------------------

_filesystems: dict[tuple[int, str], Any] = {}


def s3_filesystem(opts: RemoteOptions) -> Any:
    """An s3fs file system for this process (never one inherited across a fork). The endpoint comes
    from data.storage_options (endpoint_url, key, secret, ...) or botocore's usual sources
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws); timeouts and retries from data.timeout_s/retries."""
    key = (os.getpid(), repr(sorted(opts.storage_options.items())) + f"{opts.timeout_s}/{opts.retries}"
           + os.environ.get("AWS_ENDPOINT_URL", ""))
    fs = _filesystems.get(key)
    if fs is None:
        try:
            import fsspec
        except ImportError as e:
            raise ShardError("s3:// roots need fsspec and s3fs: pip install 'scp_dist[remote]'") from e
        so = dict(opts.storage_options)
        ck = {"connect_timeout": opts.timeout_s, "read_timeout": opts.timeout_s,
              "retries": {"max_attempts": opts.retries + 1}, **so.pop("config_kwargs", {})}
        if "endpoint_url" not in so and os.environ.get("AWS_ENDPOINT_URL"):
            so["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        fs = _filesystems[key] = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs=ck, **so)
    return fs


def _s3_path(url: str) -> str:
    return url.split("://", 1)[1]


# --- whole files, ranges, streams ----------------------------------------------------------------


def fetch(url: str, opts: RemoteOptions) -> bytes | None:
    """A small file whole (manifest, index), or None when it does not exist."""
    kind = kind_of(url)
    try:
        if kind == "local":
            return Path(url).read_bytes()
        if kind == "s3":
            return s3_filesystem(opts).cat_file(_s3_path(url))
        if kind == "http":
            status, body = _get_retrying(url, {}, opts)
            if status == 200:
                return body
            raise _http_error(url, status)
    except FileNotFoundError:
        return None
    raise ShardError(f"{url}: cannot fetch a {kind} location")


def _get_retrying(url: str, headers: dict[str, str], opts: RemoteOptions) -> tuple[int, bytes]:
    """_pooled_get, retried up to opts.retries times on a failed connection; the last failure raises."""
    for attempt in range(opts.retries + 1):
        try:
            status, _, body = _pooled_get(url, headers, opts.timeout_s)
            return status, body
        except (http.client.HTTPException, OSError):
            if attempt == opts.retries:
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


def read_range(url: str, offset: int, size: int, opts: RemoteOptions) -> bytes:
    """Bytes [offset, offset + size) of a remote file: one Range request (HTTP), cat_file (S3)."""
    if size <= 0:
        return b""
    kind = kind_of(url)
    if kind == "s3":
        return s3_filesystem(opts).cat_file(_s3_path(url), start=offset, end=offset + size)
    if kind != "http":
        with open(url, "rb") as f:
            f.seek(offset)
            return f.read(size)
    headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
    status, body = _get_retrying(url, headers, opts)
    if status == 206:
        return body
    if status == 200:  # the server sent the whole file: correct, but an epoch costs N downloads
        if url not in _warned:
            _warned.add(url)
            log.warning("%s: the server ignores Range requests; random access reads whole shards "
                        "(use data.access=stream)", url)
        return body[offset: offset + size]
    if status == 416:
        raise EOFError(f"{url}: no bytes at {offset} (HTTP 416)")
    raise _http_error(url, status, f" for bytes {offset}-{offset + size - 1}")


def supports_ranges(url: str, opts: RemoteOptions) -> bool:
    """Whether the server answers a Range request with 206 (local and S3 always do)."""
    if kind_of(url) != "http":
        return kind_of(url) in ("local", "s3")
    try:
        status, _, _ = _pooled_get(url, {"Range": "bytes=0-0"}, opts.timeout_s)
    except (http.client.HTTPException, OSError):
        return False
    return status == 206


def open_stream(url: str, opts: RemoteOptions) -> BinaryIO:
    """A shard as a byte stream (module doc); FileNotFoundError when it does not exist."""
    kind = kind_of(url)
    if kind == "pipe":
        return PipeStream(url[5:], opts.timeout_s)  # type: ignore[return-value]
    if kind == "http":
        return HTTPStream(url, opts.timeout_s, opts.retries)  # type: ignore[return-value]
    if kind == "s3":
        return s3_filesystem(opts).open(_s3_path(url), "rb", block_size=8 << 20, cache_type="readahead")
    return open(url.removeprefix("file://"), "rb")  # noqa: SIM115 - the caller closes it


# --- the local cache -------------------------------------------------------------------------------


class ShardCache:
    """Whole shards kept under `root` as they are streamed, so a later epoch reads them from disk.

    A shard is written to a temporary name while it streams and renamed into place only once read
    to its end (os.replace: atomic), so ranks of one node sharing the folder never see half a shard;
    two ranks fetching the same shard at once both write it and the second rename wins with the same
    bytes. Each hit refreshes the file's mtime; after each new file the least recently used files
    are removed until the folder holds at most `max_bytes` (a rank reading a removed file keeps
    its open handle)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = 0) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, url: str) -> Path:
        name = _name_of(url) or "shard"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
        return self.root / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}-{safe}"

    def open(self, url: str, opener: Callable[[], BinaryIO]) -> BinaryIO:
        p = self.path(url)
        try:
            f = open(p, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            return _TeeToCache(opener(), p, self)  # type: ignore[return-value]
        with contextlib.suppress(OSError):  # evicted between open and utime: the handle still reads
            os.utime(p)
        return f

    def evict(self) -> None:
        files = []
        now = time.time()
        for p in self.root.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.name.startswith("."):  # a writer's temporary: removed once untouched for an hour (a killed writer)
                if p.name.endswith(".part") and now - st.st_mtime > _STALE_PART_S:
                    p.unlink(missing_ok=True)
                continue
            files.append((st.st_mtime, st.st_size, p))
        if not self.max_bytes:
            return
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


class _TeeToCache:
    """Reads from `src` and writes what it read to a temporary file, renamed to `dest` at the end."""

    def __init__(self, src: BinaryIO, dest: Path, cache: ShardCache) -> None:
        self.src, self.dest, self.cache = src, dest, cache
        fd, self.tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        self.out = os.fdopen(fd, "wb")
        self.done = False

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.src.read(n)
        except BaseException:
            self._discard()
            raise
        if data:
            self.out.write(data)
        elif n != 0:
            self._finish()
        return data

    def _finish(self) -> None:
        if self.done or self.out.closed:
            return
        self.out.close()
        os.replace(self.tmp, self.dest)
        self.done = True
        self.cache.evict()

    def _discard(self) -> None:
        if not self.out.closed:
            self.out.close()
        Path(self.tmp).unlink(missing_ok=True)

    def close(self) -> None:
        # A tar reader stops at the end-of-archive blocks, before the file's padding: read what is
        # left when it is little, so that a shard read to its last sample is kept.
        try:
            left = _DRAIN_ON_CLOSE
            while not self.done and not self.out.closed and left > 0:
                data = self.src.read(min(left, 1 << 16))
                if not data:
                    self._finish()
                    break
                self.out.write(data)
                left -= len(data)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            if not self.done:
                self._discard()
            self.src.close()

    def __enter__(self) -> _TeeToCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardOpener:
    """url -> stream, through the cache when data.cache_dir is set (local files are never cached).
    A picklable object, not a closure: DataLoader workers may be spawned, not forked."""

    def __init__(self, opts: RemoteOptions) -> None:
        self.opts = opts
        self.cache = ShardCache(opts.cache_dir, opts.cache_max_bytes) if opts.cache_dir else None

    def __call__(self, url: str) -> BinaryIO:
        if self.cache is None or kind_of(url) == "local":
            return open_stream(url, self.opts)
        return self.cache.open(url, lambda: open_stream(url, self.opts))


def shard_opener(opts: RemoteOptions) -> ShardOpener:
    return ShardOpener(opts)


# --- a split's shards -----------------------------------------------------------------------------


@dataclass
class SplitSource:
    """A split's shards in canonical order and what is known about them."""

    where: str
    urls: list[str]  # one per shard (pipe: the command)
    names: list[str]  # file names, for keys and messages
    manifest: Manifest | None
    counts: list[int] | None  # samples per shard: the manifest's, else the .idx headers', else None

    @property
    def kind(self) -> str:
        return kind_of(self.urls[0]) if self.urls else kind_of(self.where)

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def _expand(spec: str) -> list[str]:
    from braceexpand import braceexpand  # a webdataset dependency

    return list(braceexpand(spec))


def _name_of(url: str) -> str:
    """A shard's file name; for a pipe: command, its last argument that names a .tar (`aws s3 cp
    s3://b/shard-000001.tar -` -> shard-000001.tar)."""
    if url.startswith("pipe:"):
        tars = [a for a in url[5:].split() if a.endswith(".tar")]
        return tars[-1].rsplit("/", 1)[-1] if tars else url[5:].strip()
    return url.rstrip("/").rsplit("/", 1)[-1]


def _unique(names: list[str], urls: list[str]) -> list[str]:
    # names key the checkpoint's record of used samples: they must tell shards apart
    return names if len(set(names)) == len(names) else list(urls)


def fetch_manifest(where: str, opts: RemoteOptions) -> Manifest | None:
    """The split's manifest.json (None when there is none), from a folder or a URL prefix."""
    url = f"{where.rstrip('/')}/{MANIFEST_NAME}" if kind_of(where) != "local" else str(Path(where) / MANIFEST_NAME)
    text = fetch(url, opts)
    if text is None:
        return None
    local = kind_of(where) == "local"
    m = parse_manifest(text.decode(), url, root=Path(where) if local else None, url=None if local else where)
    why = order_problem(m)
    if why is not None and url not in _warned:
        _warned.add(url)
        log.warning("%s: the shards look class-sorted: %s. Streaming reads shards in order, so batches "
                    "would hold few classes: re-convert with `python -m scp_dist.shards`, or use random "
                    "access (data.access=random, over HTTP with range requests and .idx files).", where, why)
    return m


def index_counts(urls: list[str], opts: RemoteOptions) -> list[int] | None:
    """Each shard's sample count from the header of the .idx beside it (a few bytes each, fetched in
    parallel), or None as soon as one is missing or unreadable."""
    def count(url: str) -> int | None:
        idx = url[: -len(".tar")] + ".idx" if url.endswith(".tar") else None
        if idx is None:
            return None
        try:
            head = read_range(idx, 0, 64, opts) if kind_of(idx) != "local" else Path(idx).read_bytes()[:64]
        except (OSError, EOFError, http.client.HTTPException):
            return None
        first = head.split(b"\n", 1)[0].decode(errors="replace").split()
        return int(first[1]) if len(first) == 2 and first[0] == INDEX_VERSION and first[1].isdigit() else None

    if not urls or any(kind_of(u) == "pipe" for u in urls):
        return None
    with ThreadPoolExecutor(min(16, len(urls))) as pool:
        counts = list(pool.map(count, urls))
    return None if any(c is None for c in counts) else [int(c) for c in counts]  # type: ignore[arg-type]


def _list_folder(where: str, opts: RemoteOptions) -> list[str]:
    kind = kind_of(where)
    if kind == "local":
        return sorted(str(p) for p in Path(where).glob("*.tar"))
    if kind == "s3":
        return sorted(f"s3://{p}" for p in s3_filesystem(opts).glob(f"{_s3_path(where).rstrip('/')}/*.tar"))
    raise ShardError(f"{where}: no {MANIFEST_NAME} there, and an HTTP server cannot list a folder: name the shards "
                     "as a brace set, e.g. data.root=https://host/path/shard-{000000..000099}.tar")


def open_split(where: str, opts: RemoteOptions) -> SplitSource:
    """The split at `where` (split_location): its shards, and its manifest or counts when there are.

    A folder or URL prefix lists its shards from its manifest, else (local, S3) from a listing; a
    brace set or a single .tar names them, and a manifest beside them is used when it lists them
    all; a pipe: command has no manifest. Without a manifest the .idx headers give the counts when
    every shard has one."""
    if where.startswith("pipe:"):
        urls = _expand(where)
        return SplitSource(where, urls, _unique([_name_of(u) for u in urls], urls), None, None)
    if is_shard_set(where):
        urls = _expand(where)
        folder = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
        manifest = fetch_manifest(folder, opts)
        names = _unique([_name_of(u) for u in urls], urls)
        if manifest is not None:
            by_name = {s.name: s for s in manifest.shards}
            if all(n in by_name for n in names):
                counts = [by_name[n].num_samples for n in names]
                if len(names) < len(manifest.shards):  # a subset of the split: its own manifest
                    manifest.shards = [by_name[n] for n in names]
                    manifest.num_samples = sum(counts)
                return SplitSource(where, urls, names, manifest, counts)
            log.warning("%s/%s does not list every shard of %s: it is ignored", folder, MANIFEST_NAME, where)
        return SplitSource(where, urls, names, None, index_counts(urls, opts))
    manifest = fetch_manifest(where, opts)
    if manifest is not None:
        urls = manifest.shard_urls()
        return SplitSource(where, urls, [s.name for s in manifest.shards], manifest,
                           [s.num_samples for s in manifest.shards])
    urls = _list_folder(where, opts)
    if not urls:
        raise ShardError(f"{where}: no {MANIFEST_NAME} and no .tar shards there")
    return SplitSource(where, urls, _unique([_name_of(u) for u in urls], urls), None, index_counts(urls, opts))


def manifest_digest(where: str, opts: RemoteOptions | None = None) -> str | None:
    """A short hash of a split's manifest (the data's identity whatever path or URL reaches it);
    None without one. For a shard set, the hash of its shard names instead."""
    opts = opts or RemoteOptions()
    if is_shard_set(where):
        try:
            src = open_split(where, opts)
        except (ShardError, OSError):
            return None
        body = (src.manifest.to_json() if src.manifest is not None else src.names)
        return hashlib.sha256(repr(body).encode()).hexdigest()[:16]
    url = f"{where.rstrip('/')}/{MANIFEST_NAME}" if kind_of(where) != "local" else str(Path(where) / MANIFEST_NAME)
    try:
        text = fetch(url, opts)
    except (OSError, http.client.HTTPException, ShardError):
        return None
    return hashlib.sha256(text).hexdigest()[:16] if text is not None else None
