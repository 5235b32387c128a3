"""The two-node SLURM cluster as a module fixture.

It comes up once per test module (about a second once SLURM is installed; apt-get installs it the first
time) and is torn down when the module's tests are done, also after a failure or Ctrl-C, so nothing of
it is left while the rest of the suite runs. Where it cannot run (not root, no apt-get to install SLURM,
no network namespaces) the tests that use it are skipped with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/: the shared s3_server and mlflow_server helpers

from slurm_cluster import ClusterUnavailable, SlurmCluster, leftovers  # noqa: E402


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        cluster.up()
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM test cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.down()
    left = leftovers()
    assert not left, f"cluster teardown left {left} behind"
