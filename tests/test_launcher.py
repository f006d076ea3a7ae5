"""The SLURM launcher without a cluster: `sbatch` and `scontrol` replaced by scripts that answer as SLURM does
(`scontrol show job -o` prints one line of Key=Value fields), so a job's life can be played state by state; and a
multi-node training step's command line run by bash as each node runs it."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from alignment.launcher import slurm as launcher
from alignment.config import JobResources, load_recipe
from alignment.launcher.slurm import SlurmJob

ROOT = Path(__file__).resolve().parents[1]
SCONTROL = """#!/bin/bash
# scontrol show job -o <id>: the next line of $STATES (the last one repeats); scontrol show hostnames <list>
if [ "$2" = hostnames ]; then echo "$3" | tr , '\\n'; exit 0; fi
line=$(head -n1 "$STATES")
[ "$(wc -l < "$STATES")" -gt 1 ] && sed -i 1d "$STATES"
echo "$line" >> "$STATES.seen"
echo "JobId=4242 JobName=align:x:r1:train:sft UserId=me(1000) $line"
"""


@pytest.fixture
def slurm_answers(tmp_path, monkeypatch):
    """Fake sbatch (job 4242) and scontrol on PATH; returns a function that sets the states scontrol will report."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text("#!/bin/bash\necho 4242\n")
    (bin_ / "scontrol").write_text(SCONTROL)
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)  # poll at once: the states are scripted
    states = tmp_path / "states"
    monkeypatch.setenv("STATES", str(states))

    def answer(*lines: str) -> SlurmJob:
        states.write_text("\n".join(lines) + "\n")
        (tmp_path / "states.seen").unlink(missing_ok=True)
        return SlurmJob("align:x:r1:train:sft", JobResources(), "true", tmp_path, tmp_path / "log", dict(os.environ))

    answer.seen = lambda: (tmp_path / "states.seen").read_text().splitlines()
    return answer


def test_a_preempted_job_that_slurm_requeues_is_waited_for(slurm_answers, capsys):
    """With requeue on (Requeue=1) a preempted job goes back to the queue (squeue(1): PREEMPTED, REQUEUED, then
    PENDING) and runs again: the stage waits for that run's end instead of failing at PREEMPTED."""
    job = slurm_answers("JobState=RUNNING Requeue=1 NodeList=n0", "JobState=PREEMPTED Requeue=1 NodeList=n0",
                        "JobState=REQUEUED Requeue=1 NodeList=n0", "JobState=PENDING Requeue=1 NodeList=",
                        "JobState=RUNNING Requeue=1 NodeList=n1", "JobState=COMPLETED Requeue=1 NodeList=n1")
    assert job.wait() == 0 and job.ended == "COMPLETED"
    assert slurm_answers.seen()[-1] == "JobState=COMPLETED Requeue=1 NodeList=n1"  # every state went by
    # requeued and held: still not over; waited for until released or, here, cancelled
    job = slurm_answers("JobState=PREEMPTED Requeue=1 NodeList=n0", "JobState=REQUEUE_HOLD Requeue=1 NodeList=",
                        "JobState=REQUEUE_HOLD Requeue=1 NodeList=", "JobState=CANCELLED Requeue=1 NodeList=")
    assert job.wait() == 1 and job.ended == "CANCELLED"
    assert capsys.readouterr().out.count("was requeued and is held (REQUEUE_HOLD)") == 1
    # a server job preempted before it ran: its node is the one it runs on after the requeue
    job = slurm_answers("JobState=PREEMPTED Requeue=1 NodeList=n0", "JobState=PENDING Requeue=1 NodeList=",
                        "JobState=RUNNING Requeue=1 NodeList=n1")
    assert job.host() == "n1"


def test_the_next_run_waits_until_the_jobs_it_cancels_have_ended(slurm_answers, tmp_path):
    """An orphan job (its orchestrator killed with -9) is cancelled by the next run of its stage; until SLURM has
    stopped its processes (COMPLETING, or SUSPENDED and being resumed to be signalled) it can still write into the
    folder, so the next run goes on only once the job has ended."""
    (tmp_path / "bin" / "scancel").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/cancelled\n")
    (tmp_path / "bin" / "scancel").chmod(0o755)
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / launcher.JOBS).write_text("4242\n")
    slurm_answers("JobState=SUSPENDED Requeue=0 NodeList=n0", "JobState=COMPLETING Requeue=0 NodeList=n0",
                  "JobState=COMPLETING Requeue=0 NodeList=n0", "JobState=CANCELLED Requeue=0 NodeList=n0")
    launcher.cancel_recorded(folder)
    assert (tmp_path / "cancelled").read_text() == "4242\n"
    assert slurm_answers.seen() == ["JobState=SUSPENDED Requeue=0 NodeList=n0", *["JobState=COMPLETING Requeue=0 "
                                    "NodeList=n0"] * 2, "JobState=CANCELLED Requeue=0 NodeList=n0"]
    # one that never ends: a clear error naming the job, not a wait without end
    slurm_answers("JobState=COMPLETING Requeue=0 NodeList=n0")
    clock = iter(range(0, 10_000, 100))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(launcher.time, "time", lambda: next(clock))
        with pytest.raises(RuntimeError, match=r"SLURM jobs 4242 of an earlier run .* have not ended after 600 s"):
            launcher.cancel_recorded(folder)


