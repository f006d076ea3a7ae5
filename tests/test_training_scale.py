"""SFT as the orchestrator runs it (`alignment.runner` on a job file, under `accelerate launch` when distributed):
two DDP processes against one with doubled accumulation, LoRA merged into a full model, seed averaging, and
resuming a killed run from its checkpoint; the reward_training stage resuming through the same training path."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.chat import build_tokenizer
from alignment.config import load_recipe
from alignment.launcher import stage_command, stage_env
from alignment.stage_table import stage_config
from alignment.tiny_models import random_llama, save

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    tok = build_tokenizer()
    model = save(random_llama(tok, seed=0, **SHAPE), tok, tmp / "base")
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i % 9}?"}],
             "completion": [{"role": "assistant", "content": f"{i} + {i % 9} = {i + i % 9}"}]} for i in range(64)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, model


def run_sft(tmp: Path, model: Path, name: str, *overrides, wait=True):
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", [
        "sft.report_to=[]", "sft.num_train_epochs=1", "sft.per_device_train_batch_size=4", "sft.logging_steps=1",
        "sft.learning_rate=1e-3", "sft.lr_scheduler_type=constant", "sft.warmup_steps=0", *overrides])
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    return run_job(recipe, "sft", folder, {"model": str(model), "sft": str(tmp / "sft.jsonl")}, overrides, wait)


def run_job(recipe, stage: str, folder: Path, inputs: dict, overrides, wait: bool):
    """The stage as the orchestrator starts it: job.json with the declared sections, then the runner's process."""
    ident = lambda p: [ident(x) for x in p] if isinstance(p, list) else {"path": p, "hash": "h"}  # noqa: E731
    job = {"stage": stage, "round": 1, "recipe_name": recipe.name, "recipe_file": "test", "overrides": list(overrides),
           "config": stage_config(recipe, stage), "fingerprint": folder.name,
           "inputs": {k: ident(v) for k, v in inputs.items()}}
    (folder / "job.json").write_text(json.dumps(job))
    cmd, env = stage_command(recipe, stage, folder / "job.json"), stage_env(recipe, stage)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True), folder
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((folder / "manifest.json").read_text()), folder, proc.stdout


def losses(folder: Path) -> list[float]:
    return [h["loss"] for h in json.loads((folder / "log_history.json").read_text()) if "loss" in h]


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def test_two_ddp_processes_match_one_with_doubled_accumulation(data):
    """TRL's invariance idea: 2 processes x 4 examples x 1 step of accumulation sees the same batches as
    1 process x 4 x 2, so the loss curves agree to float rounding (tolerance 1e-4 relative)."""
    tmp, model = data
    one, _, _ = run_sft(tmp, model, "one", "sft.gradient_accumulation_steps=2")
    two, _, _ = run_sft(tmp, model, "two", "sft.gradient_accumulation_steps=1", "sft.distributed=ddp",
                        "sft.num_processes=2")
    a, b = losses(tmp / "one"), losses(tmp / "two")
    assert len(a) == len(b) == 8  # 64 examples / (4 x 2) per optimizer step
    assert b == pytest.approx(a, rel=1e-4)
    assert a[-1] < a[0]  # and it trains


def test_lora_is_merged_into_a_full_model(data):
    tmp, model = data
    manifest, folder, _ = run_sft(tmp, model, "lora", "sft.lora={r: 4, lora_alpha: 8, lora_dropout: 0.0, "
                                  "target_modules: [q_proj, v_proj]}")
    assert manifest["stats"]["lora"] is True
    assert not (folder / "model" / "adapter_config.json").exists()  # an ordinary checkpoint
    base, merged = weights(model), weights(folder / "model")
    adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if k.endswith(f"{key}.lora_A.weight"))
    b = next(v for k, v in adapter.items() if k.endswith(f"{key}.lora_B.weight"))
    assert b.abs().sum() > 0  # the adapter learned something
    expected = base[f"{key}.weight"] + (8 / 4) * b @ a  # W + (alpha / r) B A
    assert torch.allclose(merged[f"{key}.weight"], expected, atol=1e-6)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


def test_seed_runs_are_averaged(data):
    tmp, model = data
    # keep_checkpoints keeps each seed's own model beside the average, to compare with it
    manifest, folder, _ = run_sft(tmp, model, "avg", "sft.average_seeds=[1, 2]", "sft.keep_checkpoints=true")
    assert manifest["stats"]["averaged_runs"] == 2
    r1, r2 = weights(folder / "runs/seed-1/model"), weights(folder / "runs/seed-2/model")
    avg = weights(folder / "model")
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(r1[key], r2[key])  # different seeds, different runs
    for k in avg:
        assert torch.allclose(avg[k], (r1[k] + r2[k]) / 2, atol=1e-6), k


def test_seed_runs_of_two_ddp_processes_are_averaged_once(data):
    """Every process of a distributed stage runs the same code on the same folders: the main process alone
    averages the seed runs and moves their logs while the other waits (a second rank moving the logs found them
    gone, and failed the stage)."""
    tmp, model = data
    manifest, folder, _ = run_sft(tmp, model, "avg-ddp", "sft.average_seeds=[1, 2]", "sft.keep_checkpoints=true",
                                  "sft.distributed=ddp", "sft.num_processes=2")
    assert manifest["stats"]["averaged_runs"] == 2
    r1, r2 = weights(folder / "runs/seed-1/model"), weights(folder / "runs/seed-2/model")
    avg = weights(folder / "model")
    assert not torch.equal(r1["model.layers.1.mlp.down_proj.weight"], r2["model.layers.1.mlp.down_proj.weight"])
    for k in avg:
        assert torch.allclose(avg[k], (r1[k] + r2[k]) / 2, atol=1e-6), k
    assert sorted(p.name for p in (folder / "logs").iterdir()) == ["seed-1", "seed-2"]
    assert (folder / "logs/seed-1/training_args.bin").exists()  # the run's record, out of its model folder
    assert not (folder / "runs/seed-1/model/training_args.bin").exists()


