"""Stages under `launcher.kind: slurm`, on a real one-node SLURM cluster (the `slurm` fixture, tests/conftest.py):
SFT submitted with sbatch, a stopped orchestrator, a killed one (whose job the next run cancels) and a cancelled
job each leaving no manifest, then a rerun from inside an allocation (a job step) with two processes that
rendezvous over gloo, against the same stage run locally. (The teacher's vLLM server jobs, one per node, run on the
two-node cluster of tests/test_slurm_nodes.py.) The unit tests above them need no cluster: which resources each
stage gets, the flags they become, and the recipe checks."""

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.chat import build_tokenizer
from alignment.config import InputError, JobResources, load_recipe
from alignment.launcher.slurm import SlurmJob, batch_flags
from alignment.stage_table import job_kind
from alignment.manifest import write_json_atomic
from alignment.inputs import stage_dir
from alignment.round import run_stage
from alignment.stage_table import STAGES, round_stages
from alignment.tiny_models import random_llama, save
from slurm_cluster import job_state

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny.yaml"
EPOCHS = 1
SFT = ["sft.report_to=[]", f"sft.num_train_epochs={EPOCHS}", "sft.per_device_train_batch_size=4", "sft.logging_steps=1",
       "sft.learning_rate=1e-3", "sft.lr_scheduler_type=constant", "sft.warmup_steps=0", "sft.distributed=ddp",
       "sft.num_processes=2"]


# --- no cluster needed ------------------------------------------------------------------------------------------


def test_each_stage_runs_with_the_resources_of_its_kind():
    plain = load_recipe(TINY, [])
    judged = load_recipe(TINY, ["reward.judge={template: 'Rate {prompt} {response}'}"])
    expected = {"bootstrap": "train", "import_gguf": "train", "teacher_eval": "generate", "generate": "generate",
                "revise": "generate", "score": "eval", "dialogs": "generate",
                "select": None, "reward_training": "train", "sft": "train", "policy_pairs": "generate", "dpo": "train",
                "eval": "eval", "promote": None}
    assert {s: job_kind(plain, s) for s in STAGES} == expected
    assert job_kind(judged, "score") == "generate"  # the judge is the teacher


def test_resources_become_sbatch_flags():
    res = JobResources(nodes=2, gpus_per_node=8, partition="gpu", time_limit="1-00:00:00", account="lab",
                       cpus_per_task=16, sbatch_args=["--qos=high", "--exclusive"])
    assert batch_flags(res) == ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=16",
                                "--partition=gpu", "--time=1-00:00:00", "--account=lab", "--qos=high", "--exclusive"]
    assert batch_flags(JobResources()) == ["--nodes=1", "--ntasks-per-node=1"]  # the cluster's defaults


@pytest.mark.parametrize("overrides,error", [
    (["launcher.kind=slurm", "launcher.generate.nodes=2"], "starts one teacher server per node"),
    (["launcher.kind=slurm", "launcher.train.nodes=2"], "sft.distributed is null"),
    (["launcher.kind=slurm", "launcher.eval.nodes=2"], "eval.nodes must be 1"),
])
def test_more_nodes_than_a_stage_can_use_is_refused(overrides, error):
    with pytest.raises(InputError, match=error):
        load_recipe(TINY, overrides)


def test_more_nodes_where_a_stage_spans_them_is_accepted():
    r = load_recipe(TINY, ["launcher.kind=slurm", "launcher.generate.nodes=2", "teacher.backend=openai",
                           "teacher.serve=true", "launcher.train.nodes=2", "sft.distributed=ddp",
                           "dpo.distributed=fsdp", "reward_training.distributed=ddp"])
    assert (r.launcher.generate.nodes, r.launcher.train.nodes) == (2, 2)


