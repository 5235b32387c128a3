"""A real ``mlflow server`` on 127.0.0.1 for tests: sqlite backend, local proxied artifact store.

    with MlflowServer(tmp_path) as server:        # started on a free port
        client = MlflowClient(server.uri)
        server.stop(kill=True)                    # an abrupt outage
        server.start()                            # same port, same store: clients reconnect

The server runs in its own session so that stopping it also ends its uvicorn workers, and only
the processes this helper started are ever signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from servers import free_port


def _mlflow_executable() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


def make_template_db(path: str | Path) -> Path:
    """An empty, fully migrated store to copy into each new server's folder."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = Path(path).resolve()
    if not path.exists():
        # "mlflow-artifacts:/" is what a server with proxied artifacts gives new experiments.
        SqlAlchemyStore(f"sqlite:///{path}", "mlflow-artifacts:/")
    return path


class MlflowServer:
    """Start/stop/restart one tracking server; the port and the store survive restarts."""

    def __init__(
        self,
        root: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        template_db: str | Path | None = None,
        startup_timeout_s: float = 90.0,
    ) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.backend_uri = f"sqlite:///{(self.root / 'mlflow.db').resolve()}"
        self.artifacts_dir = (self.root / "artifacts").resolve()
        self.log_path = self.root / "server.log"
        self.template_db = Path(template_db) if template_db else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MlflowServer:
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        db = self.root / "mlflow.db"
        if self.template_db is not None and not db.exists():
            shutil.copyfile(self.template_db, db)  # skips ~10 s of schema migrations per server
        cmd = [
            *_mlflow_executable(),
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts_dir),
        ]
        # No job runner: its half-dozen worker processes would cost a small machine ~10 s per start
        # and CPU throughout, and tracking needs none of them.
        env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # A port released a moment ago can still be in TIME_WAIT; uvicorn sets SO_REUSEADDR, but
        # a previous server that has not quite exited would make this one fail: wait for it.
        self._wait_port_free(timeout_s=15.0)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self._proc.returncode}; log:\n{self.log_path.read_text()[-3000:]}"
                )
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop(kill=True)
        raise RuntimeError(
            f"mlflow server on {self.uri} was not healthy after {self.startup_timeout_s}s; "
            f"log:\n{self.log_path.read_text()[-3000:]}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """End the server and its workers; ``kill=True`` is an abrupt outage (SIGKILL, no shutdown)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        # Workers belong to the same session; make sure none outlives the server.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self) -> MlflowServer:
        self.stop()
        return self.start()

    def _wait_port_free(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.host, self.port))
                    return
                except OSError:
                    time.sleep(0.2)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
