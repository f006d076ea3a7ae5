"""SFT batching: packed (padding-free) batches must give the same loss as padded ones on the same examples, which
holds only if attention stays within each example and the prompt stays out of the loss."""

import os

import pytest
import torch

from alignment.chat import build_tokenizer
from alignment.config import load_recipe
from alignment.stages.sft import build_trainer
from alignment.tiny_models import random_llama

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
         "completion": [{"role": "assistant", "content": f"{a} + {b} = {a + b}" + " (checked)" * (a % 4)}]}
        for a, b in [(12, 7), (40, 3), (99, 99), (5, 60), (31, 2), (8, 8)]]


def one_batch_loss(tmp_path, overrides, attn="sdpa"):
    tok = build_tokenizer()
    recipe = load_recipe("recipes/tiny.yaml", ["sft.report_to=[]", "sft.max_length=512",
                                               f"sft.per_device_train_batch_size={len(ROWS)}", *overrides])
    model = random_llama(tok, seed=0, **SHAPE)
    model.set_attn_implementation(attn)
    trainer = build_trainer(recipe, model, tok, ROWS, tmp_path)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 1  # every example in one batch, so both losses average over the same tokens
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batches[0]).item(), batches[0]


def test_packed_batches_give_the_padded_loss(tmp_path):
    padded, pb = one_batch_loss(tmp_path / "a", [])
    packed, kb = one_batch_loss(tmp_path / "b", ["sft.packing=true"])
    assert pb["input_ids"].shape[0] == len(ROWS) and (pb["attention_mask"] == 0).any()  # padded rows
    assert kb["input_ids"].shape[0] == 1 and "attention_mask" not in kb  # one packed row, no padding
    assert (kb["position_ids"] == 0).sum() == len(ROWS)  # each example restarts its positions
    assert packed == pytest.approx(padded, rel=1e-5)


def test_without_example_boundaries_the_loss_differs(tmp_path):
    """The check above has teeth: positions running on across examples (attention crossing them) change it."""
    padded, _ = one_batch_loss(tmp_path / "a", [])
    packed, kb = one_batch_loss(tmp_path / "b", ["sft.packing=true"])
    tok = build_tokenizer()
    model = random_llama(tok, seed=0, **SHAPE).eval()
    crossing = {k: v for k, v in kb.items() if k != "position_ids"}
    crossing["position_ids"] = torch.arange(kb["input_ids"].shape[1])[None]
    with torch.no_grad():
        leaked = model(**{k: v for k, v in crossing.items() if k in ("input_ids", "position_ids")},
                       labels=kb["labels"]).loss.item()
    # a random model predicts nearly uniformly, so leakage moves the loss little, but far beyond packing's error
    assert leaked != pytest.approx(padded, rel=1e-5)
    assert abs(leaked - padded) > 10 * abs(packed - padded)


def test_the_recipes_attention_kernel_is_the_one_trained_and_packing_holds_with_it(tmp_path):
    """`attn_implementation` reaches the model the stage loads; eager attention on packed rows still keeps each
    example to itself (the same loss as padded sdpa batches), so the kernel choice is about speed alone."""
    from alignment.tiny_models import save
    from alignment.training import load_for_training

    tok = build_tokenizer()
    path = save(random_llama(tok, seed=0, **SHAPE), tok, tmp_path / "base")
    eager = load_recipe("recipes/tiny.yaml", ["sft.attn_implementation=eager"]).sft
    assert load_for_training(path, eager)[0].config._attn_implementation == "eager"
    default = load_recipe("recipes/tiny.yaml", []).sft
    assert load_for_training(path, default)[0].config._attn_implementation == "sdpa"

    padded, _ = one_batch_loss(tmp_path / "a", [])
    packed_eager, kb = one_batch_loss(tmp_path / "b", ["sft.packing=true"], attn="eager")
    assert kb["input_ids"].shape[0] == 1
    assert packed_eager == pytest.approx(padded, rel=1e-5)


def test_trainer_fields_only_returns_the_fields(tmp_path, monkeypatch):
    """Building a trainer's arguments touches neither the environment nor the disk; the stage's TensorBoard folder
    is set up by `train_runs`, which trains."""
    from alignment.training import trainer_fields

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    env = dict(os.environ)
    cfg = load_recipe("recipes/tiny.yaml", ["sft.save_steps=7"]).sft
    fields = trainer_fields(cfg, tmp_path / "stage", seed=3)
    assert dict(os.environ) == env
    assert list(tmp_path.iterdir()) == []
    assert fields["output_dir"] == str(tmp_path / "stage" / "trainer")
    assert (fields["seed"], fields["data_seed"], fields["save_steps"]) == (3, 3, 7)
    assert fields["report_to"] == ["tensorboard"] and fields["learning_rate"] == cfg.learning_rate
