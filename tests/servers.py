"""Networking pieces shared by the test servers (s3_server, mlflow_server, cluster/slurm_cluster).

port = free_port()
fwd = TcpForwarder("127.0.0.1", backend_port, port=port); fwd.start()   # clients use ``port``
fwd.stop()                        # new connections refused, open ones cut (an outage)
fwd.start()                       # the same port again
slow = TcpForwarder("127.0.0.1", backend_port, delay_s=0.020)   # every chunk held 20 ms each way

The delay stands in for network latency: this machine's kernel has no ``netem`` queueing discipline, so
``tc qdisc ... netem delay`` is not available; a forwarder that holds each chunk is the next best thing.
"""

from __future__ import annotations

import queue
import socket
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TcpForwarder:
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
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.listen_host, self.port = listen_host, port
        self.connect_timeout = connect_timeout
        self.name = name
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

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
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _pump_delayed(self, src: socket.socket, dst: socket.socket) -> None:
        """Read ``src`` as fast as it sends; a sender thread writes each chunk to ``dst`` ``delay_s`` after it
        arrived. The end of ``src`` (b"") travels through the queue too, so it is delivered after the data."""
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        sender = threading.Thread(target=self._send_late, args=(chunks, src, dst), daemon=True, name=self.name)
        sender.start()
        try:
            while data := src.recv(1 << 16):
                chunks.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        chunks.put((time.monotonic() + self.delay_s, b""))

    def _send_late(
        self, chunks: queue.SimpleQueue[tuple[float, bytes]], src: socket.socket, dst: socket.socket
    ) -> None:
        try:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    break
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


def _shut(s: socket.socket) -> None:
    """Shut down both directions (wakes a thread blocked on it) and close; a dead socket is fine."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
