"""Two SLURM nodes on this one machine (tests/slurm_cluster.Nodes: each node a network namespace behind a bridge,
with its own address, host name and slurmd): SFT with `launcher.train.nodes=2`, one gloo process per node that
meet at a rendezvous on the first node, against the same stage as one node's two processes; and a served teacher,
one vLLM server job per node, both answering the stage's requests, both cancelled when it ends."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import slurm_cluster
from alignment.launcher.slurm import SlurmJob
from slurm_cluster import job_state
from test_slurm import SFT, model, selected, served_generate, stage, stopwatch  # noqa: F401  (model: a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    cluster = slurm_cluster.Nodes(tmp_path_factory.mktemp("slurm-nodes"))
    with slurm_cluster.running(cluster, slurm_cluster.install() or slurm_cluster.namespaces_work()):
        yield cluster
    # what the fixture made is gone: no namespace, no bridge
    assert not set(cluster.namespaces) & set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                            text=True).stdout.split())


def test_sft_over_two_nodes_matches_two_processes_on_one(nodes, model, tmp_path):  # noqa: F811
    base, rows = model
    lap = stopwatch()
    one_each = [a for a in SFT if not a.startswith("sft.num_processes")] + ["sft.num_processes=1"]
    folder = selected(tmp_path / "nodes", rows)
    proc = stage("sft", tmp_path / "nodes", base, *one_each, "dpo.distributed=ddp", "reward_training.distributed=ddp",
                 "launcher.kind=slurm", "launcher.train.nodes=2", "launcher.train.cpus_per_task=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lap("SFT over two nodes")
    job = (folder / "slurm_jobs").read_text().split()[-1]
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "NodeList=node[1-2]" in shown and "NumNodes=2" in shown, shown
    script = (folder / "sft.sbatch").read_text()  # one accelerate launch per node: machine rank = SLURM's node id
    assert "--nodes=2 --ntasks-per-node=1" in script
    assert "--num_processes 2 --num_machines 2 --machine_rank $SLURM_NODEID" in script, script
    port_files = list(folder.glob("rendezvous-*"))
    assert len(port_files) == 1 and int(port_files[0].read_text()) > 0  # chosen on node 1, read by node 2

    local_folder = selected(tmp_path / "local", rows)
    local = stage("sft", tmp_path / "local", base, *SFT)  # one machine, two processes
    assert local.returncode == 0, local.stderr[-3000:]
    lap("one node, two processes")
    history = [json.loads((f / "log_history.json").read_text()) for f in (folder, local_folder)]
    losses = [[h["loss"] for h in hist if "loss" in h] for hist in history]
    assert len(losses[0]) == 8 and losses[0] == pytest.approx(losses[1], rel=1e-4)  # 64 rows / (2 x 4) a step
    weights = [load_file(f / "model" / "model.safetensors") for f in (folder, local_folder)]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)


def test_a_served_teacher_runs_one_server_job_per_node_and_both_answer(nodes, model, tmp_path):  # noqa: F811
    pytest.importorskip("vllm")
    base, _ = model
    lap = stopwatch()
    proc = served_generate(tmp_path, base, "launcher.generate.nodes=2", "teacher.max_concurrency=4",
                           "prompts.num_prompts=16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lap("generate with two served teachers")
    folder = tmp_path / "tiny" / "round-1" / "generate"
    *servers, client = (folder / "slurm_jobs").read_text().split()
    endpoints = json.loads((folder / "job.json").read_text())["config"]["teacher"]["endpoints"]
    # one server job on each node, reached at its node's address (NodeAddr), both given to the stage
    assert sorted(e.split("//")[1].split(":")[0] for e in endpoints) == sorted(nodes.addresses)
    assert all(f"vLLM server {j} at {e}" in proc.stdout for j, e in zip(servers, endpoints)), proc.stdout
    job = json.loads((folder / "job.json").read_text())
    assert job["config"]["teacher"]["serve"] is False  # the stage's own process sends to the servers it started
    answered = [(folder / f"teacher-{i}.log").read_text().count("POST /v1/chat/completions") for i in range(2)]
    assert all(n > 0 for n in answered) and sum(answered) >= 16, answered  # both took requests
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"]["requests"] == 16 and manifest["rows"]["samples"] == 32
    # the servers are cancelled with the stage, whose own job completed; nothing is left on the cluster
    assert [job_state(j) for j in servers] == ["CANCELLED"] * 2 and job_state(client) == "COMPLETED"
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""
    # a job SLURM no longer knows (purged after it ended) counts as failed rather than being waited for forever
    gone = SlurmJob.__new__(SlurmJob)
    gone.id, gone.proc, gone.returncode = "987654", None, None
    assert gone.poll() == 1 and gone.ended == "GONE"
