"""Loopback servers for remote shards: an HTTP file server (range requests on or off, and faults on
demand: a missing file, a connection dropped at a byte, a stall) and an S3-compatible server (moto).
Used by the streaming benchmark and by tests/test_remote.py. They bind 127.0.0.1 on a free port
and are ready when the context manager yields (the socket is listening).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    """What the server does wrong, by file name (the last part of the path)."""

    missing: set[str] = field(default_factory=set)  # answered 404
    drop: dict[str, int] = field(default_factory=dict)  # connection closed once this byte offset is reached
    drop_times: int = 1  # how many responses per file are cut (-1: all)
    stall: dict[str, tuple[int, float]] = field(default_factory=dict)  # (byte offset, seconds) of silence


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler never holds up shutdown

    def __init__(self, root: Path, ranges: bool, faults: Faults) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.ranges, self.faults = root, ranges, faults
        self.requests: Counter[str] = Counter()  # path -> GETs
        self.range_requests: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up (a timeout, a finished worker) is no server error


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: without this, Nagle's algorithm and the client's
        # delayed ACK hold every small response ~40 ms, as no real server does.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv, f = self.server, self.server.faults
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        name = rel.rsplit("/", 1)[-1]
        path = srv.root / rel
        rng = self.headers.get("Range") if srv.ranges else None
        with srv.lock:
            srv.requests[rel] += 1
            srv.range_requests[rel] += rng is not None
        if name in f.missing or ".." in rel.split("/") or not path.is_file():
            self._reply(404, {})
            return
        data = path.read_bytes()
        lo, hi, status = 0, len(data), 200
        if rng:
            m = _RANGE.match(rng.strip())
            if m is None or int(m[1]) >= len(data):
                self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            lo, hi, status = int(m[1]), min(int(m[2]) + 1 if m[2] else len(data), len(data)), 206
        self.send_response(status)
        self.send_header("Content-Length", str(hi - lo))
        if srv.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
        self.end_headers()
        cut = f.drop.get(name)
        with srv.lock:
            if cut is not None and lo < cut < hi and (f.drop_times < 0 or srv.dropped[name] < f.drop_times):
                srv.dropped[name] += 1
            else:
                cut = None
        stall = f.stall.get(name)
        pos = lo
        try:
            while pos < hi:
                end = min(hi, pos + (1 << 16))
                if cut is not None and pos < cut <= end:
                    end = cut
                if stall is not None and pos <= stall[0] < end:
                    self.wfile.write(data[pos: stall[0]])
                    self.wfile.flush()
                    srv.closing.wait(stall[1])
                    pos = stall[0]
                    stall = None
                    continue
                self.wfile.write(data[pos:end])
                pos = end
                if cut is not None and pos == cut:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@contextlib.contextmanager
def http_server(root: str | Path, ranges: bool = True, faults: Faults | None = None) -> Iterator[_Server]:
    """Serve `root` at server.url (http://127.0.0.1:PORT/<path under root>) until the block ends."""
    srv = _Server(Path(root), ranges, faults or Faults())
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.closing.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@dataclass
class S3:
    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict:
        """What data.storage_options needs for this server (moto takes any credentials)."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}


@contextlib.contextmanager
def s3_server(upload: dict[str, str | Path] | None = None, bucket: str = "shards") -> Iterator[S3]:
    """moto's S3-compatible server on 127.0.0.1 with one bucket; `upload` maps a key prefix to a local
    folder whose files are copied under it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3(f"http://{host}:{port}", bucket)
    try:
        import boto3  # moto's own dependency

        client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        for prefix, folder in (upload or {}).items():
            for p in sorted(Path(folder).rglob("*")):
                if p.is_file():
                    client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")
        yield s3
    finally:
        server.stop()


def wait_for(cond, timeout: float = 30.0, every: float = 0.02) -> None:
    """Poll `cond` until it holds (readiness, not a fixed sleep)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"condition not met in {timeout} s")
        time.sleep(every)


@contextlib.contextmanager
def in_process(kind: str, *args: str) -> Iterator[str]:
    """One of these servers in a process of its own (so that measuring a client in this process does
    not share its interpreter lock with the server), yielding its URL once it listens."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.servers", kind, *args], cwd=Path(__file__).parents[1],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()  # the server's first line: its URL, once listening
        if not line.startswith("http://"):
            raise RuntimeError(f"{kind} server did not start (rc {proc.poll()}): {line!r}")
        yield line
    finally:
        proc.stdin.close()  # the server exits when its input closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(argv: list[str]) -> int:
    """python -m benchmarks.servers http ROOT [--no-ranges] | s3 PREFIX=FOLDER ...: print the URL,
    serve until standard input closes."""
    import sys

    kind, rest = argv[0], argv[1:]
    if kind == "http":
        ctx = http_server(rest[0], ranges="--no-ranges" not in rest)
        with ctx as srv:
            print(srv.url, flush=True)
            sys.stdin.read()
    else:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would flood the output
        with s3_server(dict(a.split("=", 1) for a in rest)) as s3:
            print(s3.endpoint, flush=True)
            sys.stdin.read()
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_serve(sys.argv[1:]))