def test_a_preempted_job_without_requeue_has_ended(slurm_answers):
    """Requeue=0 (sbatch --no-requeue, or JobRequeue=0): preemption cancelled the job, which never comes back."""
    job = slurm_answers("JobState=RUNNING Requeue=0 NodeList=n0", "JobState=PREEMPTED Requeue=0 NodeList=n0",
                        "JobState=PENDING Requeue=0 NodeList=")
    assert job.wait() == 1 and job.ended == "PREEMPTED"
    assert slurm_answers.seen()[-1] == "JobState=PREEMPTED Requeue=0 NodeList=n0"
    job = slurm_answers("JobState=PREEMPTED Requeue=0 NodeList=n0", "JobState=RUNNING Requeue=0 NodeList=n1")
    assert job.host() is None


def test_the_rendezvous_port_is_chosen_on_the_first_node(tmp_path, monkeypatch, slurm_answers):
    """SFT over two nodes: the command each node runs takes the rendezvous host and port from the step itself. The
    login node's free port (here 1, which no rendezvous could use) must not appear; node 0 picks one free on its
    own interfaces and node 1, started first, waits for it: both launch with the same port, and node 0's host."""
    lines = []

    class Recorded:
        def __init__(self, name, res, command, *a, **kw):
            lines.append(command)
            self.id, self.ended = "4242", ""

        def wait(self):
            return 0

        def terminate(self):
            pass

    monkeypatch.setattr(launcher, "SlurmJob", Recorded)
    monkeypatch.setattr(launcher, "free_port", lambda *a: 1)
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", ["launcher.kind=slurm", "launcher.train.nodes=2",
                                                       "sft.distributed=ddp", "sft.num_processes=2",
                                                       "dpo.distributed=ddp", "reward_training=null"])
    folder = tmp_path / "sft"
    folder.mkdir()
    assert launcher.run_stage_job(recipe, 1, "sft", folder, {"inputs": {}, "config": {}}, {}) == 0
    (line,) = lines
    assert "--main_process_port 1 " not in line
    on_node = line.replace("; exec ", "; echo ", 1)  # the launch it would exec, printed
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n0,n1",
           "PYTHONPATH": str(ROOT)}
    nodes = {n: subprocess.Popen(["bash", "-c", on_node], env={**env, "SLURM_NODEID": str(n)}, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 0)}
    out = {n: p.communicate(timeout=300) for n, p in nodes.items()}
    launched = {}
    for n, (stdout, stderr) in out.items():
        assert nodes[n].returncode == 0, stderr
        flags = dict(re.findall(r"--(machine_rank|main_process_ip|main_process_port) (\S+)", stdout))
        launched[n] = flags
    assert launched[0]["main_process_port"] == launched[1]["main_process_port"] != "1"
    assert (launched[0]["main_process_ip"], launched[1]["main_process_ip"]) == ("n0", "n0")
    assert (launched[0]["machine_rank"], launched[1]["machine_rank"]) == ("0", "1")
    assert (folder / "rendezvous-77.0").read_text() == launched[0]["main_process_port"]


def test_a_node_waits_for_the_first_nodes_port_only_so_long(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setattr(launcher.time, "time", iter(range(0, 10000, 100)).__next__)  # each look: 100 s later
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)
    with pytest.raises(SystemExit, match="the first node wrote no rendezvous port to .*rendezvous-78.0 within 300 s"):
        launcher.rendezvous_port(tmp_path)
    (tmp_path / "rendezvous-78.0").write_text("29555")
    assert launcher.rendezvous_port(tmp_path) == 29555


def test_a_local_distributed_stage_rendezvouses_on_a_port_free_at_launch():
    """torchrun's default port (29500) is shared by every distributed stage on the machine: a second run's launch
    started while the first's store holds it fails to bind it, or joins that store."""
    import socket

    from alignment.launcher.local import stage_command

    recipe = load_recipe("recipes/tiny.yaml", ["sft.distributed=ddp", "sft.num_processes=2"])
    with socket.socket() as taken:
        if port_free(29500):
            taken.bind(("127.0.0.1", 29500))  # as another run's rendezvous holds it
        cmd = stage_command(recipe, "sft", Path("job.json"))
    port = int(cmd[cmd.index("--main_process_port") + 1])
    assert port != 29500 and port_free(port) and cmd[cmd.index("--num_processes") + 1] == "2"


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])  # a stranger on loopback only, or on every address
def test_a_served_teacher_never_takes_a_busy_port_for_its_own(tmp_path, host):
    """A fixed teacher.server_port (the Llama recipes say 8000) already answered by another run's server: the stage
    fails naming the port and the key, before starting vLLM, rather than send its requests to a stranger."""
    import socket

    from alignment.backends import GenerationError
    from alignment.backends.vllm_server import VLLMServer
    from alignment.config import EngineConfig

    with socket.socket() as other:
        other.bind((host, 0))
        other.listen()
        server = VLLMServer("some/model", EngineConfig(), port=other.getsockname()[1], api_key_env=None,
                            startup_timeout_s=5, log_path=tmp_path / "log")
        with pytest.raises(GenerationError, match=rf"port {other.getsockname()[1]} \(teacher.server_port\) is in "
                                                  "use on this machine"):
            with server:
                pass
    assert server.proc is None  # vLLM was never started
