"""Session fixtures shared by test modules."""

import os

# libgomp's threads spin while they wait for work, which on 2 cores shared by two test workers (and by whatever
# else runs here) starves the thread they wait for: the real-model recipe's eval took 71 s beside two busy
# processes with the default policy, 19 s with PASSIVE, 11-14 s on an idle machine (measured here, 2026-12-04).
# libgomp reads it when torch loads, so it is set before any test module imports torch; stages inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One intra-op thread per process: two test workers already fill the 2 cores, and a second torch thread per process
# only waits for a core. The round-1 fixture of the e2e file took 68 s beside a CPU-bound busy loop with torch's
# default, 53 s with one thread (measured here, 2026-12-06).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

import slurm_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster (tests/slurm_cluster.py), installed with apt when missing. Where it cannot be
    installed the tests that use it skip and say why; in CI (CI=true) they fail instead."""
    with slurm_cluster.running(slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")), slurm_cluster.install()) as c:
        yield c
    os.environ.pop("SLURM_CONF", None)


# The files that take minutes, longest first (their summed test times in a full run here: e2e about 21 minutes,
# the real model 9, vLLM generation 6, SLURM 5, training scale 4.5, vLLM eval 3). `make test` hands whole files to
# two workers in this order (--no-loadscope-reorder: xdist would otherwise re-sort files by their number of tests,
# and the real-model file, one test, came last and ran alone for 9 minutes).
LONGEST_FIRST = ["test_rehearsal.py", "test_round_e2e.py", "test_real_model.py", "test_code_recipe.py",
                 "test_vllm_generate.py", "test_slurm.py", "test_slurm_nodes.py", "test_training_scale.py", "test_eval_vllm.py", "test_fsdp_save.py", "test_code_verifier.py",
                 "test_bad_input.py", "test_lm_eval_tasks.py", "test_pinned_revisions.py", "test_memory_plan.py",
                 "test_revise.py", "test_eval_stage.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
