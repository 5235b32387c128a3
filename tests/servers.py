"""Networking pieces shared by the test servers (s3_server, mlflow_server, cluster/slurm_cluster).

port = free_port()
fwd = TcpForwarder("127.0.0.1", backend_port, port=port); fwd.start()   # clients use ``port``
fwd.stop()                        # new connections refused, open ones cut (an outage)
fwd.start()                       # the same port again
slow = TcpForwarder("127.0.0.1", backend_port, delay_s=0.020)   # every chunk held 20 ms each way

The delay stands in for network latency: this machine's kernel has no ``netem`` queueing discipline, so
``tc qdisc ... netem delay`` is not available; a forwarder that holds each chunk is the next best thing.

``ForwarderProcess`` is the same forwarder in a child process (same start/stop/port). Use it when the
process that talks through the forwarder may block in native code holding the GIL: a DALI pipeline that
read S3 holds it while it is destroyed and waits for its open requests, which an in-process forwarder can
then never answer (each teardown took ~10 s, until the SDK's timeout).
"""

from __future__ import annotations

import argparse
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Forwarder:
    """What both forwarders share: where they listen, where they forward to, and the delay each way."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        delay_s: float = 0.0,
        name: str = "tcp-forwarder",
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        self.target = (target_host, target_port)
        self.listen_host, self.port = listen_host, port
        self.delay_s = delay_s
        self.name = name

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"


class TcpForwarder(_Forwarder):
    """Accepts on ``listen_host:port`` and pipes every connection to ``target_host:target_port``.

    ``port=0`` takes a free port at the first ``start()``; later starts listen on that same port again.
    ``stop()`` closes the listener and cuts every open connection at once. ``connect_timeout`` bounds the
    connection to the target (None: the socket default).

    ``delay_s`` > 0 holds every forwarded chunk for that long in each direction (a request and its answer
    pay ``2 * delay_s`` at least, like a network round trip). Each direction of each connection has its own
    reader and sender threads, so the delay is latency, not a bandwidth cap: chunks keep their order, a
    stream of them arrives ``delay_s`` late but at the rate it was sent, and connections never wait on
    each other.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float | None = None,
        delay_s: float = 0.0,
        name: str = "tcp-forwarder",
    ) -> None:
        super().__init__(target_host, target_port, listen_host=listen_host, port=port, delay_s=delay_s, name=name)
        self.connect_timeout = connect_timeout
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.listen_host, self.port))
        ls.listen(64)
        self.port = ls.getsockname()[1]
        self._listener = ls
        self._thread = threading.Thread(target=self._accept, args=(ls,), daemon=True, name=self.name)
        self._thread.start()

    def _connect(self) -> socket.socket:
        if self.connect_timeout is None:
            return socket.create_connection(self.target)
        backend = socket.create_connection(self.target, timeout=self.connect_timeout)
        backend.settimeout(None)
        return backend

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # listener closed: the endpoint is "down"
            try:
                backend = self._connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, backend))
            pump = self._pump_delayed if self.delay_s > 0 else self._pump
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True, name=f"{self.name}-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        self._forward(src, dst, iter(lambda: src.recv(1 << 16), b""))

    def _pump_delayed(self, src: socket.socket, dst: socket.socket) -> None:
        """Read ``src`` as fast as it sends; a sender thread writes each chunk to ``dst`` ``delay_s`` after it
        arrived. The end of ``src`` (b"") travels through the queue too, so it is delivered after the data."""
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        sender = threading.Thread(
            target=self._forward, args=(src, dst, _when_due(chunks)), daemon=True, name=f"{self.name}-sender"
        )
        sender.start()
        try:
            while data := src.recv(1 << 16):
                chunks.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        chunks.put((time.monotonic() + self.delay_s, b""))

    def _forward(self, src: socket.socket, dst: socket.socket, chunks: Iterator[bytes]) -> None:
        """Send every chunk to ``dst``; at the end (or a dead socket) close both sockets of the connection."""
        try:
            for data in chunks:
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _close_pair(self, src: socket.socket, dst: socket.socket) -> None:
        for s in (src, dst):
            _shut(s)
            with self._lock:
                self._conns.discard(s)

    def stop(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not on Linux.
            _shut(self._listener)
            self._listener = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            _shut(s)


def _when_due(chunks: queue.SimpleQueue[tuple[float, bytes]]) -> Iterator[bytes]:
    """The queued chunks, each at its due time, until the end marker (b"")."""
    while True:
        due, data = chunks.get()
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        if not data:
            return
        yield data


def _shut(s: socket.socket) -> None:
    """Shut down both directions (wakes a thread blocked on it) and close; a dead socket is fine."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class ForwarderProcess(_Forwarder):
    """A :class:`TcpForwarder` in a child process (``python servers.py ...``), with the same interface.

    ``stop()`` kills the child: its listener and every open connection close at once, as with a dead server.
    """

    _proc: subprocess.Popen[str] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        cmd = [sys.executable, __file__, f"{self.target[0]}:{self.target[1]}", f"{self.listen_host}:{self.port}"]
        proc = subprocess.Popen([*cmd, "--delay-s", str(self.delay_s)], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline() if proc.stdout else ""  # the port, once it listens
        if not line.strip().isdigit():
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{self.name}: the forwarder process did not start ({cmd}): {line!r}")
        self.port = int(line)
        self._proc = proc

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stdout:
                self._proc.stdout.close()
            self._proc = None


def _serve(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="forward LISTEN to TARGET until killed")
    p.add_argument("target", help="host:port")
    p.add_argument("listen", help="host:port (port 0: a free one)")
    p.add_argument("--delay-s", type=float, default=0.0)
    args = p.parse_args(argv)
    (th, tp), (lh, lp) = (a.rsplit(":", 1) for a in (args.target, args.listen))
    fwd = TcpForwarder(th, int(tp), listen_host=lh, port=int(lp), delay_s=args.delay_s)
    fwd.start()
    print(fwd.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    _serve()