def test_under_slurm_the_training_nodes_gpus_count_not_the_login_nodes():
    from alignment.preflight import machine_problems

    fsdp = ["sft.distributed=fsdp", "sft.num_processes=8", "launcher.train.gpus_per_node=8"]
    assert machine_problems(load_recipe(TINY, [*fsdp, "launcher.kind=slurm"])) == []
    here = machine_problems(load_recipe(TINY, fsdp))  # local: this machine's GPUs (none here)
    assert torch.cuda.is_available() or any("sft.distributed: fsdp shards weights over GPUs" in p for p in here)
    cpu_nodes = machine_problems(load_recipe(TINY, ["sft.distributed=fsdp", "launcher.kind=slurm"]))
    assert any("sft.distributed: fsdp shards weights over GPUs" in p for p in cpu_nodes)


def test_without_slurm_commands_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(InputError, match="`sbatch` is not on PATH"):
        SlurmJob("align:x:r1:train:sft", JobResources(), "true", tmp_path, tmp_path / "log", {})


def test_a_finished_round_needs_no_cluster_and_a_due_stage_says_what_is_missing(tmp_path, monkeypatch):
    """Where stages run is in no fingerprint: a round finished locally is up to date under SLURM (so the README's
    cluster commands resume it), and only a stage that is due needs `sbatch`."""
    from test_stage_table import finish_rounds

    finish_rounds(load_recipe(TINY, [f"runs_dir={tmp_path}"]), rounds=(1,))
    recipe = load_recipe(TINY, [f"runs_dir={tmp_path}", "launcher.kind=slurm", "launcher.train.gpus_per_node=8"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert [run_stage(recipe, 1, s.name, recipe_file=TINY, overrides=[]) for s in round_stages(recipe, 1)] == \
        [False] * len(round_stages(recipe, 1))
    (stage_dir(recipe, 1, "sft") / "manifest.json").unlink()
    with pytest.raises(InputError, match="`sbatch` is not on PATH"):
        run_stage(recipe, 1, "sft", recipe_file=TINY, overrides=[])


def test_the_cluster_fixture_says_why_it_cannot_install(monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)  # no daemons, and no apt-get
    assert "apt-get (as root) is not available" in slurm_cluster.install()
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: f"/usr/sbin/{name}")
    assert slurm_cluster.install() is None  # installed: nothing to do


# --- on the cluster -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random Llama with head size 32 (vLLM's CPU kernels need at least 32), and 64 SFT rows."""
    tmp = tmp_path_factory.mktemp("slurm-model")
    tok = build_tokenizer()
    path = save(random_llama(tok, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2), tok, tmp / "base")
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i % 9}?"}],
             "completion": [{"role": "assistant", "content": f"{i} + {i % 9} = {i + i % 9}"}]} for i in range(64)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, tmp / "sft.jsonl"


def stage(name: str, runs: Path, model: Path, *overrides, wait=True):
    """`align stage` as a user runs it, from the repository (the jobs' working directory)."""
    args = [sys.executable, "-m", "alignment.cli", "stage", name, "--round", "1", "--recipe", TINY, f"runs_dir={runs}",
            "student.source=path", f"student.model_name_or_path={model}", *overrides]
    if wait is None:
        return args
    if not wait:
        return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True)


def selected(runs: Path, sft_rows: Path) -> Path:
    """A completed select stage (its manifest) naming the SFT rows: what the sft stage reads."""
    folder = runs / "tiny" / "round-1" / "select"
    folder.mkdir(parents=True)
    write_json_atomic(folder / "manifest.json", {"fingerprint": "f", "outputs": {"sft": str(sft_rows)},
                                                 "wall_time_s": 0})
    return runs / "tiny" / "round-1" / "sft"


def stopwatch():
    """lap(what): prints the seconds since the last lap (pytest -s shows them), for the time budget."""
    last = [time.time()]

    def lap(what: str) -> None:
        print(f"{time.time() - last[0]:6.1f} s  {what}")
        last[0] = time.time()
    return lap


HANG_S = 900  # only against a hang: every wait below ends on a state (a job's, a process's), however slow the machine


