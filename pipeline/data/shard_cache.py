"""A node-local cache of one sharded split's shards from object storage, filled by a background fetcher.

    cache = ShardCache(Storage("s3://bucket/imagenet/train"), manifest, cache_dir="/local/cache", cache_bytes=...)
    cache.want(shards_read_later)         # in reading order: the fetcher downloads them ahead, in that order
    tar, index = cache.paths(shard)       # blocks until that shard is local (and verified), and keeps it
    cache.release(shards)                 # opened by DALI: they may be evicted now

Each shard is one streamed download (:meth:`pipeline.core.storage.Storage.get`, large ranged GETs), checked against
the manifest's size and sha256 and only then renamed to its final name: a file at a final name is whole and
verified, so a warm cache is used without a single S3 request. The cache folder is shared by every rank of
the node (any number of processes): a file lock per shard makes one of them download it while the others
wait and then find it there, and a cache-wide lock serialises eviction. ``cache_bytes`` bounds the folder:
the fetcher runs ahead of the reader as far as that allows without evicting a shard still to be read, and
the least recently used shards go first. A split that fits stays cached across epochs (and runs).

Errors name the shard's URI: missing, truncated or corrupt (size or sha256 against the manifest); a cache too
small for what a reader needs at once, or a disk that fills up, says which setting to change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import threading
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.core.storage import Storage, StorageError
from pipeline.data.errors import DataError
from pipeline.data.shard_format import ShardInfo, ShardManifest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _no_space(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


FETCHERS = 4  # shards downloaded at once per process: latency overlaps, and one stream rarely fills a node's link


class _NoRoom(Exception):
    """Not enough room in the cache now; raised inside the fetcher only."""


class ShardCache:
    """Local copies of the shards of the split at ``store``, fetched ahead by one background thread."""

    mapped = True  # a shard may be evicted (unlinked) once DALI has opened it: only a mapping keeps it readable

    def __init__(self, store: Storage, manifest: ShardManifest, *, cache_dir: str, cache_bytes: int) -> None:
        self.store = store
        self.manifest = manifest
        self.cache_bytes = cache_bytes
        key = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in store.uri.rsplit("/", 1)[-1])[:40]
        self.folder = Path(cache_dir) / "shards" / f"{name}-{key}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(
                f"cannot create the shard cache {self.folder}: {e}; set --data.cache_dir to a writable local folder"
            ) from e
        self._cond = threading.Condition()
        self._queue: list[ShardInfo] = []  # to fetch, in order
        self._done: dict[str, tuple[str, str]] = {}
        self._failed: dict[str, DataError] = {}
        self._pinned: Counter[str] = Counter()  # handed to this process's readers and not yet opened by DALI
        self._urgent: Counter[str] = Counter()  # readers wait on these now (the loop's and the one building ahead)
        self._ahead: set[str] = set()  # to be read later (lookahead): not evicted to make room for other lookahead
        self._partial_dir = self.folder / f".partial-{socket.gethostname()}-{os.getpid()}"
        self._fetching: dict[str, int] = {}  # being downloaded by this process: name -> bytes reserved
        self._closed = False
        # The threads hold the cache only weakly between rounds, so a dropped source's cache (and threads) go away.
        self._threads = [
            threading.Thread(target=_fetcher, args=(weakref.ref(self),), daemon=True, name=f"shard-fetcher-{k}")
            for k in range(FETCHERS)
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the fetchers (after the shards they are on); the cached files stay."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=600)

    # ------------------------------------------------------------------------------------------
    def uri(self, shard: ShardInfo) -> str:
        return self.store.url(shard.name)

    def want(self, shards: Sequence[ShardInfo]) -> None:
        with self._cond:
            for shard in shards:
                self._ahead.add(shard.name)
                self._enqueue(shard)
            self._cond.notify_all()

    def release(self, shards: Sequence[ShardInfo]) -> None:
        with self._cond:
            for shard in shards:
                self._pinned[shard.name] -= 1
                if self._pinned[shard.name] <= 0:
                    del self._pinned[shard.name]
            self._cond.notify_all()

    def paths(self, shard: ShardInfo) -> tuple[str, str]:
        while True:
            with self._cond:
                self._urgent[shard.name] += 1
                self._ahead.discard(shard.name)
                self._enqueue(shard, first=True)
                self._cond.notify_all()
                while shard.name not in self._done and shard.name not in self._failed:
                    self._cond.wait()
                self._urgent[shard.name] -= 1
                if self._urgent[shard.name] <= 0:
                    del self._urgent[shard.name]
                if shard.name in self._failed:
                    raise self._failed[shard.name]
                tar, index = self._done[shard.name]
                self._pinned[shard.name] += 1
            try:
                os.utime(tar)  # recently used: evicted last
                return tar, index
            except FileNotFoundError:
                # Evicted by another rank of the node since it was fetched: fetch it again.
                self.release([shard])
                with self._cond:
                    self._done.pop(shard.name, None)

    def _enqueue(self, shard: ShardInfo, *, first: bool = False) -> None:
        if shard.name in self._done or shard.name in self._failed or shard.name in self._fetching:
            return
        queued = [s.name for s in self._queue]
        if shard.name in queued:
            if not first:
                return
            self._queue.pop(queued.index(shard.name))
        if first:
            self._queue.insert(0, shard)
        else:
            self._queue.append(shard)

    # ------------------------------------------------------------------------------------------
    def _work_once(self) -> bool:
        """Fetch the next queued shard, or wait a little for one; False once closed."""
        with self._cond:
            if not self._queue:
                self._cond.wait(timeout=1.0)
            if self._closed:
                return False
            if not self._queue:
                return True
            shard = self._queue.pop(0)
            self._fetching[shard.name] = 0
        error: DataError | None = None
        result = None
        try:
            result = self._fetch(shard)
        except _NoRoom:
            with self._cond:
                if shard.name not in self._urgent:
                    # A lookahead fetch waits for a reader to release shards (or to need this one now).
                    del self._fetching[shard.name]
                    self._enqueue(shard, first=True)
                    self._cond.wait(timeout=1.0)
                    return True
            error = self._too_small(shard)
        except DataError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - handed to the reader that waits on this shard
            error = DataError(f"cannot fetch shard {self.uri(shard)}: {type(e).__name__}: {e}")
        with self._cond:
            self._fetching.pop(shard.name, None)
            if result is not None:
                self._done[shard.name] = result
            else:
                assert error is not None
                self._failed[shard.name] = error
            self._cond.notify_all()
        return True

    def _present(self, shard: ShardInfo) -> tuple[str, str] | None:
        tar, index = self.folder / shard.name, self.folder / shard.index
        try:
            if tar.stat().st_size == shard.bytes and index.is_file():
                return str(tar), str(index)
        except FileNotFoundError:
            pass
        return None

    def _fetch(self, shard: ShardInfo) -> tuple[str, str]:
        found = self._present(shard)
        if found is not None:
            return found
        with _locked(self.folder / f".{shard.name}.lock"):
            found = self._present(shard)  # another rank of the node fetched it while we waited
            if found is not None:
                return found
            for attempt in range(2):
                self._make_room(shard)
                try:
                    self._download(shard.index, shard.index_sha256, None, shard)
                    self._download(shard.name, shard.sha256, shard.bytes, shard)
                    break
                except OSError as e:
                    if not _no_space(e) or attempt == 1:
                        raise DataError(
                            f"the shard cache {self.folder} ran out of disk space while fetching "
                            f"{self.uri(shard)} ({shard.bytes} bytes): free space on that disk, lower "
                            f"--data.cache_bytes (now {self.cache_bytes}) to what it can hold, or set "
                            f"--data.cache_dir to a bigger local disk"
                        ) from e
                    self._evict(free_all=True)  # then one more try
        found = self._present(shard)
        assert found is not None
        return found

    def _download(self, rel: str, sha256: str, size: int | None, shard: ShardInfo) -> None:
        final = self.folder / rel
        partial = self._partial_dir / rel  # a folder per process: the others can tell what is on its way
        uri = self.store.url(rel)
        try:
            self._partial_dir.mkdir(exist_ok=True)
            info = self.store.get(rel, partial)
        except StorageError as e:
            if _no_space(e):
                raise OSError(errno.ENOSPC, str(e)) from e
            if e.kind == "not_found":
                raise DataError(
                    f"shard file {uri} is missing, but {self.store.url('manifest.json')} lists it; re-create the "
                    f"shards (`python -m pipeline.tools.prepare ... --format shards`) or re-upload that file"
                ) from e
            raise DataError(f"cannot fetch shard file {uri}: {e}") from e
        if info.sha256 != sha256 or (size is not None and info.size != size):
            partial.unlink(missing_ok=True)
            raise DataError(
                f"shard file {uri} is corrupt or truncated: {info.size} bytes with sha256 {info.sha256}, but the "
                f"manifest says {size if size is not None else 'any size'} with sha256 {sha256}; re-create the "
                f"shards or re-upload that file (`python -m pipeline.tools.validate {self.store.uri}` checks them all)"
            )
        os.replace(partial, final)

    # ------------------------------------------------------------------------------------------
    def _cached(self) -> list[tuple[float, str, int]]:
        """(mtime, tar name, bytes of tar + index) of every complete shard in the folder."""
        by_tar = {s.name: s for s in self.manifest.shards}
        out = []
        for entry in os.scandir(self.folder):
            if entry.name.startswith(".") or not entry.name.endswith(".tar"):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                index = self.folder / (by_tar[entry.name].index if entry.name in by_tar else entry.name[:-4] + ".idx")
                extra = index.stat().st_size if index.exists() else 0
                out.append((st.st_mtime, entry.name, st.st_size + extra))
        return out

    def _make_room(self, shard: ShardInfo) -> None:
        """Evict least recently used shards until ``shard`` fits; never one a reader holds, and for a lookahead
        fetch never one still to be read. :class:`_NoRoom` when that is not enough."""
        need = shard.bytes + 256 * shard.samples  # and its index: a line of ~100 bytes per sample
        if need > self.cache_bytes:
            raise DataError(
                f"data.cache_bytes = {self.cache_bytes} is smaller than the shard {self.uri(shard)} "
                f"({shard.bytes} bytes); raise --data.cache_bytes"
            )
        with _locked(self.folder / ".evict.lock"):
            cached = self._cached()
            # What is on its way counts too: this process's other downloads (reserved in full) and the partial
            # files of the node's other ranks (as far as they have got).
            partial = self._downloading_elsewhere()
            with self._cond:
                total = sum(size for _, _, size in cached) + sum(self._fetching.values()) + partial
                keep = set(self._pinned) | set(self._urgent)
                if shard.name not in self._urgent:
                    keep |= self._ahead
            for _mtime, name, size in sorted(cached):
                if total + need <= self.cache_bytes:
                    break
                if name in keep:
                    continue
                self._remove(name)
                total -= size
            if total + need > self.cache_bytes:
                raise _NoRoom
            with self._cond:
                self._fetching[shard.name] = need

    def _downloading_elsewhere(self) -> int:
        """Bytes that the node's other processes have downloaded so far into their partial folders."""
        total = 0
        for entry in os.scandir(self.folder):
            if entry.name.startswith(".partial-") and entry.name != self._partial_dir.name and entry.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    total += sum(f.stat().st_size for f in os.scandir(entry.path))
        return total

    def _evict(self, *, free_all: bool) -> None:
        with _locked(self.folder / ".evict.lock"):
            with self._cond:
                pinned = set(self._pinned) | set(self._urgent)
            for _mtime, name, _size in sorted(self._cached()):
                if free_all and name not in pinned:
                    self._remove(name)

    def _remove(self, name: str) -> None:
        # A reader that has the file open keeps reading it: removing only unlinks the name.
        by_tar = {s.name: s for s in self.manifest.shards}
        for rel in (name, by_tar[name].index if name in by_tar else name[:-4] + ".idx"):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / rel).unlink()
        with self._cond:
            self._done.pop(name, None)

    def _too_small(self, shard: ShardInfo) -> DataError:
        with self._cond:
            held_names = set(self._pinned) | set(self._urgent)
        held = sum(s.bytes for s in self.manifest.shards if s.name in held_names)
        return DataError(
            f"data.cache_bytes = {self.cache_bytes} cannot hold the shards this node's readers need at once: "
            f"{held} bytes of shards of {self.store.uri} are wanted now (DALI opens a pipeline's shards together), "
            f"and other ranks of the node share {self.folder}; raise --data.cache_bytes (the whole split is "
            f"{sum(s.bytes for s in self.manifest.shards)} bytes: at or above that it is fetched once and reused "
            f"every epoch), or use more nodes"
        )


def _fetcher(ref: weakref.ReferenceType[ShardCache]) -> None:
    while True:
        cache = ref()
        if cache is None or not cache._work_once():
            return
        del cache
