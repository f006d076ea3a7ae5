"""One rank of FSDP2 training on the CPU, for tests/test_training_scale.py (accelerate 1.15 does not apply FSDP on
CPUs: docs/details.md). torch's `fully_shard` on each decoder layer and on the model, as recipes/accelerate/fsdp.yaml
wraps a Llama, over gloo:

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.json
"""

import json
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


def main() -> None:
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
