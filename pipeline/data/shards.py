"""A sharded split (:mod:`pipeline.data.shard_format`) as an epoch-structured, resumable source.

The rules are :class:`~pipeline.data.loader.DaliSource`'s, with shards in place of files:

* Training: epoch ``e`` orders the shards by a permutation drawn from (seed, e), the same on every rank.
  Laid end to end they form one stream of ``N`` samples; rank ``r`` reads the run ``[N*r/W, N*(r+1)/W)``
  of it (:func:`~pipeline.data.source.shard_range`), which starts and ends inside shards as it must: a
  rank reads part of a shard through an index file that lists only those samples. So every sample is read
  exactly once per epoch over all ranks, however uneven the shards. Inside its run a rank's samples are
  shuffled by DALI's own buffer (``readers.webdataset(random_shuffle=True)``, seeded by the pipeline's
  seed). Every rank yields ``(N // W) // batch_size`` batches and reads and drops the rest, as for files:
  the run's last samples in stream order, in a reader batch of their own (read in order by a pipeline of
  its own, built ahead), which DALI pads with its last sample.
* Evaluation: the shards in manifest order, no shuffling; each rank yields its run's samples once, the
  padding (at the end) is dropped.

A training epoch is read in segments of about :data:`SEGMENT_SHARDS` shards and at least
:data:`SEGMENT_MIN_SAMPLES` samples, one pipeline each (reader-batch aligned, so a segment's samples are
shuffled among themselves), each built ahead while the one before runs (see
:class:`~pipeline.data.ahead.PipelineAhead`). ``state_dict`` holds (epoch, batch) and the live
pipeline's DALI checkpoint (reader position, shuffle buffer, augmentation RNGs): a source that loads it
continues with bitwise-identical batches.

Shards are read from local files: a local split folder in place (:class:`LocalShards`), an ``s3://`` one
through the node-local cache of :mod:`pipeline.data.shard_cache`. DALI opens every file a pipeline reads when
it is built, so a segment's shards must be local by then; the cache fetches them ahead, in reading order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.data.dali_errors import dali_reason
from pipeline.data.errors import DataError
from pipeline.data.loader import DaliPipelineSource, DaliSettings
from pipeline.data.pipelines import shard_pipeline
from pipeline.data.shard_format import ShardInfo, ShardManifest, parse_index, sub_index
from pipeline.data.source import SourceOptions

# A training epoch is read by several pipelines in turn, each over about this many shards' samples: a rank then
# needs only those shards local to start reading (the cache fetches the rest meanwhile), and DALI's shuffle
# buffer (pipelines.SHUFFLE_BUFFER samples) is smaller than one shard anyway.
SEGMENT_SHARDS = 8
# ... and over at least this many samples. Each segment costs a pipeline's build and teardown and, at its end, the
# refill of the reader's shuffle buffer for a next reader epoch nobody reads: about 35 ms of CPU on the data
# benchmark's 2 cores, a fifth of the rate with 8 small shards (2,100 CIFAR images) per segment. ImageNet's 256 MB
# shards hold about 18,000 images per 8: unchanged by this floor.
SEGMENT_MIN_SAMPLES = 16384
_PIPELINE_ARGS = ("batch_size", "num_threads", "prefetch_queue_depth", "device_id")  # DALI's, not the graph's
Piece = tuple[int, int, int]  # (shard number in the manifest, first sample, end sample)
_DIGIT_OR_PAD = np.zeros(256, dtype=bool)  # the bytes of a .cls as DALI pads it: ASCII digits and zeros
_DIGIT_OR_PAD[[0, *range(ord("0"), ord("9") + 1)]] = True


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The global shard order of training epoch ``epoch``: a permutation of range(num_shards), the same on every rank."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, 0x5A4D]))
    return rng.permutation(num_shards)


class ShardFiles(Protocol):
    """Where a source finds the local copy of each shard (in place, or a node-local cache)."""

    #: DALI must map the tars: a file may lose its name once opened (:meth:`release`), see ``shard_pipeline``.
    mapped: bool

    def want(self, shards: Sequence[ShardInfo]) -> None:
        """These shards will be read later, in this order (a cache fetches them ahead)."""
        ...

    def paths(self, shard: ShardInfo) -> tuple[str, str]:
        """Local (tar, index) of ``shard`` (fetched now if need be), kept until :meth:`release`; DataError naming
        the shard if it cannot be had."""
        ...

    def release(self, shards: Sequence[ShardInfo]) -> None:
        """A pipeline has opened these shards (from :meth:`paths`): a cache may now evict them."""
        ...

    def uri(self, shard: ShardInfo) -> str: ...


class LocalShards:
    """The shards of a local split folder, read in place (checked against the manifest's sizes)."""

    mapped = False  # the user's files, perhaps on a network filesystem: read() (see pipelines.READER_IO)

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def want(self, shards: Sequence[ShardInfo]) -> None:
        pass

    def release(self, shards: Sequence[ShardInfo]) -> None:
        pass

    def uri(self, shard: ShardInfo) -> str:
        return os.path.join(self.folder, shard.name)

    def paths(self, shard: ShardInfo) -> tuple[str, str]:
        tar, index = os.path.join(self.folder, shard.name), os.path.join(self.folder, shard.index)
        for path in (tar, index):
            if not os.path.isfile(path):
                raise DataError(f"shard file {path} is missing (listed in the manifest); re-create the shards")
        size = os.path.getsize(tar)
        if size != shard.bytes:
            raise DataError(
                f"shard {tar} has {size} bytes but the manifest says {shard.bytes} (truncated or replaced); "
                f"check the split with `python -m pipeline.tools.validate {self.folder}` and re-create it"
            )
        return tar, index


class ShardSource(DaliPipelineSource):
    """One sharded split for one rank; see the module docstring for the epoch rules."""

    state_kind = "shards"
    identity_keys = (
        *DaliPipelineSource.identity_keys,
        "num_shards",
    )  # another sharding of the same images reads otherwise

    def __init__(
        self,
        manifest: ShardManifest,
        options: SourceOptions,
        *,
        files: ShardFiles,
        split_uri: str,
        settings: DaliSettings,
    ) -> None:
        self.manifest = manifest
        self.split_uri = split_uri
        self._shard_files = files
        super().__init__(options, num_samples=manifest.num_samples, path=split_uri, settings=settings, root=split_uri)
        # Per-epoch index files for partial shards: DALI reads them when a pipeline is built, then they go.
        self._index_dir = tempfile.mkdtemp(prefix="shard-index-")
        weakref.finalize(self, shutil.rmtree, self._index_dir, True)
        self._local: dict[str, str] = {}  # local tar path -> shard URI, to name a shard in DALI's errors

    # ------------------------------------------------------------------------------------------
    def pieces(self, epoch: int) -> list[Piece]:
        """What this rank reads in ``epoch``: (shard, first, end) sample ranges in stream order, padding included."""
        shards = self.manifest.shards
        order = shard_order(len(shards), self.seed, epoch) if self.split == "train" else range(len(shards))
        pieces: list[Piece] = []
        pos = 0
        for s in order:
            n = shards[s].samples
            first, end = max(self._start - pos, 0), min(self._stop - pos, n)
            if first < end:
                pieces.append((int(s), first, end))
            pos += n
            if pos >= self._stop:
                break
        if self.split == "train":
            # No padding here: it would be shuffled in among the run and yielded beside its original. DALI pads
            # the last reader batch with the last sample instead (pad_last_batch), after every sample of the run
            # (its shuffle stays inside a reader epoch); that batch is past len() and dropped.
            return pieces
        # Evaluation reads in order: the padding (read, never yielded) repeats the run from its start.
        need = self._reader_batches * self.batch_size - (self._stop - self._start)
        k = 0
        while need > 0:
            s, first, end = pieces[k % len(pieces)]
            take = min(need, end - first)
            pieces.append((s, first, first + take))
            need -= take
            k += 1
        return pieces

    def epoch_shards(self, epoch: int, segment: int | None = None) -> list[ShardInfo]:
        """The shards this rank reads in ``epoch`` (or in one segment of it), each once, in reading order."""
        pieces = self.pieces(epoch) if segment is None else self.segment_pieces(epoch, segment)
        return [self.manifest.shards[s] for s in dict.fromkeys(s for s, _, _ in pieces)]

    def _segments(self, epoch: int) -> list[int]:
        if self.split != "train":
            return [0, self._reader_batches]
        per = max(
            1,
            round(SEGMENT_SHARDS * self.num_samples / self.num_shards / self.batch_size),
            -(-SEGMENT_MIN_SAMPLES // self.batch_size),
        )
        end, *rest = self._rest_bounds()  # the yielded batches end at `end`; the dropped rest has its own
        bounds = [*range(0, end, per), end]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < per // 2:
            del bounds[-2]  # a short tail joins the segment before it
        return bounds + rest

    def segment_pieces(self, epoch: int, segment: int) -> list[Piece]:
        """The pieces of ``segment`` of ``epoch``: its reader batches' samples of the rank's run (the last one to
        the run's end)."""
        bounds = self._segments(epoch)
        lo = bounds[segment] * self.batch_size
        hi = bounds[segment + 1] * self.batch_size if segment + 2 < len(bounds) else None
        out, pos = [], 0
        for s, first, end in self.pieces(epoch):
            a, b = max(first, first + lo - pos), end if hi is None else min(end, first + hi - pos)
            if a < b:
                out.append((s, a, b))
            pos += end - first
        return out

    def _build_pipeline(self, epoch: int, segment: int, *, checkpoint: bytes | None) -> tuple[Any, tuple[str, ...]]:
        pieces = self.segment_pieces(epoch, segment)
        needed = self.epoch_shards(epoch, segment)
        self._shard_files.want(needed)  # all queued at once, first: the fetchers work on them together
        if self.split == "train":
            # The shards of the segment(s) after this one are fetched while this one is read (a segment is built
            # half-way through the one before it, so the fetcher runs one to two segments ahead of the reader).
            for later in self._segments_after(epoch, segment):
                self._shard_files.want(self.epoch_shards(*later))
        held: list[ShardInfo] = []
        folder = tempfile.mkdtemp(prefix=f"e{epoch}-{segment}-", dir=self._index_dir)
        try:
            local = {}
            for info in needed:
                local[info.name] = self._shard_files.paths(info)
                held.append(info)
            paths, index_paths = [], []
            for k, (s, first, end) in enumerate(pieces):
                info = self.manifest.shards[s]
                tar, index = local[info.name]
                self._local[tar] = self._shard_files.uri(info)
                if (first, end) != (0, info.samples):
                    with open(index) as f:
                        lines = parse_index(f.read(), uri=self._shard_files.uri(info) + " index")
                    if len(lines) != info.samples:
                        raise DataError(
                            f"the index of {self._shard_files.uri(info)} lists {len(lines)} samples but the "
                            f"manifest says {info.samples}; re-create the shards"
                        )
                    index = os.path.join(folder, f"{k}.idx")
                    with open(index, "w") as f:
                        f.write(sub_index(lines[first:end]))
                paths.append(tar)
                index_paths.append(index)
            files = tuple(self._shard_files.uri(self.manifest.shards[s]) for s, _, _ in pieces)
            kwargs = self._segment_kwargs(epoch, segment)
            ctor = {k: v for k, v in kwargs.items() if k in _PIPELINE_ARGS}
            pipe = shard_pipeline(
                paths=paths,
                index_paths=index_paths,
                train=self.split == "train",
                shuffle=self.split == "train" and not self._is_rest(epoch, segment),  # the rest is only dropped
                map_files=self._shard_files.mapped,
                sample_bytes=-(-sum(s.bytes for s in self.manifest.shards) // self.manifest.num_samples),
                graph={k: v for k, v in kwargs.items() if k not in _PIPELINE_ARGS},
                **ctor,
                **self._run_args(epoch, segment, checkpoint),
            )
            self._build_checked(pipe, files, samples=sum(end - first for _, first, end in pieces))
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # DALI read the indexes while building
            self._shard_files.release(held)  # and holds the shards open: a cache may evict them now
        return pipe, files

    def _label_tensor(self, labels, stream) -> torch.Tensor:
        # Each .cls member is the class index in ASCII digits (shard_format); DALI hands over its bytes, zero-padded
        # to one (batch, longest) array. Read as one array of byte strings (numpy drops the trailing zeros) and cast
        # to integers: about 6 us a batch. A loop over the samples in Python cost about a millisecond, as much as
        # decoding a batch of CIFAR images; ten whole-array operations on the digits still cost 0.2 ms.
        raw = np.ascontiguousarray(np.asarray(labels.as_tensor()).reshape(len(labels), -1))
        if raw.shape[1] > 18 or not _DIGIT_OR_PAD[raw].all():  # no class index, or blanks: one sample at a time
            return self._parse_labels(raw)
        try:
            values = raw.view(f"S{raw.shape[1]}").reshape(-1).astype(np.int64)
        except ValueError:  # an empty .cls, or padding between digits
            return self._parse_labels(raw)
        if values.max(initial=0) >= self.num_classes:
            return self._parse_labels(raw)
        return torch.from_numpy(values).to(self.device)

    def _parse_labels(self, raw: np.ndarray) -> torch.Tensor:
        """The labels one sample at a time (leading blanks, a bad .cls): a DataError names a .cls that is no class."""
        values = []
        for row in raw:
            text = bytes(row).rstrip(b"\0").strip()
            if not text.isdigit() or int(text) >= self.num_classes:
                raise DataError(
                    f"a sample of {self.split_uri} has .cls {text[:20]!r}, not a class index below "
                    f"{self.num_classes}; check the split with `python -m pipeline.tools.validate {self.split_uri}`"
                )
            values.append(int(text))
        return torch.tensor(values, dtype=torch.int64).to(self.device)

    def _explain(self, error: RuntimeError, files: Sequence[str]) -> DataError:
        text = str(error)
        reason = dali_reason(text)
        fix = f"check the split with `python -m pipeline.tools.validate {self.split_uri}` and re-create the shard"
        for local, uri in list(self._local.items()):  # the thread building ahead may add to it
            # DALI names the tar or, for a tar shorter than its index says, the index beside it (shard-k.idx).
            stem = os.path.basename(os.path.splitext(local)[0])
            if local in text or os.path.basename(local) in text or f"{stem}.idx" in text:
                return DataError(f"{uri}: DALI cannot read this shard ({reason}); {fix}")
        shown = ", ".join(dict.fromkeys(files))
        return DataError(f"DALI failed while reading the shards {shown} ({reason}) without naming one; {fix}")

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)
