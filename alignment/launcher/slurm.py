"""Where a stage's process runs under `launcher.kind: slurm`: a SLURM batch job, or a job step (`srun`) when the
orchestrator itself runs inside an allocation (SLURM_JOB_ID is set).

The job runs the command the local runner runs (`python -m alignment.runner job.json`, or `accelerate launch` for a
distributed trainer) from the same working directory, so runs_dir must be on storage the nodes share; the
orchestrator keeps nothing outside it. Training runs one task per node, each an `accelerate launch` with machine
rank SLURM_NODEID and the step's first node as the rendezvous, on a port chosen on that node. A job SLURM requeues
(preempted, with requeue on) is waited for on its way back to PENDING and after. The job ids a stage submitted are
listed in its folder (`slurm_jobs`): the next run of that stage cancels any still alive (left by an orchestrator
killed with -9), and an orchestrator that is stopped (SIGTERM, or `scancel` of its own job) cancels its jobs on
the way out.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from alignment.backends.vllm_server import VLLMServer, free_port, server_command
from alignment.config import Backend, InputError, JobResources, Recipe, TeacherConfig
from alignment.launcher.local import stage_command
from alignment.manifest import write_json_atomic
from alignment.stage_table import asks_teacher, job_kind, trainer_config

JOBS = "slurm_jobs"  # in a stage's folder: the ids of the SLURM jobs its runs submitted, one a line
# SLURM's job state codes (squeue(1), JOB STATE CODES) that a job never leaves; GONE: purged before we saw it end.
# PREEMPTED is one only for a job that will not be requeued (Requeue=0: preemption cancelled it); a requeued job
# passes through REQUEUED (REQUEUE_FED, or held: REQUEUE_HOLD, SPECIAL_EXIT) back to PENDING, and is waited for.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "REVOKED", "GONE"}
HELD = {"REQUEUE_HOLD", "SPECIAL_EXIT"}  # requeued and held until someone releases it (scontrol release)


def ended(state: str, requeue: bool) -> bool:
    return state in ENDED or (state == "PREEMPTED" and not requeue)


def job_state(job_id: str) -> tuple[str, str, bool]:
    """(JobState, NodeList, Requeue) from `scontrol show job` (no accounting database needed). A job whose
    processes are still being stopped reads COMPLETING, not yet its final state."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if "Invalid job id" in proc.stderr:  # purged (MinJobAge after it ended) before we saw how it ended
        return "GONE", "", False
    fields = dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)  # (none: slurmctld busy, retry)
    return fields.get("JobState", "UNKNOWN"), fields.get("NodeList", ""), fields.get("Requeue") == "1"


def rendezvous_port(folder: Path, wait_s: float = 300.0) -> int:
    """The rendezvous port of a training step spanning nodes, chosen on its first node, where the rendezvous
    listens (a port free on the login node says nothing about that node's): node 0 (SLURM_NODEID) takes a port free
    on all of its interfaces and writes it into the stage folder, on the storage every node shares; the other nodes
    read it there. Named by job and step, so a rerun never reads an earlier step's."""
    path = folder / f"rendezvous-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    if os.environ.get("SLURM_NODEID", "0") == "0":
        port = free_port("")
        path.with_suffix(".tmp").write_text(str(port))
        os.replace(path.with_suffix(".tmp"), path)  # whole or absent: a reader never sees half of it
        return port
    start = time.time()
    while not path.exists():  # node 0's task starts with ours: seconds at most, unless it failed to
        if time.time() - start > wait_s:
            raise SystemExit(f"the first node wrote no rendezvous port to {path} within {wait_s:.0f} s")
        time.sleep(0.2)
    return int(path.read_text())


def inside_allocation() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def step_flags(res: JobResources) -> list[str]:
    """srun's flags: one task per node, with the node's GPUs and CPUs."""
    counts = (("gpus-per-node", res.gpus_per_node), ("cpus-per-task", res.cpus_per_task))
    return [f"--nodes={res.nodes}", "--ntasks-per-node=1", *(f"--{opt}={n}" for opt, n in counts if n)]


def batch_flags(res: JobResources) -> list[str]:
    flags = [f"--{opt}={v}" for opt, v in (("partition", res.partition), ("time", res.time_limit),
                                           ("account", res.account)) if v is not None]
    return step_flags(res) + flags + res.sbatch_args


def shell(words: list[str]) -> str:
    """A command line for `bash -c`: words quoted, except the $variables the node expands."""
    return " ".join(w if w.startswith("$") else shlex.quote(w) for w in words)


