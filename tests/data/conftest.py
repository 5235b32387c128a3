"""Fixtures for the data-layer tests: small DataConfigs and generated ImageFolder trees."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # the helpers module, whatever pytest's import mode

from datatree import MEAN, STD, write_tree  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402


@pytest.fixture
def make_cfg() -> Callable[..., DataConfig]:
    def make(**overrides) -> DataConfig:
        # Lighting off: the tests read image identities back from exact pixel values.
        base = dict(
            source="folder",
            batch_size=4,
            image_size=16,
            val_resize=18,
            num_threads=1,
            prefetch=2,
            decoder="cpu",
            mean=list(MEAN),
            std=list(STD),
            scale=[16, 24],
            lighting=0.0,
        )
        base.update(overrides)
        return DataConfig(**base)

    return make


@pytest.fixture
def tree(tmp_path) -> Callable[..., tuple[str, dict[str, int]]]:
    """``tree({split: {class: count}}, ...) -> (root, {path: index})`` in a fresh folder, each call its own: DALI maps
    the files it reads, so rewriting a tree that a live pipeline reads would be a bus error in DALI's threads."""
    made = []

    def make(layout: dict[str, dict[str, int]], **kw) -> tuple[str, dict[str, int]]:
        root = str(tmp_path / ("ds" if not made else f"ds{len(made) + 1}"))
        made.append(root)
        return root, write_tree(root, layout, **kw)

    return make
