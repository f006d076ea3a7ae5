"""What the production recipes' distributed training does where CPUs cannot run it as the GPUs do, replayed through
the libraries' own code: the trainer each recipe's `distributed` setting builds, through accelerate's launch
environment and transformers' checks; FSDP2's final save of a sharded model; the runner's refusal to write a
manifest over a model folder that does not load; ranks that share the checkpoint folders."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.chat import build_tokenizer
from alignment.config import load_recipe
from alignment.model_folder import IncompleteModel
from alignment.launcher import stage_command
from alignment.runner import run_job
from alignment.stage_table import stage_config
from alignment.tiny_models import random_llama, save

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fsdp_worker.py"
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
PRODUCTION = [ROOT / "recipes/llama3.1-8b.yaml", ROOT / "recipes/llama3.1-70b.yaml"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(recipe, stage: str, port: int) -> dict:
    """The environment `accelerate launch` gives the stage's process 0 of 1, from the stage's own command line:
    accelerate's parser and config-file merge, its multi-GPU environment, and the ranks torchrun adds."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    cmd = stage_command(recipe, stage, Path("job.json"), ["--num_processes", "1", "--main_process_port", str(port)])
    args = _validate_launch_command(launch_command_parser().parse_args(cmd[cmd.index("--config_file"):]))[0]
    env = prepare_multi_gpu_env(args)
    return {**{k: v for k, v in env.items() if os.environ.get(k) != v}, "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_each_recipes_distributed_trainer_passes_transformers_and_accelerates_checks(tmp_path):
    """The 8B and 70B recipes' SFT and DPO trainers as their launched processes build them (FSDP2, gradient
    checkpointing on), plus the other settings of the one knob: each passes Trainer.__init__'s checks, and the
    recipe's gradient_checkpointing is done once: by FSDP under fsdp, by the Trainer otherwise."""
    cases, expected = [], []
    for path in PRODUCTION:
        for stage in ("sft", "dpo"):
            cases.append({"recipe": str(path), "overrides": [], "stage": stage})
            expected.append({"fsdp": True, "fsdp_version": 2, "fsdp_activation_checkpointing": True,
                             "trainer_gradient_checkpointing": False})
    cases.append({"recipe": str(PRODUCTION[0]), "overrides": ["sft.gradient_checkpointing=false"], "stage": "sft"})
    expected.append({"fsdp": True, "fsdp_version": 2, "fsdp_activation_checkpointing": False,
                     "trainer_gradient_checkpointing": False})
    for gc in (True, False):  # DDP keeps the Trainer's own recomputation
        cases.append({"recipe": str(PRODUCTION[0]), "overrides": ["sft.distributed=ddp",
                                                                  f"sft.gradient_checkpointing={str(gc).lower()}"],
                      "stage": "sft"})
        expected.append({"fsdp": False, "fsdp_version": None, "fsdp_activation_checkpointing": None,
                         "trainer_gradient_checkpointing": gc})
    for case in cases:
        case["env"] = launch_env(load_recipe(case["recipe"], case["overrides"]), case["stage"], free_port())
    assert cases[0]["env"]["ACCELERATE_USE_FSDP"] == "true" and "ACCELERATE_USE_FSDP" not in cases[-1]["env"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(WORKER), "trainers", str(tmp_path / "cases.json"),
                           str(tmp_path / "out.json")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    for case, want, got in zip(cases, expected, results):
        assert "error" not in got, (case["recipe"], case["stage"], case["overrides"], got["error"])
        assert {k: got[k] for k in want} == want, (case["recipe"], case["stage"], case["overrides"])
        assert got["distributed_type"] == ("DistributedType.FSDP" if want["fsdp"] else "DistributedType.MULTI_GPU")


def sft_job(tmp: Path, name: str, overrides: list[str], rows: int = 16) -> tuple:
    """A tiny SFT stage's folder with its job.json, as the orchestrator writes it; the recipe and the base model."""
    tok = build_tokenizer()
    base = tmp / "base"
    if not base.exists():
        save(random_llama(tok, seed=0, **SHAPE), tok, base)
        (tmp / "sft.jsonl").write_text("".join(json.dumps({
            "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i % 9}?"}],
            "completion": [{"role": "assistant", "content": f"{i} + {i % 9} = {i + i % 9}"}]}) + "\n"
            for i in range(rows)))
    overrides = ["sft.report_to=[]", "sft.num_train_epochs=1", "sft.per_device_train_batch_size=4",
                 "sft.logging_steps=1", "sft.learning_rate=1e-3", *overrides]
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", overrides)
    folder = tmp / name
    folder.mkdir()
    job = {"stage": "sft", "round": 1, "recipe_name": recipe.name, "recipe_file": "test", "overrides": overrides,
           "config": stage_config(recipe, "sft"), "fingerprint": name,
           "inputs": {"model": {"path": str(base), "hash": "h"}, "sft": {"path": str(tmp / "sft.jsonl"), "hash": "h"}}}
    (folder / "job.json").write_text(json.dumps(job))
    return recipe, folder, base


