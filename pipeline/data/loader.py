"""DALI pipelines wrapped as epoch-structured, resumable torch data sources.

Sharding, shuffling and epoch accounting are done here, not by DALI's reader or framework
iterators, because they must be exact:

* Sharding: each rank's pipeline reads an explicit list, its shard ``[N*r/W, N*(r+1)/W)`` of the
  split (``shard_id = global rank``, ``num_shards = world size``), padded to a whole number of
  batches with images of the same shard. DALI's own sharding and ``pad_last_batch`` are not used:
  with an S3 root, DALI 2.4 returns garbage bytes for padded samples that start a batch.
* Training: epoch ``e`` reads a fresh global permutation of the split drawn from (seed, e), the same
  on every rank, so the shards of one epoch are disjoint and together read every image exactly
  once; the order differs every epoch and depends on the seed only. Each epoch has its own pipeline
  (seeded by seed, rank and epoch) reading that epoch's list; the next epoch's is built on a background
  thread half-way through the current one and its prefetch queue filled (:class:`~pipeline.data.ahead.PipelineAhead`), so
  an epoch boundary costs no pipeline start-up. Every rank yields
  ``(num_samples // world_size) // batch_size`` batches, so all ranks issue the same number of
  collectives; the rest of its shard (fewer than ``batch_size`` images, plus at most one image) is
  read and dropped, a different rest each epoch. The rest (one reader batch, with the padding) has a
  small pipeline of its own, decoded on the CPU and built ahead with the next epoch's: its batch is
  ready before the epoch ends, so dropping it adds nothing to the boundary.
* Evaluation: every image is yielded exactly once over all ranks, in file order. A rank yields its
  shard's ``n_r`` images, the last batch partially, and drops the padding. Ranks may therefore
  yield different numbers of batches (and samples): reduce metric *sums* across ranks after the
  loop, and never put a collective inside the evaluation loop.

``state_dict`` records (epoch, batch) plus DALI's own checkpoint (reader position, augmentation
RNGs); a rebuilt source that loads it continues with bitwise-identical batches.

An image DALI cannot read or decode stops iteration with a :class:`DataError` that names the file
(see :func:`~pipeline.data.dali_errors.explain_pipeline_error`); nothing is skipped silently.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import nvidia.dali.types as types
import torch
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipeline.data.ahead import PipelineAhead, dispose_pipeline, teardown_pipeline
from pipeline.data.dali_errors import explain_pipeline_error
from pipeline.data.errors import DataError
from pipeline.data.folder import SplitIndex
from pipeline.data.pipelines import READER_NAME, TrainAugment, decoder_device_id, train_pipeline, val_pipeline
from pipeline.data.source import PAPER_SCALES, EpochSource, SourceOptions, derive_seed, shard_range

EVAL_MODES = ("center", "10crop", "multiscale")


# A pipeline for the next epoch (or segment) is started at least this many batches before the current one ends.
BUILD_AHEAD_BATCHES = 16


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The global training order of ``epoch``: a permutation of range(n), the same on every rank."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, 0x5EED]))
    return rng.permutation(n)


def _pipeline_seed(seed: int, rank: int, split: str, epoch: int, segment: int = 0) -> int:
    # Augmentation draws differ between ranks and between epochs (each epoch has a new pipeline), and between the
    # segments of an epoch read by several pipelines in turn.
    base = derive_seed(seed, rank, split)
    state = np.random.SeedSequence([base, epoch, *([segment] if segment else [])]).generate_state(1, dtype=np.uint32)
    return int(state[0]) & 0x7FFFFFFF


@dataclass(frozen=True, kw_only=True, eq=False)
class DaliSettings:
    """How a DALI source decodes and augments (the graph's settings) and with how many threads and queued batches."""

    style: Literal["cifar", "imagenet"]
    image_size: int
    val_resize: int
    mean: Sequence[float]
    std: Sequence[float]
    num_threads: int
    prefetch: int
    decoder: Literal["cpu", "mixed"]
    augmentation: TrainAugment = TrainAugment()
    mean_image: np.ndarray | None = None
    eval_mode: Literal["center", "10crop", "multiscale"] = "center"
    scales: Sequence[int] = PAPER_SCALES


class DaliPipelineSource(EpochSource):
    """An epoch source read by DALI pipelines, one per segment of an epoch (see the module docstring).

    What both DALI-fed sources share: the graph's settings, the epoch arithmetic, the pipelines built ahead and
    retired, the batches handed to torch and the saved state. A subclass says what a segment's pipeline reads
    (:meth:`_build_pipeline`), how an epoch is cut into segments (:meth:`_segments`) and how a DALI failure is
    explained (:meth:`_explain`): :class:`DaliSource` for an image folder, :class:`~pipeline.data.shards.ShardSource`
    for a sharded split. Iteration replaces :meth:`EpochSource._iterate`, since the reader must also read (and
    drop) the rest of an epoch's shard.
    """

    def __init__(
        self, options: SourceOptions, *, num_samples: int, path: str, settings: DaliSettings, root: str
    ) -> None:
        """The graph's settings, the epoch arithmetic and the reader state for ``num_samples`` read from ``path``."""
        split = options.split
        style, decoder, eval_mode = settings.style, settings.decoder, settings.eval_mode
        if eval_mode not in EVAL_MODES:
            raise DataError(f"evaluation mode {eval_mode!r} is not one of {', '.join(EVAL_MODES)}")
        if eval_mode != "center" and (split != "val" or style != "imagenet"):
            raise DataError(
                f"evaluation mode {eval_mode!r} needs the val split and data.style = 'imagenet' "
                f"(got split {split!r}, style {style!r}); CIFAR-style data is tested on the single view"
            )
        self._pipe_kwargs: dict[str, Any] = dict(
            style=style,
            image_size=settings.image_size,
            mean=list(settings.mean),
            std=list(settings.std),
            decoder=decoder,
            mean_image=settings.mean_image,
            batch_size=options.batch_size,
            num_threads=settings.num_threads,
            prefetch_queue_depth=settings.prefetch,
            device_id=decoder_device_id(options.device) if decoder == "mixed" else None,
        )
        if split == "val":
            self._pipe_kwargs.update(val_resize=settings.val_resize, eval_mode=eval_mode, scales=tuple(settings.scales))
        else:
            self._pipe_kwargs.update(augmentation=settings.augmentation)
        super().__init__(options, num_samples=num_samples, num_batches=options.epoch_length(num_samples, path=path))
        self.decoder = decoder
        self.eval_mode = eval_mode
        self.root = root

        self._start, self._stop = shard_range(self.num_samples, self.world_size, self.rank)
        # The reader epoch: this rank's whole shard, padded to whole batches. Here ``_batch`` counts
        # reader batches (yielded + dropped), so it runs past ``len()`` when training drops a rest.
        self._reader_batches = math.ceil((self._stop - self._start) / self.batch_size)
        self._shard_len = self._len * self.batch_size if split == "train" else self._stop - self._start

        self._pipe = None
        self._pipe_key: tuple[int, int] | None = None  # (epoch, segment) it reads
        # Iterations of it scheduled so far and outputs taken; how many batches it is read for (None: no end, the
        # evaluation pipeline serves pass after pass). See _run.
        self._pipe_sched = self._pipe_reads = self._pipe_depth = 0
        self._pipe_batches: int | None = None
        self._ahead = PipelineAhead()
        # Pipelines that finished their epoch (or segment), torn down by the next build ahead (see _retire).
        self._retired: list[Any] = []
        self._files: tuple[str, ...] = ()
        self._pending_checkpoint: bytes | None = None

    def _iterate(self, generation: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Not the shared rule: the reader must also read (and drop) the rest of an epoch's shard.
        if (self.split == "train" and self._batch >= self._len) or (self.split == "val" and self._batch > 0):
            self._finish_epoch()
        while self._batch < self._len:
            valid = min(self.batch_size, self._shard_len - self._batch * self.batch_size)
            # No local reference to the pipeline: the one in self is put aside when it has been read (see _retire).
            batch = self._next_batch(self._pipeline(), valid)
            self._batch += 1
            yield batch
            if generation != self._generation:
                return
            if self.split == "train":
                # After the yield: starting a build (a thread) must not hold back the batch, a segment's first above all.
                self._maybe_build_ahead()
        self._finish_epoch()

    def _segments(self, epoch: int) -> list[int]:
        """Reader-batch bounds ``[0, ..., reader batches]`` of the pipelines that read ``epoch`` one after the other.

        Here one pipeline for the yielded batches and, in training, one for the rest (see :meth:`_rest_bounds`); a
        subclass may split an epoch further (see :class:`~pipeline.data.shards.ShardSource`).
        """
        return [0, *self._rest_bounds()]

    def _rest_bounds(self) -> list[int]:
        """``[len(), reader batches]`` in training where the reader reads more than it yields, else ``[reader
        batches]``: the last bounds of every training epoch's segments. The reader batch with the rest (and the
        padding) then has a pipeline of its own, built ahead with the next epoch's first: it is decoded while the
        epoch runs, not at its end, where the reader would otherwise make the trainer wait one batch for images it
        drops."""
        if self.split == "train" and 0 < self._len < self._reader_batches:
            return [self._len, self._reader_batches]
        return [self._reader_batches]

    def _is_rest(self, epoch: int, segment: int) -> bool:
        """Whether ``segment`` of ``epoch`` is the dropped rest (see :meth:`_rest_bounds`)."""
        return self.split == "train" and self._segments(epoch)[segment] >= self._len

    def _segment_kwargs(self, epoch: int, segment: int) -> dict[str, Any]:
        """The pipeline keywords of one segment: the rest's batch is never seen, so it is decoded on the CPU (no GPU
        decoder state to set up for one batch) with one batch in flight (a second would run past its end)."""
        if not self._is_rest(epoch, segment):
            return self._pipe_kwargs
        return {**self._pipe_kwargs, "decoder": "cpu", "device_id": None, "prefetch_queue_depth": 1}

    def _key(self, batch: int) -> tuple[int, int]:
        """(epoch, segment) of the pipeline that reads reader batch ``batch`` of the current epoch."""
        if self.split != "train":
            return 0, 0  # one pipeline, every pass
        bounds = self._segments(self._epoch)
        return self._epoch, min(bisect.bisect_right(bounds, batch) - 1, len(bounds) - 2)

    def _maybe_build_ahead(self) -> None:
        """Half-way through a pipeline's batches, start building the ones that follow it (the next segment, and
        after the rest's the next epoch's first); in a short one (a small epoch, a shard segment) at least
        BUILD_AHEAD_BATCHES before its end, since a build takes a fixed time (tens of ms on a CPU) that a few fast
        batches do not cover."""
        epoch, seg = self._key(self._batch - 1)
        bounds = self._segments(epoch)
        lo, hi = bounds[seg], bounds[seg + 1]
        if self._batch >= max(lo + 1, min(lo + (hi - lo) // 2, hi - BUILD_AHEAD_BATCHES)):
            self._build_ahead(self._segments_after(epoch, seg))

    def _segments_after(self, epoch: int, segment: int) -> tuple[tuple[int, int], ...]:
        """The (epoch, segment) read after ``segment`` of ``epoch``; after the dropped rest's (read at once, at the
        epoch's end) also the next epoch's first, which is needed right after it."""
        nxt = (epoch, segment + 1) if segment + 2 < len(self._segments(epoch)) else (epoch + 1, 0)
        return (nxt, (epoch + 1, 0)) if self._is_rest(*nxt) else (nxt,)

    def _build_ahead(self, keys: tuple[tuple[int, int], ...]) -> None:
        """Start building the pipelines of ``keys`` (and filling their prefetch queues) in the background, once."""
        if self._ahead.keys != keys:
            retired, self._retired = self._retired, []

            def build(key: tuple[int, int]) -> tuple[Any, tuple[str, ...]]:
                while retired:  # the finished pipelines go first: at most three are alive at any time
                    teardown_pipeline(retired.pop(), self.device)
                pipe, files = self._build_pipeline(*key, checkpoint=None)
                try:
                    pipe.schedule_run()  # the first batches decode now, on DALI's threads
                except RuntimeError as e:
                    raise self._explain(e, files) from e
                return pipe, files

            self._ahead.start(keys, build)

    def _finish_epoch(self) -> None:
        while self._batch < self._reader_batches:
            self._run(self._pipeline())
            self._batch += 1
        self._epoch += 1
        self._batch = 0
        if self.split == "train":
            self._retire()  # the next epoch reads another list

    def _run(self, pipe, *args):
        # DALI's scheduled API throughout (what pipe.run() does inside), since a pipeline built ahead has had
        # its first schedule_run() already and DALI refuses to mix that with run().
        # Keeps `prefetch` iterations in flight ahead of the one read (the first schedule_run schedules that many
        # at once), but none past the last batch the pipeline is read for: one scheduled there would run into its
        # reader's next epoch (for shards, refilling the shuffle buffer) on the cores the next pipeline needs.
        depth = self._pipe_depth
        want = depth + self._pipe_reads
        if self._pipe_batches is not None:
            want = min(want, self._pipe_batches)
        try:
            if self._pipe_sched < want:  # always true for the first read (want >= 1)
                pipe.schedule_run()
                self._pipe_sched += depth if self._pipe_sched == 0 else 1
            self._pipe_reads += 1
            return pipe.outputs(*args)
        except RuntimeError as e:
            self._drop_pipeline()  # DALI: "Current pipeline object is no longer valid"
            raise self._explain(e, self._files) from e

    def _explain(self, error: RuntimeError, files: Sequence[str]) -> DataError:
        """The DataError for a DALI failure while reading ``files`` (what the pipeline reads, in order)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    def _pipeline(self):
        key = self._key(self._batch)
        if self._pipe is None or self._pipe_key != key:
            self._retire()  # a training segment's pipeline that read all its batches
            # A pipeline built ahead starts at its first batch: it serves no restored position.
            at_start = self._batch == (self._segments(key[0])[key[1]] if self.split == "train" else 0)
            ready = self._ahead.take(key) if self._pending_checkpoint is None and at_start else None
            if ready is not None:
                pipe, self._files = ready
            else:
                pipe, self._files = self._build_pipeline(*key, checkpoint=self._pending_checkpoint)
            self._pipe, self._pipe_key = pipe, key
            self._pipe_depth = self._segment_kwargs(*key)["prefetch_queue_depth"]
            self._pipe_sched = self._pipe_depth if ready is not None else 0
            self._pipe_reads = 0
            # A training pipeline is read from here to its segment's end (the last batch dropped), then retired.
            self._pipe_batches = self._segments(key[0])[key[1] + 1] - self._batch if self.split == "train" else None
            self._pending_checkpoint = None
        return self._pipe

    def _build_pipeline(self, epoch: int, segment: int, *, checkpoint: bytes | None) -> tuple[Any, tuple[str, ...]]:
        """A built pipeline for ``segment`` of ``epoch`` (restored from ``checkpoint``) and the files it reads, for
        error messages.

        Also runs on :class:`~pipeline.data.ahead.PipelineAhead`'s thread: it may read only what does not change
        while an epoch runs.
        """
        raise NotImplementedError

    def _run_args(self, epoch: int, segment: int, checkpoint: bytes | None) -> dict[str, Any]:
        """The pipeline arguments that make a run reproducible: its seed and the DALI checkpoint it starts from."""
        return {
            "seed": _pipeline_seed(self.seed, self.rank, self.split, epoch, segment),
            "enable_checkpointing": self.split == "train",
            "checkpoint": checkpoint,
        }

    def _build_checked(self, pipe, files: Sequence[str], *, samples: int) -> None:
        try:
            pipe.build()
        except RuntimeError as e:
            raise self._explain(e, files) from e
        check_reader_epoch(pipe, samples)

    def _drop_pipeline(self) -> None:
        pipe, self._pipe, self._pipe_key = self._pipe, None, None
        for old in [*self._retired, *([pipe] if pipe is not None else [])]:
            dispose_pipeline(old, self.device)
        self._retired = []

    def _retire(self) -> None:
        """Put aside the current pipeline, which has read everything it was built for, for the thread that builds the
        next pipeline ahead to tear down first. Not torn down here: even starting a thread for it, with DALI's
        teardown then holding the GIL in bursts, put milliseconds into the epoch boundary."""
        if self._pipe is not None:
            self._retired.append(self._pipe)
        self._pipe, self._pipe_key = None, None

    def _next_batch(self, pipe, valid: int):
        if self.decoder == "mixed":
            # Outputs bound to torch's stream: no host sync, and DALI may only reuse their memory
            # once that stream has passed the copies queued below.
            stream = torch.cuda.current_stream(self.device)
            outputs = self._run(pipe, stream)
        else:
            outputs = self._run(pipe)
            stream = None
        *image_outputs, labels = outputs
        y = self._label_tensor(labels, stream)[:valid]
        if self.eval_mode == "multiscale":
            # Sizes differ between images: one (3, H, W) tensor per image and scale.
            x = [[self._to_torch(out[i], stream) for i in range(valid)] for out in image_outputs]
            return x, y
        x = self._to_torch(image_outputs[0].as_tensor(), stream)
        return (x[:valid] if valid < self.batch_size else x), y

    def _label_tensor(self, labels, stream) -> torch.Tensor:
        """The batch's labels as int64 of shape (batch,) on the device, from the pipeline's last output."""
        return self._to_torch(labels.as_tensor(), stream).view(-1).long()

    def _to_torch(self, tensor, stream) -> torch.Tensor:
        if stream is not None:
            dtype = torch.int32 if tensor.dtype == types.DALIDataType.INT32 else torch.float32
            out = torch.empty(tensor.shape(), dtype=dtype, device=self.device)
            feed_ndarray(tensor, out, cuda_stream=stream)
            return out
        # Copied out of DALI's buffers via numpy; pinned when headed for a GPU (decoder="cpu" on a
        # GPU machine) so the upload is asynchronous.
        out = torch.from_numpy(np.array(tensor))
        if self.device.type == "cuda":
            if out.is_floating_point():
                return out.pin_memory().to(self.device, non_blocking=True)
            return out.to(self.device)
        return out

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.split == "train":
            # A pipeline is rebuilt from (seed, rank, epoch, segment): at its first batch no checkpoint is needed.
            live = self._pipe is not None and self._pipe_key == self._key(self._batch)
            pipeline = self._pipe.checkpoint() if live else self._pending_checkpoint
        else:
            pipeline = None  # every evaluation pass is identical; only the counter matters
        return {**self._position_state(), "pipeline": pipeline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        pipeline = state.get("pipeline")
        starts = self._segments(int(state["epoch"]))[:-1] if self.split == "train" else [0]
        if self.split == "train" and pipeline is None and state["batch"] not in starts:
            raise DataError(
                f"data state at epoch {state['epoch']}, batch {state['batch']} has no DALI checkpoint, "
                f"so the position cannot be restored exactly; resume from a checkpoint written by "
                f"DaliSource.state_dict()"
            )
        self._seek(int(state["epoch"]), int(state["batch"]) if self.split == "train" else 0)
        if self.split == "train" and state["batch"] in starts:
            # A segment's pipeline starts fresh from (seed, rank, epoch, segment). A checkpoint here can only be the
            # state of the pipeline before it (as written at the end of the yielded batches before the rest had a
            # pipeline of its own): nothing yielded depends on it.
            pipeline = None
        self._pending_checkpoint = bytes(pipeline) if pipeline is not None else None  # _pipeline() rebuilds from it

    def _seek(self, epoch: int, batch: int) -> None:
        self._drop_pipeline()  # rebuilt lazily for the new position
        self._ahead.drop()
        self._pending_checkpoint = None
        super()._seek(epoch, batch)


class DaliSource(DaliPipelineSource):
    """One split of an ImageFolder dataset for one rank; see the module docstring for epoch rules.

    Iterating yields the rest of the current epoch. For training a new ``iter()`` continues where
    the last one stopped (that is what resuming needs); an epoch that was fully consumed moves on
    to the next. For evaluation each ``iter()`` is one complete pass, even if the previous pass
    was abandoned half-way.
    """

    state_kind = "dali"

    def __init__(self, index: SplitIndex, options: SourceOptions, *, settings: DaliSettings, root: str = "") -> None:
        self.index = index
        super().__init__(options, num_samples=len(index), path=index.path, settings=settings, root=root or index.path)

    def shard(self, epoch: int) -> list[int]:
        """Indices into ``index.files`` that this rank reads in ``epoch``, padding included."""
        if self.split == "train":
            chosen = epoch_order(self.num_samples, self.seed, epoch)[self._start : self._stop].tolist()
        else:
            chosen = list(range(self._start, self._stop))
        # Padding (read, never yielded) repeats the shard from its start: a whole number of batches.
        need = self._reader_batches * self.batch_size - len(chosen)
        return chosen + [chosen[k % len(chosen)] for k in range(need)]

    def _build_pipeline(self, epoch: int, segment: int, *, checkpoint: bytes | None) -> tuple[Any, tuple[str, ...]]:
        """The segment's reader batches of :meth:`shard`: the files and labels of the split's index."""
        bounds = self._segments(epoch)
        order = self.shard(epoch)[bounds[segment] * self.batch_size : bounds[segment + 1] * self.batch_size]
        files = tuple(self.index.files[i] for i in order)
        labels = [self.index.labels[i] for i in order]
        build = train_pipeline if self.split == "train" else val_pipeline
        kwargs = self._segment_kwargs(epoch, segment)
        pipe = build(files=files, labels=labels, **kwargs, **self._run_args(epoch, segment, checkpoint))
        self._build_checked(pipe, files, samples=len(order))
        return pipe, files

    def _explain(self, error: RuntimeError, files: Sequence[str]) -> DataError:
        return explain_pipeline_error(error, files=files, root=self.root)


def check_reader_epoch(pipe, samples: int) -> None:
    """The loader's epoch arithmetic holds only if DALI's reader reads exactly the ``samples`` it was given."""
    meta = pipe.reader_meta(READER_NAME)
    if meta["epoch_size"] != samples or meta["epoch_size_padded"] != samples:
        raise RuntimeError(
            f"DALI reader epoch {meta} does not match the loader's list of {samples} "
            f"samples; the DALI version changed behaviour"
        )
