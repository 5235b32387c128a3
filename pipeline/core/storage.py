"""One small storage API over fsspec for local folders, ``file://`` and ``s3://`` (s3fs).

    store = Storage("s3://bucket/prefix")          # or "runs/checkpoints", "file:///data/ckpt"
    info = store.put("/tmp/model.pt", "run/step-10/model.pt")   # FileInfo(path, size, sha256)
    store.write_text("run/latest", "step-10")      # atomic: readers see the old or the new text

Paths given to methods are relative to the root URI, with ``/`` separators. Every failure becomes a
``StorageError`` whose message names the full URI and what to check; ``transient`` tells a caller that
retrying may help (endpoint unreachable, timeouts) as opposed to a missing bucket or bad credentials.

On S3 every request is cut by an explicit connect and read timeout (``connect_timeout_s``, ``read_timeout_s``:
a paused server fails the request instead of hanging it), and neither botocore nor s3fs retries silently: a
transient failure is retried here, through ``pipeline.core.retry``, ``attempts`` times in all with a warning each.

S3 settings come from the usual AWS variables (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION) unless given
explicitly. Credentials are never taken from a config file: configs end up in MLflow params.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec

from pipeline.core.retry import Backoff, retry
from pipeline.core.s3 import error_kind, is_no_bucket, raised_by_storage, s3_filesystem

log = logging.getLogger("pipeline.storage")

CHUNK = 8 << 20  # streaming hash/copy block; large enough that S3 range reads stay efficient
_RETRY = Backoff(first_s=0.5, factor=2.0, max_s=4.0)  # between attempts of one transient-failing S3 request
_SLOWEST_UPLOAD = 1 << 20  # bytes/s: an S3 upload slower than this (plus the read timeout) is cut and retried


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the Storage root
    size: int
    sha256: str


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to check."""

    def __init__(self, message: str, *, uri: str, kind: str) -> None:
        super().__init__(message)
        self.uri = uri
        self.kind = kind  # "not_found" | "no_bucket" | "permission" | "unreachable" | "other"

    @property
    def transient(self) -> bool:
        return self.kind in ("unreachable", "other")


T = TypeVar("T")


