"""The loader's epoch boundary (pipeline.data.loader), for an image folder and a sharded split alike: the pipelines
an epoch needs are built ahead on a background thread, the dropped rest is decoded ahead by a pipeline of its own,
no pipeline decodes a batch past the last one it is read for, and finished pipelines are torn down, not piled up.

No timings here (the data benchmark, benchmarks/data_throughput.py, measures the gaps): these tests check the
structure that makes a boundary cost nothing, with real DALI on the CPU.
"""

from __future__ import annotations

import os
import threading
import weakref

import pytest
import torch
from datatree import ids, write_sharded_split
from nvidia.dali import Pipeline

from pipeline.data import build_source
from pipeline.data.loader import DaliSource

CPU = torch.device("cpu")
EPOCHS = 4


@pytest.fixture(params=["files", "shards"])
def train_source(request, tree, tmp_path, make_cfg):
    """A one-rank training source whose epoch ends with a dropped rest: 23 images at batch 4 (5 batches + 3)."""

    # Written once: the sources of one test share it. Writing it again for each would rewrite files that an earlier
    # source's pipelines still read (DALI maps them), and a mapped file cut short is a bus error in DALI's threads.
    if request.param == "files":
        root, _ = tree({"train": {"a": 11, "b": 12}, "val": {"a": 1, "b": 1}})
        extra = {}
    else:
        root = str(tmp_path / "sharded")
        write_sharded_split(os.path.join(root, "train"), [7, 5, 6, 5])
        extra = {"root": root, "format": "shards"}

    def make(**cfg) -> DaliSource:
        config = make_cfg(batch_size=4, **extra, **cfg)
        return build_source(config, split="train", rank=0, world_size=1, device=CPU, seed=3, num_classes=2, root=root)

    return make


def test_an_epoch_boundary_waits_for_no_pipeline_build(train_source):
    src = train_source()
    assert len(src) == 5 and src._reader_batches == 6  # each epoch drops a rest
    built_on: list[tuple[tuple[int, int], str]] = []
    real = src._build_pipeline

    def build(epoch, segment, *, checkpoint):
        built_on.append(((epoch, segment), threading.current_thread().name))
        return real(epoch, segment, checkpoint=checkpoint)

    src._build_pipeline = build
    seen = []
    for _ in range(EPOCHS):
        seen.append([i for x, _ in src for i in ids(x)])
    # Only the very first pipeline is built while the trainer waits; every later one (each epoch's, and the rest's
    # that the epoch drops) was built, and its first batches decoded, on the thread that builds ahead.
    on_main = [key for key, thread in built_on if thread == threading.main_thread().name]
    assert on_main == [(0, 0)]
    rest = src._segments(0)[-2:]
    assert rest == [5, 6]  # the rest: a segment of its own, after the five yielded batches
    assert {key for key, _ in built_on} >= {(e, s) for e in range(EPOCHS) for s in range(len(src._segments(e)) - 1)}
    assert all(len(s) == len(set(s)) == 20 for s in seen)


def test_no_pipeline_decodes_past_the_last_batch_it_is_read_for(train_source, monkeypatch):
    # An iteration scheduled past a pipeline's last batch runs into its reader's next epoch: decoding (and, for
    # shards, a shuffle buffer refilled) that nobody reads, on the cores the next epoch's pipeline needs.
    # Counted on each pipeline object, all of them held until the end: an id() may be reused once one is freed.
    pipes: list[Pipeline] = []
    real_schedule, real_outputs = Pipeline.schedule_run, Pipeline.outputs

    def schedule_run(self):
        if not hasattr(self, "_test_scheduled"):
            pipes.append(self)
            self._test_scheduled, self._test_read = self.prefetch_queue_depth, 0  # the first call fills the queue
        else:
            self._test_scheduled += 1
        return real_schedule(self)

    def outputs(self, *args, **kw):
        self._test_read += 1
        return real_outputs(self, *args, **kw)

    monkeypatch.setattr(Pipeline, "schedule_run", schedule_run)
    monkeypatch.setattr(Pipeline, "outputs", outputs)
    src = train_source(prefetch=3)
    for _ in range(EPOCHS):
        assert len(list(src)) == 5
    for pipe in pipes:
        # What a pipeline's first schedule_run() fills its queue with, then one per batch read, never more.
        depth, n, read = pipe.prefetch_queue_depth, pipe._test_scheduled, pipe._test_read
        assert n <= max(read, depth), (n, read, depth)
    assert sum(pipe._test_read for pipe in pipes) == EPOCHS * 6  # 5 yielded + the rest, per epoch


def test_finished_pipelines_are_torn_down_not_piled_up(train_source, monkeypatch):
    # Marked on each pipeline object (an id() may be reused once one is freed); held weakly, so that a pipeline
    # freed without an explicit shutdown does not count as alive.
    alive: list[weakref.ref] = []  # every pipeline that ran (each is scheduled before it is read)
    shut: list[weakref.ref] = []
    real_schedule, real_shutdown = Pipeline.schedule_run, Pipeline._shutdown

    def schedule_run(self):
        if not hasattr(self, "_test_seen"):
            self._test_seen = True
            alive.append(weakref.ref(self))
        return real_schedule(self)

    def shutdown(self):
        if not getattr(self, "_test_shut", False):
            self._test_shut = True
            shut.append(weakref.ref(self))
        return real_shutdown(self)

    monkeypatch.setattr(Pipeline, "_shutdown", shutdown)
    src = train_source()
    for _ in range(EPOCHS):
        list(src)
        # At most: the last epoch's main and rest pipelines (put aside, for the next build ahead to tear down
        # first), and the next epoch's, built ahead.
        assert len(src._retired) <= 2
    assert len(shut) >= 2 * (EPOCHS - 1)  # each finished epoch's two pipelines were shut down
    live = [ref for ref in alive if ref() is not None and not getattr(ref(), "_test_shut", False)]
    assert len(live) <= 3


def test_a_state_at_the_rest_with_a_pipeline_checkpoint_resumes_into_the_next_epoch(train_source):
    # Before the rest had a pipeline of its own, a state written after an epoch's last yielded batch carried the
    # epoch pipeline's DALI checkpoint. Nothing yielded depends on it: such a state resumes exactly.
    src = train_source()
    list(src)
    expected = [(x.clone(), y.clone()) for x, y in src]  # epoch 1, uninterrupted
    other = train_source()
    next(iter(other))
    state = other.state_dict()
    assert state["pipeline"] is not None  # mid-epoch: the live pipeline's checkpoint
    state["batch"] = len(other)  # as if written after the last yielded batch of epoch 0
    resumed = train_source()
    resumed.load_state_dict(state)
    got = list(resumed)  # epoch 0 has nothing left to yield: its rest is read and dropped, then epoch 1
    assert resumed.epoch == 2
    assert len(got) == len(expected) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected, strict=True))