@pytest.mark.slow
def test_fsdp2_stage_saves_a_gathered_model_that_equals_its_sharded_checkpoint(tmp_path):
    """SFT under `accelerate launch` with recipes/accelerate/fsdp.yaml on two processes (FSDP2, sharded
    checkpoints), gradient checkpointing on as the production recipes have it: the stage's model folder is one
    full save_pretrained model, and its weights are exactly what the two ranks' sharded checkpoint holds at the
    last step (16 rows / (4 per process x 2) = 2 steps, a checkpoint at step 2)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    recipe, folder, base = sft_job(tmp_path, "fsdp", ["sft.distributed=fsdp", "sft.num_processes=2",
                                                      "sft.gradient_checkpointing=true", "sft.save_steps=2",
                                                      "sft.keep_checkpoints=true"])
    cmd = stage_command(recipe, "sft", folder / "job.json", ["--num_processes", "2", "--main_process_port",
                                                             str(free_port())])
    cmd = cmd[:cmd.index("alignment.runner") - 1] + [str(WORKER), "stage", str(folder / "job.json")]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (folder / "manifest.json").exists()
    shards = folder / "trainer" / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    dcp_to_torch_save(shards, tmp_path / "sharded.pt")
    sharded = torch.load(tmp_path / "sharded.pt")
    sharded = sharded.get("model", sharded)
    final, start = load_file(folder / "model" / "model.safetensors"), load_file(base / "model.safetensors")
    # The gathered tensors share no storage, so save_pretrained keeps the tied output head (Llama 3.1 ties none);
    # it is the embedding's copy.
    assert torch.equal(final.pop("lm_head.weight"), final["model.embed_tokens.weight"])
    assert set(final) == set(start)
    for k, v in final.items():
        assert v.shape == start[k].shape, k  # whole tensors, not one rank's half
        assert torch.equal(v, sharded[k]), k
    assert any(not torch.equal(final[k], start[k]) for k in final)  # it trained
    AutoModelForCausalLM.from_pretrained(folder / "model")
    assert not (folder / "model" / "training_args.bin").exists() and (folder / "logs" / "training_args.bin").exists()


# --- the runner's model check --------------------------------------------------------------------------------


def runner_job(tmp: Path) -> Path:
    """A job of the sft stage, whose run the caller patches to leave the model folder under test."""
    tmp.mkdir(parents=True, exist_ok=True)
    return sft_job(tmp, "stage", [])[1] / "job.json"


def good_model(folder: Path) -> None:
    tok = build_tokenizer()
    save(random_llama(tok, seed=1, **SHAPE), tok, folder)


def sharded_save_leftover(folder: Path) -> None:  # what FSDP's sharded save left: the tokenizer beside nothing
    good_model(folder)
    (folder / "model.safetensors").unlink()
    (folder / "config.json").unlink()


def no_weights(folder: Path) -> None:
    good_model(folder)
    (folder / "model.safetensors").unlink()


def truncated(folder: Path) -> None:  # a save cut short, or a full disk
    good_model(folder)
    f = folder / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)


def no_tokenizer(folder: Path) -> None:
    good_model(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def missing_shard(folder: Path) -> None:  # an index naming a shard that was never written
    good_model(folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(weights)}}))


def index_lacks_tensor(folder: Path) -> None:  # every shard present, one tensor the index names in none
    good_model(folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {k: "model-00001-of-00001.safetensors" for k in [*weights, "lm_head.extra"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def fake_run(write_model):
    from alignment.stages.result import StageResult

    def run(cfg, inputs, out_dir, round_n):
        write_model(out_dir / "model")
        (out_dir / "log_history.json").write_text("[]")
        (out_dir / "logs").mkdir(exist_ok=True)
        return StageResult(outputs={"model": "model", "log_history": "log_history.json", "logs": "logs"}, rows={},
                           stats={})
    return run


@pytest.mark.parametrize("broken, message", [
    (sharded_save_leftover, r"no readable config.json"),
    (no_weights, r"no weights \(model.safetensors or model.safetensors.index.json\); the folder holds \['chat_tem"),
    (truncated, r"model.safetensors is not a whole safetensors file .*incomplete metadata, file not fully covered"),
    (no_tokenizer, r"no tokenizer files"),
    (missing_shard, r"model.safetensors.index.json names 2 weight files and \['model-00002-of-00002.safetensors'\] "
                    "are missing"),
    (index_lacks_tensor, r"model.safetensors.index.json maps 1 tensors to files that lack them \(first: lm_head.extra"),
])
def test_the_runner_writes_no_manifest_over_a_model_folder_that_does_not_load(tmp_path, monkeypatch, broken, message):
    import alignment.stages.sft

    job = runner_job(tmp_path)
    monkeypatch.setattr(alignment.stages.sft, "run", fake_run(broken))
    with pytest.raises(IncompleteModel, match=r"stage sft's output 'model' \(.*stage/model\): " + message):
        run_job(job)
    assert not (job.parent / "manifest.json").exists()


def test_the_runner_writes_the_manifest_over_a_model_that_loads(tmp_path, monkeypatch):
    """The folders that pass: one model.safetensors, and an index whose shards hold every tensor it names."""
    import alignment.stages.sft

    def sharded(folder: Path) -> None:
        good_model(folder)
        weights = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        from safetensors.torch import save_file

        keys = sorted(weights)
        parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in parts.items():
            save_file({k: weights[k].contiguous() for k in ks}, folder / name)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            k: name for name, ks in parts.items() for k in ks}}))

    for i, write in enumerate((good_model, sharded)):
        job = runner_job(tmp_path / str(i))
        monkeypatch.setattr(alignment.stages.sft, "run", fake_run(write))
        manifest = run_job(job)
        assert manifest["outputs"]["model"] == "model" and (job.parent / "manifest.json").exists()


def test_a_model_whose_save_wrote_no_weights_keeps_its_checkpoints(tmp_path, monkeypatch):
    """An engine whose save writes no weights (FSDP's sharded save did exactly that): train_runs raises before
    `keep_checkpoints: false` deletes the trainer's checkpoints, the only copy of the trained weights."""
    from transformers import Trainer

    from alignment.stages import sft

    recipe, folder, base = sft_job(tmp_path, "stage", ["sft.save_steps=2", "sft.keep_checkpoints=false"], rows=8)
    checkpoint_save = Trainer.save_model  # checkpoints save as usual; the final save writes nothing
    monkeypatch.setattr(Trainer, "save_model", lambda self, output_dir=None, _internal_call=False:
                        checkpoint_save(self, output_dir, _internal_call) if _internal_call else None)
    job = json.loads((folder / "job.json").read_text())
    from alignment.stage_table import StageConfig

    cfg = StageConfig("sft", job["config"])
    with pytest.raises(IncompleteModel, match=r"the trained model \(.*stage/model\): no readable config.json"):
        sft.run(cfg, {"model": base, "sft": tmp_path / "sft.jsonl"}, folder, 1)
    assert (folder / "trainer" / "checkpoint-2" / "model.safetensors").exists()


def test_training_args_go_to_the_logs_not_the_model(tmp_path):
    """training_args.bin pickles the absolute output_dir: in the model folder it would make the model's identity
    (and the seeds drawn from it) depend on where the run folder lies."""
    from alignment.stage_table import StageConfig
    from alignment.stages import sft

    recipe, folder, base = sft_job(tmp_path, "stage", [], rows=8)
    cfg = StageConfig("sft", json.loads((folder / "job.json").read_text())["config"])
    sft.run(cfg, {"model": base, "sft": tmp_path / "sft.jsonl"}, folder, 1)
    assert "training_args.bin" not in {p.name for p in (folder / "model").iterdir()}
    args = torch.load(folder / "logs" / "training_args.bin", weights_only=False)
    assert args.output_dir == str(folder / "trainer")


# --- ranks sharing the checkpoint folders --------------------------------------------------------------------


@pytest.mark.slow
def test_only_the_main_process_removes_a_torn_checkpoint_and_the_others_wait_for_it(tmp_path):
    """Two gloo processes look for the last whole checkpoint (rank 1 first: fsdp_worker.checkpoints): rank 0 alone
    removes the torn newer one (two ranks deleting the same files fail on each other's: FileNotFoundError), and
    rank 1 returns only once it is gone."""
    trainer = tmp_path / "trainer"
    for step, whole in ((2, True), (4, False)):
        ckpt = trainer / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        for i in range(20):
            (ckpt / f"shard-{i}.bin").write_bytes(b"x" * 100)
        if whole:
            (ckpt / "trainer_state.json").write_text("{}")
    out = tmp_path / "ranks"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(WORKER), "checkpoints", str(trainer), str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert [r["found"] for r in ranks] == [str(trainer / "checkpoint-2")] * 2
    assert ranks[0]["printed"] == f"removing {trainer / 'checkpoint-4'}: it was not completely written " \
                                  "(no trainer_state.json)\n"
    assert ranks[1]["printed"] == ""
    assert ranks[1]["left"] == ["checkpoint-2"]  # rank 1 went on only after rank 0's removal
