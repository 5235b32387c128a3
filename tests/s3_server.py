"""A real S3-compatible server for tests: ``moto_server`` on 127.0.0.1, spoken to exactly like AWS.

    with start_moto_server() as endpoint_url:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint_url, key="testing", secret="testing")

Nothing global is set: callers pass ``endpoint_url`` (and ``aws_env(endpoint_url)`` to subprocesses).

Outages: moto keeps its objects in memory, so a real restart would lose every bucket. The endpoint is
therefore a small TCP forwarder in front of the moto process: ``stop_server`` closes the listening port
and cuts every open connection (clients see "connection refused", as with a dead server) and
``restart_server`` opens the same port again with the data intact. ``stop_server(..., lose_data=True)``
kills moto itself.

Latency: ``start_moto_server(delay_s=S3_DELAY_S)`` makes that forwarder hold every chunk 20 ms each way, so
each S3 request pays a realistic round trip (>= 40 ms); ``direct_url(endpoint_url)`` is moto itself, without
the forwarder (for fast set-up uploads, or for clients that must not pay the delay).

Request counts, at the server (moto's request recorder, which sees every S3 request whatever the client)::

    with count_requests(endpoint_url) as log:
        ...                                  # reads through DALI, s3fs, boto
    log.requests()                           # [S3Request(method="GET", path="/bucket/key", range=...), ...]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from servers import ForwarderProcess, TcpForwarder
from servers import free_port as _free_port  # also imported by the storage and checkpoint tests

_SERVERS: dict[str, _Server] = {}  # endpoint_url -> server, so stop/restart can find it
S3_DELAY_S = 0.020  # each way: a small-object round trip to real S3 takes ~10-50 ms


def aws_env(endpoint_url: str, *, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    """Environment variables that point boto/s3fs in a child process at this server."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class _Server:
    def __init__(self, *, auth: bool, log_dir: Path | None, delay_s: float = 0.0) -> None:
        self.auth = auth
        self.log_dir = log_dir
        self.backend_port = _free_port()
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        # A delaying forwarder runs in its own process: DALI holds the GIL while it tears down a pipeline that
        # read S3, and waits for its requests (servers.ForwarderProcess).
        self.forwarder: TcpForwarder | ForwarderProcess = (
            ForwarderProcess("127.0.0.1", self.backend_port, port=self.port, delay_s=delay_s, name="s3-forwarder")
            if delay_s > 0
            else TcpForwarder("127.0.0.1", self.backend_port, port=self.port, name="s3-forwarder")
        )
        # moto's request recorder appends to this file (its default is ./moto_recording, in the caller's cwd).
        self._scratch = tempfile.mkdtemp(prefix="moto-recording-")
        self.recording = os.path.join(self._scratch, "requests.jsonl")

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def api(self, action: str) -> bytes:
        """Call moto's own API (``/moto-api/recorder/<action>``) directly, past the forwarder and its delay."""
        req = urllib.request.Request(f"{self.backend_url}/moto-api/recorder/{action}", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def start_moto(self) -> None:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        cmd = (
            [exe, "-H", "127.0.0.1", "-p", str(self.backend_port)]
            if exe
            else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.backend_port)]
        )
        env = dict(os.environ)
        if self.auth:
            # Every request is checked against IAM, which knows no keys: any credentials are "wrong".
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        env["MOTO_RECORDER_FILEPATH"] = self.recording
        env.pop("MOTO_ENABLE_RECORDING", None)  # recording starts only inside count_requests()
        out = open(self.log_dir / f"moto-{self.backend_port}.log", "wb") if self.log_dir else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode} at start-up: {cmd}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.backend_port}/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.stop_moto()
        raise RuntimeError(f"moto_server did not answer on port {self.backend_port} within 30 s")

    def stop_moto(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def start_moto_server(*, auth: bool = False, log_dir: str | Path | None = None, delay_s: float = 0.0) -> Iterator[str]:
    """Start moto_server on a free local port; yields its endpoint URL and stops it on exit.

    ``auth=True`` makes the server check credentials (none are valid), for wrong-credential tests.
    ``delay_s`` (e.g. ``S3_DELAY_S``) holds every chunk that long each way between the endpoint and moto.
    """
    server = _Server(auth=auth, log_dir=Path(log_dir) if log_dir else None, delay_s=delay_s)
    try:
        server.start_moto()
        server.forwarder.start()
        _SERVERS[server.endpoint_url] = server
        yield server.endpoint_url
    finally:
        _SERVERS.pop(server.endpoint_url, None)
        server.forwarder.stop()
        server.stop_moto()
        shutil.rmtree(server._scratch, ignore_errors=True)


def direct_url(endpoint_url: str) -> str:
    """moto itself, past the endpoint's forwarder (no delay, no outages)."""
    return _SERVERS[endpoint_url].backend_url


@dataclass(frozen=True)
class S3Request:
    method: str  # GET, HEAD, PUT, ...
    path: str  # /bucket/key, URL-decoded, without the query
    query: str
    range: str  # the Range header ("" when the whole object was asked for)


class RequestLog:
    """The S3 requests moto served since the enclosing ``count_requests`` began (moto's own API excluded)."""

    def __init__(self, server: _Server) -> None:
        self._server = server

    def requests(self) -> list[S3Request]:
        out = []
        for line in self._server.api("download-recording").decode().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            url = urllib.parse.urlsplit(entry["url"])
            headers = {k.lower(): v for k, v in (entry.get("headers") or {}).items()}
            out.append(S3Request(entry["method"], urllib.parse.unquote(url.path), url.query, headers.get("range", "")))
        return out

    def count(self, *, method: str = "", prefix: str = "") -> int:
        """Requests with this method (any when "") on paths starting with ``prefix`` (e.g. "/bucket/shards/")."""
        return sum(1 for r in self.requests() if (not method or r.method == method) and r.path.startswith(prefix))

    def reset(self) -> None:
        self._server.api("reset-recording")


@contextmanager
def count_requests(endpoint_url: str) -> Iterator[RequestLog]:
    """Record every request the server receives inside the block (counted by moto, so every client counts:
    DALI's own S3 client as much as s3fs). The log stays readable after the block."""
    server = _SERVERS[endpoint_url]
    server.api("reset-recording")
    server.api("start-recording")
    try:
        yield RequestLog(server)
    finally:
        server.api("stop-recording")


def stop_server(endpoint_url: str, *, lose_data: bool = False) -> None:
    """Take the endpoint down: new connections are refused and open ones are cut."""
    server = _SERVERS[endpoint_url]
    server.forwarder.stop()
    if lose_data:
        server.stop_moto()


def restart_server(endpoint_url: str) -> None:
    """Bring a stopped endpoint back on the same port (with its data unless it was stopped with lose_data)."""
    server = _SERVERS[endpoint_url]
    if server.proc is None:
        server.start_moto()
    if not server.forwarder.running:
        server.forwarder.start()


@contextmanager
def outage(endpoint_url: str) -> Iterator[None]:
    """The endpoint is down inside the block and back afterwards."""
    stop_server(endpoint_url)
    try:
        yield
    finally:
        restart_server(endpoint_url)
