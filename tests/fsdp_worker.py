"""Processes of distributed training on the CPU, for tests/test_training_scale.py and tests/test_fsdp_save.py.

One rank of FSDP2 training: torch's `fully_shard` on each decoder layer and on the model, as
recipes/accelerate/fsdp.yaml wraps a Llama, over gloo:

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.json

A stage's process as `accelerate launch` starts it on a GPU node (`stage JOB`, in place of `-m alignment.runner JOB`),
or the stage's trainer built as such a process builds it (`trainers CASES.json OUT.json`), here on the CPU: accelerate
1.15 applies FSDP only where its backend found an accelerator (docs/details.md), so `as_on_gpus` has it take the
MULTI_GPU branch with gloo and the CPU as device. Everything after that (the launcher's environment, the FSDP plugin,
the Trainer's checks, FSDP2's sharding and saving) is the libraries' own code.

Ranks finding and removing torn checkpoints at once (`checkpoints TRAINER_DIR OUT`), over gloo.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
STEPS, ROWS, LENGTH = 4, 8, 32


def model():
    from alignment.chat import build_tokenizer
    from alignment.tiny_models import random_llama

    return random_llama(build_tokenizer(), seed=0, **SHAPE)


def train(net, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS AdamW steps on seeded random rows; each rank takes its share of every batch. The loss of the whole
    batch at every step (rank means averaged: equal shares, every token labelled)."""
    import torch.distributed as dist

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, net.config.vocab_size, (ROWS, LENGTH), generator=g).chunk(world)[rank]
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()  # FSDP reduce-scatters the gradients, averaged over the ranks
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def as_on_gpus() -> None:
    """accelerate's state as on a CUDA node (distributed type MULTI_GPU, so ACCELERATE_USE_FSDP gives FSDP), with
    gloo for the collectives and the CPU as the device."""
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    os.environ.pop("ACCELERATE_USE_CPU", None)  # what the runner sets where there is no GPU
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo", DistributedType.MULTI_GPU)
    if not dist.is_initialized():  # (the Trainer asks for a CPU state, which leaves the process group to us)
        dist.init_process_group("gloo")


def stage(job: str) -> None:
    from alignment import runner

    as_on_gpus()
    sys.argv = ["alignment.runner", job]
    runner.main()


def trainers(cases_path: str, out_path: str) -> None:
    """Build each case's stage trainer ({"recipe", "overrides", "stage", "env"}: the environment `accelerate
    launch` gives the process) on a tiny Llama, and record what the Trainer made of it, or the error it raised."""
    from accelerate.state import AcceleratorState

    from alignment.chat import build_tokenizer
    from alignment.config import load_recipe
    from alignment.stage_table import StageConfig, stage_config
    from alignment.stages import dpo, sft
    from alignment.tiny_models import random_llama, save
    from transformers import AutoModelForCausalLM

    base_env, results = dict(os.environ), []
    for case in json.loads(Path(cases_path).read_text()):
        os.environ.clear()
        os.environ.update({**base_env, **case["env"]})
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh launched process for each case
        as_on_gpus()
        recipe = load_recipe(case["recipe"], case["overrides"])
        cfg = StageConfig(case["stage"], stage_config(recipe, case["stage"]))
        tok = build_tokenizer()
        path = Path(out_path).parent / "tiny"  # from a folder, as the stage loads it (TRL's FSDP DPO reloads it)
        if not path.exists():
            save(random_llama(tok, seed=0, **SHAPE), tok, path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        prompt = [{"role": "user", "content": "What is 2 + 2?"}]
        out = Path(out_path).parent / "trainer-case"
        try:
            if case["stage"] == "sft":
                trainer = sft.build_trainer(cfg, model, tok, [{"prompt": prompt, "completion": [
                    {"role": "assistant", "content": "4"}]}], out)
            else:
                trainer = dpo.build_trainer(cfg, model, tok, [{"prompt": prompt, "chosen": [
                    {"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}], out)
        except ValueError as e:
            results.append({"error": str(e)})
            continue
        plugin = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
        results.append({"distributed_type": str(trainer.accelerator.distributed_type),
                        "fsdp": trainer.is_fsdp_enabled, "fsdp_version": plugin and plugin.fsdp_version,
                        "fsdp_activation_checkpointing": plugin and plugin.activation_checkpointing,
                        "trainer_gradient_checkpointing": trainer.args.gradient_checkpointing})
    Path(out_path).write_text(json.dumps(results))


def checkpoints(trainer_dir: str, out: str) -> None:
    """Both ranks look for the last whole checkpoint, as each process of a distributed stage does, in a fixed
    order: rank 1 first, and rank 0 once rank 1 has either returned or reached the point where it waits for the
    others (so rank 1 always sees the folders as they were, whatever the timing)."""
    import time

    import torch.distributed as dist
    from accelerate import PartialState

    from alignment.training import last_complete_checkpoint

    state = PartialState(cpu=True)  # gloo, as the runner's DDP on CPUs
    ready = Path(f"{out}.rank1-done-looking")
    if state.process_index == 1:
        wait = PartialState.wait_for_everyone

        def waiting(self):
            ready.touch()
            wait(self)

        PartialState.wait_for_everyone = waiting
    else:
        while not ready.exists():
            time.sleep(0.05)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        found = last_complete_checkpoint(Path(trainer_dir))
    if state.process_index == 1:
        ready.touch()  # (returned without waiting: rank 0 goes on)
    left = sorted(p.name for p in Path(trainer_dir).iterdir())  # right after this rank's call returned
    Path(f"{out}.{state.process_index}").write_text(json.dumps({"found": found, "printed": printed.getvalue(),
                                                                 "left": left}))
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "stage":
        return stage(sys.argv[2])
    if sys.argv[1] == "trainers":
        return trainers(sys.argv[2], sys.argv[3])
    if sys.argv[1] == "checkpoints":
        return checkpoints(sys.argv[2], sys.argv[3])
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    for layer in net.model.layers:
        fully_shard(layer)
    fully_shard(net)
    losses = train(net, rank, world)
    params = list(net.parameters())
    local = sum(p.to_local().numel() for p in params if isinstance(p, DTensor))
    full = {k: v.full_tensor() for k, v in net.state_dict().items()}  # every rank joins the gathers
    if rank == 0:
        torch.save(full, sys.argv[1] + ".pt")
        Path(sys.argv[1]).write_text(json.dumps({
            "losses": losses, "world": world, "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "local_numel": local, "numel": sum(p.numel() for p in params)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
