"""Session fixtures shared by test modules."""

import os

import pytest

import slurm_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster (tests/slurm_cluster.py), installed with apt when missing. Where it cannot be
    installed the tests that use it skip and say why; in CI (CI=true) they fail instead."""
    why = slurm_cluster.install()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the SLURM test cluster cannot be installed: {why}")
        pytest.skip(why)
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        os.environ.pop("SLURM_CONF", None)