class SlurmJob:
    """A batch job (`sbatch`), or inside an allocation a job step (`srun`), running `command` once per node, with
    Popen's poll / wait / terminate so that callers treat it like the local process it replaces."""

    def __init__(self, name: str, res: JobResources, command: str, folder: Path, log: Path, env: dict,
                 node: str | None = None, exclude: list[str] = ()):
        self.returncode: int | None = None
        self.id = self.proc = None
        self.node, self.ended, self.held = node, "", ""
        tool = "srun" if inside_allocation() else "sbatch"
        if shutil.which(tool) is None:
            raise InputError(f"launcher.kind is slurm, but `{tool}` is not on PATH; run the round where SLURM's "
                             "commands are (a login node), or set launcher.kind: local")
        if inside_allocation():  # a step on the allocation's nodes (`node`: on that one)
            self.proc = subprocess.Popen(["srun", f"--job-name={name}", *step_flags(res), *(["--nodelist=" + node]
                                          if node else []), "bash", "-c", command],
                                         env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
            return
        script = folder / f"{name.split(':')[-1]}.sbatch"
        script.write_text(f"#!/bin/bash\n# submitted by alignment/launcher/slurm.py\nexec srun {shell(step_flags(res))} "
                          f"bash -c {shlex.quote(command)}\n")
        proc = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={log}",
                               f"--chdir={os.getcwd()}", *batch_flags(res),
                               *([f"--exclude={','.join(exclude)}"] if exclude else []), str(script)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise InputError(f"sbatch refused the job {name} (launcher.{name.split(':')[-2]}): {proc.stderr.strip()}")
        self.id = proc.stdout.strip().split(";")[0]
        with open(folder / JOBS, "a") as f:
            f.write(self.id + "\n")
        print(f"submitted SLURM job {self.id} ({name}); log: {log}", flush=True)

    def state(self) -> tuple[str, str, bool]:
        return job_state(self.id)

    def poll(self) -> int | None:
        if self.proc is not None:
            self.returncode = self.proc.poll()
        elif self.returncode is None:
            state, _, requeue = self.state()
            if ended(state, requeue):
                self.returncode, self.ended = (0 if state == "COMPLETED" else 1), state
            elif state in HELD and state != self.held:
                print(f"SLURM job {self.id} was requeued and is held ({state}): waiting until it is released "
                      f"(scontrol release {self.id}) or cancelled", flush=True)
            self.held = state if state in HELD else ""
        return self.returncode

    def wait(self) -> int:
        start = time.time()
        while self.poll() is None:
            time.sleep(min(1 + (time.time() - start) / 60, 10))  # seconds at first; a long stage polls less
        return self.returncode

    def host(self) -> str | None:
        """The node the job runs on, once it runs (however long it queues); None if it ended first."""
        while self.proc is None:
            state, nodes, requeue = self.state()
            if state == "RUNNING":
                return hostnames(nodes)[0]
            if ended(state, requeue):
                return None
            time.sleep(1)
        return self.node

    def terminate(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()  # srun passes it on to the step's tasks and ends the step
                self.proc.wait()
        elif self.returncode is None:
            subprocess.run(["scancel", self.id], capture_output=True)


def hostnames(nodelist: str) -> list[str]:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout.split()


def node_address(node: str) -> str:
    """The address SLURM reaches a node at (its NodeAddr): what another machine connects to. A node's name need
    not resolve off the cluster's own nodes (the login node's resolver may not know it); slurmctld's address does."""
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True).stdout
    fields = dict(w.split("=", 1) for w in out.split() if "=" in w)
    return fields.get("NodeAddr") or node


def job_name(recipe: Recipe, round_n: int, stage: str, kind: str, what: str) -> str:
    """align:<recipe>:r<n>:<kind>:<what>, so `squeue --name` / `scancel --name` find a run's jobs."""
    return f"align:{recipe.name}:r{round_n}:{kind}:{what}"


@contextmanager
def stopped_on_exit(jobs: list[SlurmJob]):
    """SIGTERM (as `scancel` of the orchestrator's own job sends) ends the orchestrator through this block, so the
    jobs it started are cancelled rather than left to write into a run nobody waits for."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield jobs
    finally:
        for job in jobs:
            job.terminate()
        signal.signal(signal.SIGTERM, previous)


CANCEL_WAIT_S = 600  # against a node that never reports back; SLURM's KillWait (30 s by default) bounds the usual


def cancel_recorded(folder: Path) -> None:
    """Cancel the jobs an earlier run of this stage submitted, in case they outlived it, and wait until they have
    ended: a cancelled job keeps running until SLURM has stopped its processes (a suspended one is resumed to be
    signalled), and until then it can still write checkpoints or a manifest into the folder this run is taking."""
    ids = (folder / JOBS).read_text().split() if (folder / JOBS).exists() else []
    if not ids or not shutil.which("scancel"):
        return
    subprocess.run(["scancel", *ids], capture_output=True)
    start = time.time()
    while alive := [i for i, (state, _, requeue) in ((i, job_state(i)) for i in ids) if not ended(state, requeue)]:
        if time.time() - start > CANCEL_WAIT_S:
            raise RuntimeError(f"SLURM jobs {' '.join(alive)} of an earlier run of {folder} were cancelled but have "
                               f"not ended after {CANCEL_WAIT_S} s; check their nodes (scontrol show job {alive[0]})")
        time.sleep(0.5)


def run_stage_job(recipe: Recipe, round_n: int, stage: str, folder: Path, job: dict, env: dict) -> int:
    """Write job.json and run the stage as a SLURM job, after starting its teacher servers where it serves one;
    the stage's exit code."""

    kind = job_kind(recipe, stage)
    res = getattr(recipe.launcher, kind)
    jobs: list[SlurmJob] = []
    with stopped_on_exit(jobs):
        t = recipe.teacher
        if asks_teacher(recipe, stage) and t.backend == Backend.openai and t.serve:
            from alignment.runner import input_value

            model = str(input_value(job["inputs"]["teacher"]))  # the path the stage names it by, as a local server
            nodes = hostnames(os.environ["SLURM_JOB_NODELIST"]) if inside_allocation() else [None] * res.nodes
            endpoints, used = [], []
            for i in range(res.nodes):  # one server per node: each job keeps off the nodes the earlier ones got
                server = SlurmVLLMServer(t, model, res, folder, jobs, node=nodes[i], exclude=used,
                                         name=job_name(recipe, round_n, stage, kind, f"teacher-{i}"))
                endpoints.append(server.start())
                used.append(server.node_name)
            job["config"]["teacher"].update(serve=False, endpoints=endpoints)  # transport: not in the fingerprint
            res = res.model_copy(update={"nodes": 1, "gpus_per_node": 0})  # the stage's own process sends requests
        write_json_atomic(folder / "job.json", job)
        cfg = trainer_config(recipe, stage)
        rendezvous = []
        if cfg is None or not cfg.distributed:  # one process
            res = res.model_copy(update={"nodes": 1})
        else:  # one `accelerate launch` per node; CPU nodes run num_processes each
            rendezvous = ["--num_processes", str(res.nodes * (res.gpus_per_node or cfg.num_processes)),
                          "--num_machines", str(res.nodes), "--machine_rank", "$SLURM_NODEID",
                          "--main_process_ip", "$MAIN_HOST", "--main_process_port", "$MAIN_PORT"]
        # the first node and a port free there, both found on the nodes (rendezvous_port)
        line = ('MAIN_HOST=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n1); ' + (
            f"MAIN_PORT=$({shell([sys.executable, '-m', 'alignment.launcher.slurm', 'rendezvous-port', str(folder)])})"
            " || exit 1; " if rendezvous else "") + "exec " + shell(stage_command(recipe, stage, folder / "job.json",
                                                                                 rendezvous)))
        jobs.append(SlurmJob(job_name(recipe, round_n, stage, kind, stage), res, line, folder,
                             folder / ("slurm-step.log" if inside_allocation() else "slurm-%j.log"), env))
        code = jobs[-1].wait()
        if jobs[-1].ended:
            print(f"SLURM job {jobs[-1].id} ended {jobs[-1].ended}", flush=True)
    return code


class SlurmVLLMServer(VLLMServer):
    """The teacher's vLLM server as a SLURM job on one node: its endpoint is that node's host name and the port
    chosen here; the job is cancelled when the stage ends or fails (`stopped_on_exit`)."""

    def __init__(self, t: TeacherConfig, model: str, res: JobResources, folder: Path, jobs: list, *,
                 node: str | None, name: str, exclude: list[str] = ()):
        super().__init__(model, t.engine, port=t.server_port, api_key_env=t.api_key_env,
                         startup_timeout_s=t.server_startup_timeout_s, log_path=folder / f"{name.split(':')[-1]}.log")
        self.cmd = server_command(model, t.engine, self.port, host="0.0.0.0")  # reached from other nodes
        self.res, self.folder, self.name, self.jobs, self.node = res.model_copy(update={"nodes": 1}), folder, name, \
            jobs, node
        self.exclude, self.node_name = list(exclude), None

    def start(self) -> str:
        self.log = open(self.log_path, "ab")
        self.proc = SlurmJob(self.name, self.res, "exec " + shell(self.cmd), self.folder, self.log_path, self.env,
                             node=self.node, exclude=self.exclude)
        self.jobs.append(self.proc)
        self.node_name = self.proc.host()
        if self.node_name is None:  # ended before it ran: its log says why
            self._wait_healthy()
        self.base_url = f"http://{node_address(self.node_name)}:{self.port}/v1"
        print(f"vLLM server {self.proc.id or 'step'} at {self.base_url}", flush=True)
        self._wait_healthy()  # (fails at once, with the log's tail, if the job ended before it was healthy)
        return self.base_url


if __name__ == "__main__":  # on each node of a training step: python -m alignment.launcher.slurm rendezvous-port
    if sys.argv[1:2] != ["rendezvous-port"] or len(sys.argv) != 3:
        sys.exit("usage: python -m alignment.launcher.slurm rendezvous-port <stage folder>")
    print(rendezvous_port(Path(sys.argv[2])))
