"""One small storage API over fsspec for local folders, ``file://`` and ``s3://`` (s3fs).

    store = Storage("s3://bucket/prefix")          # or "runs/checkpoints", "file:///data/ckpt"
    info = store.put("/tmp/model.pt", "run/step-10/model.pt")   # FileInfo(path, size, sha256)
    store.write_text("run/latest", "step-10")      # atomic: readers see the old or the new text

Paths given to methods are relative to the root URI, with ``/`` separators. Every failure becomes a
``StorageError`` whose message names the full URI and what to check; ``transient`` tells a caller that
retrying may help (endpoint unreachable, timeouts) as opposed to a missing bucket or bad credentials.

S3 settings come from the usual AWS variables (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION) unless given
explicitly. Credentials are never taken from a config file: configs end up in MLflow params.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec

CHUNK = 8 << 20  # streaming hash/copy block; large enough that S3 range reads stay efficient


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


def _is_connection_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
            "ConnectionError",
            "TimeoutError",
            "FSTimeoutError",
        }
    ) or isinstance(exc, (socket.timeout, ConnectionError))


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


# S3 error codes (botocore ClientError.response["Error"]["Code"]) by the StorageError kind they mean. s3fs
# turns a ClientError into FileNotFoundError / PermissionError / OSError and chains the original to it.
_NO_BUCKET_CODES = {"NoSuchBucket"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload", "NoSuchVersion"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "AllAccessDisabled",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _s3_code(exc: BaseException) -> str:
    """The S3 error code of the first botocore ClientError in ``exc``'s chain; "" when there is none."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code") or "")
        e = e.__cause__ or e.__context__
    return ""


def _no_bucket(e: BaseException) -> bool:
    return _s3_code(e) in _NO_BUCKET_CODES


def _classify(e: BaseException) -> str:
    """The StorageError kind of an exception from fsspec/s3fs/botocore, by its type and S3 error code."""
    if {c.__name__ for c in type(e).__mro__} & _NO_CREDENTIALS:
        return "no_credentials"
    code = _s3_code(e)
    if code in _NO_BUCKET_CODES:
        return "no_bucket"
    if code in _DENIED_CODES or isinstance(e, PermissionError):
        return "permission"
    if code in _NOT_FOUND_CODES or isinstance(e, FileNotFoundError):
        return "not_found"
    if _is_connection_error(e):
        return "unreachable"
    return "other"


