"""One seeding rule: a request's samples come from its content and the model's identity, so they are the same
however requests are batched, sharded or resumed, and wherever the model or the run folder lies."""

import shutil

import torch
from transformers import TrainingArguments

from alignment.backends import Request
from alignment.backends.hf import TransformersBackend
from alignment.chat import build_tokenizer
from alignment.config import load_recipe
from alignment.backends.hf import sample
from alignment.seeding import model_identity
from alignment.stages.generate import build_requests
from alignment.tiny_models import random_llama, save

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
CONVS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in ((1, 2), (30, 4), (7, 77), (5, 5))]


def texts(rows):
    return [[c.text for c in cs] for cs in rows]


def test_a_conversations_samples_do_not_depend_on_its_batch_or_position():
    tok = build_tokenizer()
    model = random_llama(tok, seed=0, **SHAPE).eval()
    kw = dict(num_samples=3, temperature=1.0, top_p=0.9, max_new_tokens=12, desc="t")
    together = texts(sample(model, tok, CONVS, batch_size=4, seeds=[11, 22, 33, 44], **kw))
    alone = texts(sample(model, tok, CONVS[2:3], batch_size=1, seeds=[33], **kw))
    reordered = texts(sample(model, tok, CONVS[::-1], batch_size=2, seeds=[44, 33, 22, 11], **kw))
    assert alone[0] == together[2] and reordered[::-1] == together
    assert len({t for row in together for t in row}) > 4  # a random model samples, it does not repeat one text
    assert texts(sample(model, tok, CONVS[2:3], batch_size=1, seeds=[34], **kw)) != alone  # the seed matters


def test_the_backend_gives_a_request_the_same_samples_in_any_shard(tmp_path):
    tok = build_tokenizer()
    path = str(save(random_llama(tok, seed=0, **SHAPE), tok, tmp_path / "m"))
    reqs = [Request(c, n=2, temperature=1.0, top_p=1.0, max_tokens=10, seed=100 + i) for i, c in enumerate(CONVS)]

    def run(requests, shard_size, batch_size):
        backend = TransformersBackend(path, batch_size=batch_size, shard_size=shard_size)
        return {i: [c.text for c in r.completions] for i, r in backend.generate(requests)}

    whole = run(reqs, shard_size=4, batch_size=4)
    assert run(reqs, shard_size=1, batch_size=1) == whole
    assert run(reqs[3:], shard_size=3, batch_size=2) == {0: whole[3]}  # a resumed stage sends only what is left


def test_request_ids_and_seeds_follow_the_model_not_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tok = build_tokenizer()
    a = save(random_llama(tok, seed=0, **SHAPE), tok, tmp_path / "runs-a" / "teacher")
    b = tmp_path / "elsewhere" / "a-longer-runs-folder-on-the-shared-filesystem-of-the-cluster" / "teacher-copy"
    shutil.copytree(a, b)
    # as a Trainer leaves them: its arguments pickled beside the weights, naming the absolute output folder
    torch.save(TrainingArguments(output_dir=str(a), report_to=[]), a / "training_args.bin")
    torch.save(TrainingArguments(output_dir=str(b), report_to=[]), b / "training_args.bin")
    other = save(random_llama(tok, seed=0, **{**SHAPE, "intermediate_size": 96}), tok, tmp_path / "other")
    recipe = load_recipe("recipes/tiny.yaml")
    prompts = [{"prompt_id": "p", "messages": CONVS[0]}]
    ids_a, reqs_a, _ = build_requests(prompts, recipe, model_identity(str(a)), base_seed=7)
    ids_b, reqs_b, _ = build_requests(prompts, recipe, model_identity(str(b)), base_seed=7)
    assert ids_a == ids_b and reqs_a[ids_a[0]].seed == reqs_b[ids_b[0]].seed
    assert build_requests(prompts, recipe, model_identity(str(other)), base_seed=7)[0] != ids_a



def test_two_recipes_seeds_never_share_a_rounds_samples():
    from alignment.stages.generate import round_seed

    recipe, prompts, seen = load_recipe("recipes/tiny.yaml"), [{"prompt_id": "p", "messages": CONVS[0]}], {}
    for seed in (0, 1000):
        for round_n in (1, 2):
            ids, _, _ = build_requests(prompts, recipe, "teacher", round_seed(seed, round_n))
            assert ids[0] not in seen, f"seed {seed} round {round_n} repeats seed/round {seen.get(ids[0])}"
            seen[ids[0]] = (seed, round_n)