def kill_after_first_checkpoint(proc, folder: Path) -> int:
    """SIGKILL the stage's process group once the Trainer has finished a checkpoint; the newest whole one's step."""
    deadline = time.time() + 300
    while not list((folder / "trainer").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / "manifest.json").exists()  # half-done is not done
    return max(int(p.parent.name.split("-")[1]) for p in (folder / "trainer").glob("checkpoint-*/trainer_state.json"))


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(data):
    tmp, model = data
    steps = ["sft.save_steps=4", "sft.num_train_epochs=3"]  # 48 steps; a checkpoint every 4
    run_sft(tmp, model, "whole", *steps)
    proc, folder = run_sft(tmp, model, "killed", *steps, wait=False)
    done = kill_after_first_checkpoint(proc, folder)
    # A kill in the middle of a save leaves a newer checkpoint without its trainer state; resuming must skip it.
    torn = folder / "trainer" / f"checkpoint-{done + 4}"
    shutil.copytree(folder / "trainer" / f"checkpoint-{done}", torn, dirs_exist_ok=True)
    (torn / "trainer_state.json").unlink()
    manifest, _, out = run_sft(tmp, model, "killed", *steps)
    assert f"resuming seed 0 from {folder / 'trainer'}/checkpoint-{done}\n" in out
    assert manifest["stats"]["resumed_from_step"]["0"] == done
    whole, resumed = weights(tmp / "whole" / "model"), weights(folder / "model")
    for k in whole:
        assert torch.allclose(whole[k], resumed[k], atol=1e-5), k


def run_reward_model(tmp: Path, model: Path, name: str, *overrides, wait=True):
    """The reward_training stage in a process of its own, on 64 preference pairs (one round's), none held out."""
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i % 9}?"}],
        "chosen": [{"role": "assistant", "content": f"{i + i % 9}"}],
        "rejected": [{"role": "assistant", "content": f"{i + i % 9 + 1}"}]}) + "\n" for i in range(64)))
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", [
        "reward_training.held_out_share=0.0", "reward_training.num_train_epochs=3",
        "reward_training.per_device_train_batch_size=4", "reward_training.save_steps=4",
        "reward_training.logging_steps=1", "reward_training.learning_rate=1e-3",
        "reward_training.lr_scheduler_type=constant", "reward_training.warmup_steps=0", *overrides])
    result = run_job(recipe, "reward_training", folder, {"model": str(model), "pairs": [str(pairs)]}, overrides, wait)
    return (result[0]["stats"], *result[1:]) if wait else result


def test_a_killed_reward_model_run_resumes_like_sft_and_reports_the_step(data):
    """The reward_training stage trains through the SFT/DPO path: resumed from its last whole checkpoint, reported as
    `resumed_from_step` per seed, TensorBoard logs in the stage's logs/, the tokenizer saved padding right."""
    tmp, model = data
    whole, _, _ = run_reward_model(tmp, model, "rm-whole", "reward_training.report_to=[]")
    assert whole["resumed_from_step"] == {} and whole["seeds"] == [0]
    proc, folder = run_reward_model(tmp, model, "rm-killed", wait=False)
    done = kill_after_first_checkpoint(proc, folder)
    assert done < 48  # 64 pairs / 4 per step x 3 epochs: killed before the end
    torn = folder / "trainer" / f"checkpoint-{done + 4}"  # killed while saving the next one
    shutil.copytree(folder / "trainer" / f"checkpoint-{done}", torn, dirs_exist_ok=True)
    (torn / "trainer_state.json").unlink()
    stats, _, out = run_reward_model(tmp, model, "rm-killed")
    assert f"resuming seed 0 from {folder / 'trainer'}/checkpoint-{done}\n" in out
    assert stats["resumed_from_step"] == {"0": done} and stats["seeds"] == [0]
    assert stats["steps"] == 48
    whole_w, resumed_w = weights(tmp / "rm-whole" / "model"), weights(folder / "model")
    assert "score.weight" in whole_w  # the scalar head, trained and saved with the rest
    for k in whole_w:
        assert torch.allclose(whole_w[k], resumed_w[k], atol=1e-5), k
    assert list((folder / "logs").glob("events.out.tfevents.*"))  # report_to: tensorboard, into the stage's logs/
    assert json.loads((folder / "model" / "tokenizer_config.json").read_text())["padding_side"] == "right"


def test_fsdp2_on_cpu_two_sharded_processes_match_one(tmp_path):
    """FSDP2 as recipes/accelerate/fsdp.yaml wraps a Llama (each decoder layer, then the model), on two CPU
    processes over gloo, against one unsharded process on the same batches: every parameter a DTensor holding half
    the model on each rank, the same losses and, gathered, the same weights (float rounding: 1e-6). Through torchrun,
    not the stage: accelerate 1.15 trains `distributed: fsdp` on CPUs as DDP (docs/details.md)."""
    import fsdp_worker

    out = tmp_path / "fsdp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests/fsdp_worker.py"), str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["all_dtensor"] and sharded["local_numel"] <= sharded["numel"] / 2 + 64  # + a row's rounding
    one = fsdp_worker.model()
    start = {k: v.clone() for k, v in one.state_dict().items()}
    assert sharded["losses"] == pytest.approx(fsdp_worker.train(one), rel=1e-6)
    gathered = torch.load(str(out) + ".pt")
    for k, v in one.state_dict().items():
        assert torch.allclose(gathered[k], v, atol=1e-6), k
        assert not torch.equal(v, start[k]), k  # every parameter trained
