"""Shared pytest fixtures. Each fixture below is self-contained; add new ones without touching them."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can `import s3_server`
# pipeline.core.distributed keeps DeepSpeed from JIT-building its CPU comm op (tests/test_startup.py); should a test
# build any op, it goes to a folder per checkout (inherited by every process a test starts), not to
# ~/.cache/torch_extensions, which every checkout on the machine shares and would rebuild in turn.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))


# -- S3 (checkpoint storage) ---------------------------------------------------------------------------
@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    """A real S3-compatible server (moto_server) for this test only; stopped when the test ends.

    Use credentials "testing"/"testing" (``s3_server.aws_env(url)`` gives a child process the env)."""
    from s3_server import start_moto_server

    with start_moto_server(log_dir=tmp_path) as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """``s3://test-bucket`` created on this test's ``s3_endpoint``."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
    fs.mkdir("test-bucket")
    return "s3://test-bucket"


# -- MLflow tracking server ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow store that each test's server copies (saves ~10 s per server)."""
    from mlflow_server import make_template_db

    return make_template_db(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")


@pytest.fixture
def mlflow_server(tmp_path: Path, mlflow_template_db: Path) -> Iterator[MlflowServer]:  # noqa: F821
    """A real ``mlflow server`` on 127.0.0.1 for this test only (``.uri``; ``.stop(kill=True)`` and
    ``.start()`` for an outage on the same port and store); stopped when the test ends."""
    from mlflow_server import MlflowServer

    with MlflowServer(tmp_path / "mlflow", template_db=mlflow_template_db) as server:
        yield server