def sha256_file(path: str | Path) -> FileInfo:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return FileInfo(str(path), size, h.hexdigest())


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _replace_atomically(path: str, write: Callable[[IO[bytes]], T], *, durable: bool = True) -> T:
    """Write a local file through a temporary sibling, fsync it (unless ``durable`` is False) and rename it over
    ``path``: readers see the old file or the whole new one, never a torn one, and a failure leaves no temporary
    behind. Returns what ``write`` returns."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return result


def _copy_hashing(src: IO[bytes], dst: IO[bytes], *, name: str) -> FileInfo:
    h = hashlib.sha256()
    size = 0
    while block := src.read(CHUNK):
        h.update(block)
        size += len(block)
        dst.write(block)
    return FileInfo(name, size, h.hexdigest())


def _child_names(paths: Iterable[str], parent: str) -> list[str]:
    # fsspec may list the folder itself among its children (S3 does for a "folder/" marker object).
    names = {posixpath.basename(p.rstrip("/")) for p in paths}
    names.discard(posixpath.basename(parent))
    return sorted(n for n in names if n)


class Storage:
    """A root URI plus the filesystem that serves it."""

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str = "",
        region: str = "",
        profile: str = "",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        attempts: int = 3,
    ) -> None:
        if not uri:
            raise StorageError(
                "empty storage URI: give a local folder, file:///path or s3://bucket/prefix", uri=uri, kind="other"
            )
        self.uri = uri.rstrip("/") or uri
        self.remote = is_remote(self.uri)
        self._opts: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region": region,
            "profile": profile,
            "connect_timeout_s": connect_timeout_s,
            "read_timeout_s": read_timeout_s,
            "attempts": attempts,
        }
        self.attempts = attempts
        self.endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
        )
        if self.uri.startswith("s3://"):
            self.fs = s3_filesystem(
                endpoint_url=self.endpoint_url,
                region=region,
                profile=profile,
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
            )
            self.root = self.uri[len("s3://") :].rstrip("/")
        elif self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        else:
            local = self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri
            self.fs = fsspec.filesystem("file")
            self.root = str(Path(local).expanduser().absolute())

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def of_file(cls, path: str, **options: Any) -> tuple[Storage, str]:
        """The Storage of the folder holding ``path`` (a local path, file:// or s3:// URL), and the file's name in
        it: one file named by its full path, read or written through the same API as a tree. ``options``: the
        keyword arguments of ``Storage`` (endpoint, region, profile, timeouts)."""
        path = path.rstrip("/")
        if "://" in path:
            parent, name = path.rsplit("/", 1)
        else:
            parent, name = os.path.split(os.path.abspath(path))
        return cls(parent, **options), name

    def child(self, rel: str) -> Storage:
        """A Storage rooted at ``rel`` below this one, with the same settings."""
        return Storage(self.url(rel), **self._opts)

    def url(self, rel: str = "") -> str:
        """``rel`` below this store as a full address: the remote URL, or the absolute local path (a relative
        path, as a user may configure one, means nothing in MLflow's UI or on another machine)."""
        base = self.uri if self.remote else self.root
        return f"{base}/{rel.strip('/')}" if rel.strip("/") else base

    def _path(self, rel: str) -> str:
        rel = rel.strip("/")
        return posixpath.join(self.root, rel) if rel else self.root

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0] if self.remote else ""

    @contextlib.contextmanager
    def _errors(self, what: str, rel: str = "") -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except BaseException as e:  # noqa: BLE001 - everything below is translated, KeyboardInterrupt aside
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):  # GeneratorExit: a consumer closed open()
                raise
            raise self._explain(e, what, self.url(rel)) from e

    def _upload_timeout(self, size: int) -> float:
        """The longest an S3 upload of ``size`` bytes may take: sending a body has no timeout of its own (the read
        timeout starts once it is sent), so a server that stops reading would otherwise hang it forever."""
        return self._opts["read_timeout_s"] + self._opts["connect_timeout_s"] + size / _SLOWEST_UPLOAD

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """``fn()`` under the error translation. On an object store a transient failure (timeout, cut or refused
        connection, server error) is retried, ``attempts`` calls in all, with a warning naming the URI each time;
        the clients underneath make one attempt per call (see ``pipeline.core.s3``), so a hung request costs one read timeout.
        Only for idempotent calls (every one here: writes replace whole objects)."""

        def once() -> T:
            with self._errors(what, rel):
                return fn()

        if not self.remote or self.attempts <= 1:
            return once()

        def note(e: BaseException, n: int, delay: float) -> None:
            log.warning("%s; attempt %d of %d failed, trying again in %.1f s", e, n, self.attempts, delay)

        return retry(
            once,
            what=f"{what} {self.url(rel)}",
            backoff=_RETRY,
            attempts=self.attempts,
            retryable=lambda e: isinstance(e, StorageError) and e.transient,
            on_retry=note,
            logger=log,
        )

    def _explain(self, e: BaseException, what: str, uri: str) -> StorageError:
        text = str(e) or type(e).__name__
        if type(e).__name__ == "FSTimeoutError":  # fsspec's, from an upload's deadline (_upload_timeout)
            text = "the upload made no progress within its deadline (timeout)"
        kind = error_kind(e)
        if kind == "no_credentials":
            return StorageError(
                f"cannot {what} {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
                uri=uri,
                kind="permission",
            )
        if kind == "no_bucket":
            return StorageError(
                f"cannot {what} {uri}: the bucket {self.bucket!r} does not exist at "
                f"{self.endpoint_url or 'AWS'}; create it or fix the URI (and AWS_ENDPOINT_URL)",
                uri=uri,
                kind="no_bucket",
            )
        if kind == "not_found":
            return StorageError(f"cannot {what} {uri}: it does not exist", uri=uri, kind="not_found")
        if kind == "permission":
            if self.remote:
                return StorageError(
                    f"cannot {what} {uri}: access denied ({text}); check the credentials "
                    f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that they "
                    f"may read and write s3://{self.bucket}",
                    uri=uri,
                    kind="permission",
                )
            return StorageError(
                f"cannot {what} {uri}: permission denied ({text}); check the folder's owner and mode",
                uri=uri,
                kind="permission",
            )
        if kind == "unreachable":
            return StorageError(
                f"cannot {what} {uri}: the endpoint {self.endpoint_url or 'AWS S3'} cannot be "
                f"reached ({text}); check AWS_ENDPOINT_URL (or checkpoint.endpoint_url) and "
                f"the network",
                uri=uri,
                kind="unreachable",
            )
        return StorageError(f"cannot {what} {uri}: {type(e).__name__}: {text}", uri=uri, kind="other")

    # ---------------------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self._call("check", rel, lambda: bool(self.fs.exists(self._path(rel))))

    def _listing(self, rel: str, method: str, empty: Any, **kwargs: Any) -> Any:
        """``fs.<method>(path)`` under this store's error translation; ``empty`` when ``rel`` does not exist
        (a missing bucket is still an error: it is a wrong URI, not an empty folder)."""

        def listing() -> Any:
            try:
                return getattr(self.fs, method)(self._path(rel), **kwargs)
            except FileNotFoundError as e:
                if is_no_bucket(e):
                    raise
                return empty

        return self._call("list", rel, listing)

    def list(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and folders), sorted; [] when it does not exist."""
        entries = self._listing(rel, "ls", [], detail=False)
        return _child_names((str(p) for p in entries), self._path(rel))

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the folders (S3: common prefixes) directly under ``rel``, sorted; [] when it does not exist."""
        entries = self._listing(rel, "ls", [], detail=True)
        return _child_names((str(e["name"]) for e in entries if e.get("type") == "directory"), self._path(rel))

    def find(self, rel: str = "") -> dict[str, int]:
        """Every file below ``rel`` (recursively) as {path relative to ``rel``: size}; {} when it does not
        exist. One paginated listing on S3 instead of a request per file (dataset trees, manifests)."""
        found = self._listing(rel, "find", {}, detail=True)
        prefix = self._path(rel).rstrip("/") + "/"
        out: dict[str, int] = {}
        for p, info in found.items():
            p = str(p)
            if info.get("type") == "directory" or not p.startswith(prefix):
                continue
            out[p[len(prefix) :]] = int(info.get("size") or 0)
        return out

    def is_dir(self, rel: str = "") -> bool:
        """A local folder (symlinks followed), or an object-store prefix holding at least one object."""
        if self.remote:
            return bool(self.list(rel))
        with self._errors("check", rel):
            return os.path.isdir(self._path(rel))

    def walk(self, rel: str = "", *, skip_hidden: bool = False) -> list[tuple[str, list[str], list[str]]]:
        """``sorted(os.walk(rel))`` for any store: (folder relative to ``rel`` with "/" separators, "" for ``rel``
        itself; its sub-folder names; its file names), names sorted, folders in path order (torchvision's
        ImageFolder order). Local symlinked folders are followed; on an object store it is one paginated listing.
        ``skip_hidden`` leaves out folders whose name starts with "." and everything below them. [] when ``rel``
        does not exist."""
        if self.remote:
            tree: dict[str, tuple[set[str], list[str]]] = {}
            for path in self.find(rel):
                *dirs, name = path.split("/")
                if skip_hidden and any(d.startswith(".") for d in dirs):
                    continue
                for i in range(len(dirs) + 1):
                    tree.setdefault("/".join(dirs[:i]), (set(), []))
                    if i < len(dirs):
                        tree["/".join(dirs[:i])][0].add(dirs[i])
                tree["/".join(dirs)][1].append(name)
            return sorted((d, sorted(subs), sorted(files)) for d, (subs, files) in tree.items())
        top = self._path(rel)
        out = []
        with self._errors("list", rel):
            for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
                if skip_hidden:
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                sub = os.path.relpath(dirpath, top)
                out.append(("" if sub == "." else sub.replace(os.sep, "/"), sorted(dirnames), sorted(filenames)))
        return sorted(out)

    def size(self, rel: str) -> int:
        return self._call("stat", rel, lambda: int(self.fs.info(self._path(rel))["size"]))

    @contextlib.contextmanager
    def open(self, rel: str, mode: str = "rb") -> Iterator[IO[Any]]:
        """Plain streaming access. Writes through ``open`` are not atomic: prefer put/write_bytes.

        Failures of the file (opening, reading, writing, closing) become StorageError; an exception the
        caller's own code raises inside the ``with`` block passes through unchanged."""
        with self._errors("open", rel):
            f = self.fs.open(self._path(rel), mode)
        try:
            yield f
        except BaseException as e:
            with contextlib.suppress(Exception):
                f.close()
            if raised_by_storage(e):
                raise self._explain(e, "read or write", self.url(rel)) from e
            raise
        with self._errors("close", rel):
            f.close()

    def read_bytes(self, rel: str) -> bytes:
        return self._call("read", rel, lambda: bytes(self.fs.cat_file(self._path(rel))))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes, *, durable: bool = True) -> None:
        """Atomic small write: a reader sees the old object or the new one, never a torn one.

        ``durable=False`` skips the local fsync, for bulk writes (a dataset's 1.3M images) whose result is
        checked afterwards anyway; S3 objects are always whole once the PUT returns."""
        path = self._path(rel)
        if self.remote:
            # One PUT: S3 objects appear whole.
            self._call("write", rel, lambda: self.fs.pipe_file(path, data, timeout=self._upload_timeout(len(data))))
            return

        def write(f: IO[bytes]) -> None:
            f.write(data)

        with self._errors("write", rel):
            _replace_atomically(path, write, durable=durable)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def put(self, local: str | Path, rel: str) -> FileInfo:
        """Upload a local file (atomically: it appears whole or not at all); returns its size and sha256."""
        local = str(local)
        path = self._path(rel)
        if self.remote:
            with self._errors("upload to", rel):
                info = sha256_file(local)

            def upload() -> int:
                self.fs.put_file(local, path, timeout=self._upload_timeout(info.size))
                return int(self.fs.info(path)["size"])

            got = self._call("upload to", rel, upload)
        else:
            with self._errors("upload to", rel):
                # One read of the source serves both the copy and its checksum.
                with open(local, "rb") as src:
                    info = _replace_atomically(path, lambda f: _copy_hashing(src, f, name=local))
                got = os.path.getsize(path)
        if got != info.size:
            raise StorageError(
                f"upload of {local} to {self.url(rel)} left {got} bytes instead of {info.size}",
                uri=self.url(rel),
                kind="other",
            )
        return FileInfo(rel, info.size, info.sha256)

    def get(self, rel: str, local: str | Path) -> FileInfo:
        """Download to ``local`` in one streamed pass that also computes size and sha256; ``local`` appears
        whole or not at all."""

        def download() -> FileInfo:
            with self.fs.open(self._path(rel), "rb", block_size=CHUNK) as src:
                return _replace_atomically(str(local), lambda f: _copy_hashing(src, f, name=rel))

        info = self._call("download", rel, download)
        return FileInfo(rel, info.size, info.sha256)

    def rename(self, src: str, dst: str) -> None:
        """Move the file or folder ``src`` to ``dst`` (which must not exist). Locally one rename, so a folder
        appears whole; an object store has no rename: it copies, then deletes, and readers may see both."""
        if self.remote:
            moves = {f"{src}/{p}": f"{dst}/{p}" for p in self.find(src)} or {src: dst}
            for a, b in moves.items():
                self._call("copy", a, lambda a=a, b=b: self.fs.copy(self._path(a), self._path(b)))
            for a in moves:
                self.delete(a)
            return
        with self._errors("rename", src):
            os.makedirs(os.path.dirname(self._path(dst)), exist_ok=True)
            os.replace(self._path(src), self._path(dst))

    def delete(self, rel: str = "", *, recursive: bool = False) -> None:
        """Remove a file (or a folder with ``recursive``); a missing path is not an error."""
        path = self._path(rel)

        def rm() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._call("delete", rel, rm)

    def check_access(self, *, write: bool = True) -> None:
        """Fail now, with a helpful message, if the root cannot be listed (and written, with ``write``)."""
        if not self.remote:
            with self._errors("create", ""):
                os.makedirs(self.root, exist_ok=True)
        if self.remote and not self.root.strip("/"):
            raise StorageError(f"{self.uri!r} names no bucket: use s3://bucket/prefix", uri=self.uri, kind="other")
        self.list()
        if write:
            probe = f".access-check-{uuid.uuid4().hex[:12]}"
            self.write_bytes(probe, b"ok")
            self.delete(probe)