def running_job(folder: Path, proc, known: int) -> str:
    """The id of the job the stage submits after the `known` ones, once SLURM runs it. Waits for as long as the
    stage is alive and its job is not submitted yet or still queued (a loaded machine starts Python slowly); fails
    at once when the stage ends or the job ends without running."""
    start, state = time.time(), None
    while time.time() - start < HANG_S and proc.poll() is None:
        ids = (folder / "slurm_jobs").read_text().split() if (folder / "slurm_jobs").exists() else []
        if len(ids) > known:
            state = job_state(ids[-1])
            if state == "RUNNING":
                return ids[-1]
            assert state in ("", "PENDING", "CONFIGURING"), f"job {ids[-1]} went {state} before it ran"
        time.sleep(0.2)
    # the stage's own lines say why it ran ("resuming an interrupted run" or not) and what it did with its jobs
    said = f"{proc.stdout.read()}{proc.stderr.read()}" if proc.poll() is not None else f"still waiting after {HANG_S} s"
    raise AssertionError(f"no running job after the {known} known (stage exit {proc.poll()}, last job state "
                         f"{state!r}, jobs recorded now: {(folder / 'slurm_jobs').read_text().split() if (folder / 'slurm_jobs').exists() else []}): {said}")


def job_processes(job: str) -> dict[int, tuple[list[str], str, str]]:
    """Every process of a SLURM job on this node (its environment names the job): pid -> (argv, step id, state)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
            if env.get("SLURM_JOB_ID") != job:
                continue
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            found[int(proc.name)] = (argv, env.get("SLURM_STEP_ID", ""), (proc / "stat").read_text().split(") ")[1][0])
        except (OSError, ValueError):  # not a pid folder, or the process ended while read
            continue
    return found


def hold(job: str, folder: Path, workers: int = 2) -> None:
    """Suspend the job once its step's `workers` training processes exist (rank 0 writes the manifest), and make
    sure they are stopped. Suspending earlier races the step's launch: tasks that slurmd starts while the suspend
    is delivered run on unstopped (seen here, with the step's launch reply timing out a minute later). The
    trainers import for seconds before they train, so a suspend as they appear stops them long before a manifest.
    `scontrol suspend` returns before slurmd has signalled anything, so a trainer counts as escaped only when it
    still runs seconds later; then the job is resumed and suspended again (a second suspend alone does nothing)."""
    def trainers() -> list[str]:  # their states: T stopped, Z ended, R/S/D running
        return [state for argv, step, state in job_processes(job).values() if step == "0"
                and "alignment.runner" in argv and "accelerate.commands.launch" not in argv
                and Path(argv[0]).name.startswith("python")]

    start = time.time()
    while len(trainers()) < workers:
        assert time.time() - start < HANG_S, f"job {job}'s {workers} training processes never started"
        assert not (folder / "manifest.json").exists(), "the orphan finished before it could be held"
        time.sleep(0.1)
    subprocess.run(["scontrol", "suspend", job], check=True, capture_output=True)
    last, stopped_since = time.time(), None
    while time.time() - start < HANG_S:
        assert not (folder / "manifest.json").exists(), "the orphan finished before it could be held"
        if all(state in "TZ" for state in trainers()):
            stopped_since = stopped_since or time.time()
            if time.time() - stopped_since > 1.0:  # on looks a second apart
                return
        else:
            stopped_since = None
            if time.time() - last > 3.0:  # the suspend has had time to take effect, and missed some
                subprocess.run(["scontrol", "resume", job], capture_output=True)
                subprocess.run(["scontrol", "suspend", job], check=True, capture_output=True)
                last = time.time()
        time.sleep(0.2)
    raise AssertionError(f"job {job}'s training processes never appeared stopped: {job_processes(job)}")


@pytest.mark.slow
def test_sft_under_slurm_survives_a_stop_a_kill_and_a_cancel_and_matches_the_local_run(slurm, model, tmp_path):
    base, rows = model
    slurm_args = [*SFT, "launcher.kind=slurm", "launcher.train.cpus_per_task=2"]
    lap = stopwatch()
    folder = selected(tmp_path / "slurm", rows)
    # SIGTERM (what `scancel` of the orchestrator's own job sends) stops the orchestrator, which cancels its job
    proc = stage("sft", tmp_path / "slurm", base, *slurm_args, wait=False)
    first = running_job(folder, proc, 0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGTERM
    assert job_state(first) == "CANCELLED" and not (folder / "manifest.json").exists()
    lap("stopped orchestrator")
    # an orchestrator killed with -9 cancels nothing: its job runs on, until the next run cancels it first
    proc = stage("sft", tmp_path / "slurm", base, *slurm_args, wait=False)
    orphan = running_job(folder, proc, 1)
    proc.kill()
    proc.wait()
    assert job_state(orphan) == "RUNNING"
    # held still (SLURM stops its processes), so that it is alive when the next run starts however slow that start
    # is on a loaded machine: a finished orphan would leave a current manifest, and the next run nothing to cancel
    hold(orphan, folder)
    lap("killed orchestrator")
    # a job that ends without finishing (cancelled, as a preempted or timed-out job is) fails the stage, no manifest
    proc = stage("sft", tmp_path / "slurm", base, *slurm_args, wait=False)
    second = running_job(folder, proc, 2)
    assert job_state(orphan) == "CANCELLED"
    subprocess.run(["scancel", second], check=True)
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 2 and "stage sft of round 1 failed" in err and "Traceback" not in err
    assert f"SLURM job {second} ended CANCELLED" in out and "resuming an interrupted run" in out
    assert not (folder / "manifest.json").exists()
    lap("cancelled job")
    # running it again completes: here from inside an allocation (the orchestrator itself a batch job, as on a
    # cluster after `salloc`), so the stage is a job step (srun), two processes over gloo
    args = stage("sft", tmp_path / "slurm", base, *slurm_args, wait=None)
    orchestrator = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/orchestrator.log",
                                   f"--chdir={ROOT}", "--wrap", shlex.join(args)], capture_output=True, text=True,
                                  check=True).stdout.strip()
    while job_state(orchestrator) not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(0.5)
    log = (tmp_path / "orchestrator.log").read_text()
    assert job_state(orchestrator) == "COMPLETED", log[-3000:]
    assert "resuming an interrupted run" in log and (folder / "slurm-step.log").exists()
    assert (folder / "slurm_jobs").read_text().split() == [first, orphan, second]  # a step is no new job
    lap("run in an allocation")
    local_folder = selected(tmp_path / "local", rows)
    local = stage("sft", tmp_path / "local", base, *SFT)
    assert local.returncode == 0, local.stderr[-3000:]
    lap("local run")
    history = [json.loads((f / "log_history.json").read_text()) for f in (folder, local_folder)]
    losses = [[h["loss"] for h in hist if "loss" in h] for hist in history]
    assert len(losses[0]) == 8 * EPOCHS and losses[0] == pytest.approx(losses[1], rel=1e-4)  # 64 / (2 x 4) = 8 a epoch
    weights = [load_file(f / "model" / "model.safetensors") for f in (folder, local_folder)]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)
    assert json.loads((folder / "manifest.json").read_text())["stage"] == "sft"


def served_generate(runs: Path, base: Path, *overrides) -> subprocess.CompletedProcess:
    """The generate stage under SLURM with the teacher served by vLLM server jobs the stage starts (run on two
    nodes by tests/test_slurm_nodes.py)."""
    # the KV cache by size: a share of host memory is checked against what is free when the server starts
    engine = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 256, "enforce_eager": True,
              "enable_chunked_prefill": False}
    return stage("generate", runs, base, "launcher.kind=slurm", "launcher.generate.cpus_per_task=1",
                 "teacher.source=path", f"teacher.model_name_or_path={base}", "teacher.backend=openai",
                 "teacher.serve=true", f"teacher.engine={json.dumps(engine)}", "sampling.num_samples=2",
                 "sampling.max_new_tokens=8", *overrides)