class Storage:
    """A root URI plus the filesystem that serves it."""

    def __init__(self, uri: str, *, endpoint_url: str = "", region: str = "", profile: str = "") -> None:
        if not uri:
            raise StorageError(
                "empty storage URI: give a local folder, file:///path or s3://bucket/prefix", uri=uri, kind="other"
            )
        self.uri = uri.rstrip("/") or uri
        self.remote = is_remote(self.uri)
        self._opts = {"endpoint_url": endpoint_url, "region": region, "profile": profile}
        self.endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
        )
        if self.uri.startswith("s3://"):
            self.fs, self.root = self._s3(endpoint_url=self.endpoint_url, region=region, profile=profile)
        elif self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        else:
            local = self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri
            self.fs = fsspec.filesystem("file")
            self.root = str(Path(local).expanduser().absolute())

    def _s3(self, *, endpoint_url: str, region: str, profile: str) -> tuple[Any, str]:
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            client_kwargs["region_name"] = region or os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
        kwargs: dict[str, Any] = {
            "endpoint_url": endpoint_url or None,
            "client_kwargs": client_kwargs,
            # Other processes write the same prefixes (other ranks, the commit): never trust a cached listing.
            "use_listings_cache": False,
            # Fail fast on a dead endpoint; the callers (uploads) have their own retry with backoff.
            "config_kwargs": {
                "connect_timeout": 5,
                "read_timeout": 120,
                "retries": {"max_attempts": 3, "mode": "standard"},
            },
        }
        if profile:
            kwargs["profile"] = profile
        fs = s3fs.S3FileSystem(**kwargs)
        return fs, self.uri[len("s3://") :].rstrip("/")

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def of_file(cls, path: str, *, endpoint_url: str = "", region: str = "", profile: str = "") -> tuple[Storage, str]:
        """The Storage of the folder holding ``path`` (a local path, file:// or s3:// URL), and the file's name in
        it: one file named by its full path, read or written through the same API as a tree."""
        path = path.rstrip("/")
        if "://" in path:
            parent, name = path.rsplit("/", 1)
        else:
            parent, name = os.path.split(os.path.abspath(path))
        return cls(parent, endpoint_url=endpoint_url, region=region, profile=profile), name

    def child(self, rel: str) -> Storage:
        """A Storage rooted at ``rel`` below this one, with the same settings."""
        return Storage(self.url(rel), **self._opts)

    def url(self, rel: str = "") -> str:
        return f"{self.uri}/{rel.strip('/')}" if rel.strip("/") else self.uri

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

    def _explain(self, e: BaseException, what: str, uri: str) -> StorageError:
        text = str(e) or type(e).__name__
        kind = _classify(e)
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
        with self._errors("check", rel):
            return bool(self.fs.exists(self._path(rel)))

    def _listing(self, rel: str, method: str, empty: Any, **kwargs: Any) -> Any:
        """``fs.<method>(path)`` under this store's error translation; ``empty`` when ``rel`` does not exist
        (a missing bucket is still an error: it is a wrong URI, not an empty folder)."""
        with self._errors("list", rel):
            try:
                return getattr(self.fs, method)(self._path(rel), **kwargs)
            except FileNotFoundError as e:
                if _no_bucket(e):
                    raise
                return empty

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
        with self._errors("stat", rel):
            return int(self.fs.info(self._path(rel))["size"])

    @contextlib.contextmanager
    def open(self, rel: str, mode: str = "rb") -> Iterator[IO[Any]]:
        """Plain streaming access. Writes through ``open`` are not atomic: prefer put/write_bytes."""
        with self._errors("open", rel):
            with self.fs.open(self._path(rel), mode) as f:
                yield f

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("read", rel):
            return bytes(self.fs.cat_file(self._path(rel)))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes, *, durable: bool = True) -> None:
        """Atomic small write: a reader sees the old object or the new one, never a torn one.

        ``durable=False`` skips the local fsync, for bulk writes (a dataset's 1.3M images) whose result is
        checked afterwards anyway; S3 objects are always whole once the PUT returns."""
        path = self._path(rel)
        with self._errors("write", rel):
            if self.remote:
                self.fs.pipe_file(path, data)  # one PUT: S3 objects appear whole
                return

            def write(f: IO[bytes]) -> None:
                f.write(data)

            _replace_atomically(path, write, durable=durable)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def put(self, local: str | Path, rel: str) -> FileInfo:
        """Upload a local file (atomically: it appears whole or not at all); returns its size and sha256."""
        local = str(local)
        path = self._path(rel)
        with self._errors("upload to", rel):
            if self.remote:
                info = sha256_file(local)
                self.fs.put_file(local, path)
                got = int(self.fs.info(path)["size"])
            else:
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
        with self._errors("download", rel):
            with self.fs.open(self._path(rel), "rb", block_size=CHUNK) as src:
                info = _replace_atomically(str(local), lambda f: _copy_hashing(src, f, name=rel))
        return FileInfo(rel, info.size, info.sha256)

    def rename(self, src: str, dst: str) -> None:
        """Move the file or folder ``src`` to ``dst`` (which must not exist). Locally one rename, so a folder
        appears whole; an object store has no rename: it copies, then deletes, and readers may see both."""
        if self.remote:
            moves = {f"{src}/{p}": f"{dst}/{p}" for p in self.find(src)} or {src: dst}
            for a, b in moves.items():
                with self._errors("copy", a):
                    self.fs.copy(self._path(a), self._path(b))
            for a in moves:
                self.delete(a)
            return
        with self._errors("rename", src):
            os.makedirs(os.path.dirname(self._path(dst)), exist_ok=True)
            os.replace(self._path(src), self._path(dst))

    def delete(self, rel: str = "", *, recursive: bool = False) -> None:
        """Remove a file (or a folder with ``recursive``); a missing path is not an error."""
        path = self._path(rel)
        with self._errors("delete", rel):
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

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
