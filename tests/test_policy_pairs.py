"""On-policy pairs (dpo.pairs_from: policy): the round's SFT model samples the prompts generate drew, and DPO trains
on pairs of its own samples; by default DPO's pairs stay select's, and the recipe's fingerprints are unchanged."""

import json
from collections import Counter
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignment.config import load_recipe
from alignment.prompts import read_prompts
from alignment.round import stage_config
from alignment.seeding import model_identity
from alignment.stage_table import STAGES, StageConfig, Upstream, round_stages
from alignment.stages import policy_pairs
from alignment.stages.generate import draw_round_prompts
from alignment.chat import render
from alignment.tiny_models import build_tokenizer, random_llama, save

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny.yaml")


def test_dpo_reads_the_policys_pairs_only_when_asked():
    default, policy = load_recipe(TINY), load_recipe(TINY, ["dpo.pairs_from=policy", "dpo.accumulate=1"])
    names = [s.name for s in round_stages(policy, 2)]
    assert names[names.index("sft") + 1:names.index("dpo")] == ["policy_pairs"]
    assert "policy_pairs" not in [s.name for s in round_stages(default, 2)]
    inputs = STAGES["dpo"].inputs(policy, 2)
    assert (inputs["pairs"].stage, inputs["pairs"].round) == ("policy_pairs", 2)
    assert [(u.stage, u.round) for u in inputs["earlier_pairs"]] == [("policy_pairs", 1)]
    assert STAGES["dpo"].inputs(default, 2)["pairs"].stage == "select"
    # the key stays out of DPO's hashed configuration until it is used: runs made before it are not stale
    assert "pairs_from" not in stage_config(default, "dpo")["dpo"]
    assert stage_config(policy, "dpo")["dpo"]["pairs_from"] == "policy"
    assert STAGES["policy_pairs"].inputs(policy, 2)["policy"] == Upstream("sft", "model", 2, "dpo.pairs_from")


def taught(tok, prompts: list[dict]):
    """A one-layer Llama taught the drawn prompts' answers for a few steps: it ends its answers (a sample cut at
    the token limit takes no part in selection) and gets some right, so the pairs have a verified chosen side."""
    model = random_llama(tok, seed=3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=256)
    texts = [render(tok, [*p["messages"], {"role": "assistant", "content": f"= {p['answer']}"}]) for p in prompts]
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_the_policy_samples_the_drawn_prompts_and_pairs_its_own_answers(tmp_path):
    tok = build_tokenizer()
    prompts = ROOT / "data/arithmetic/train.jsonl"
    drawn = draw_round_prompts(read_prompts(prompts), 6, 0, 2)
    policy = save(taught(tok, drawn), tok, tmp_path / "sft-model")
    torch.manual_seed(0)  # a random reward model: continuous rewards, so that most prompts have a pair
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    recipe = load_recipe(TINY, ["dpo.pairs_from=policy", "prompts.num_prompts=6", "sampling.max_new_tokens=12",
                                f"reward.reward_model={{model_name_or_path: {tmp_path / 'rm'}, batch_size: 8}}",
                                "select={sft_min_reward: -100.0, pair_min_margin: 1.0e-6}",
                                "teacher.system_prompts={default: 'Be brief.'}"])
    cfg = StageConfig("policy_pairs", stage_config(recipe, "policy_pairs"))
    out = tmp_path / "policy_pairs"
    out.mkdir()
    result = policy_pairs.run(cfg, {"policy": policy, "prompts": prompts, "reward_model": tmp_path / "rm"}, out, 2)

    samples = [json.loads(x) for x in (out / result.outputs["samples"]).read_text().splitlines()]
    assert Counter(s["prompt_id"] for s in samples) == {p["prompt_id"]: recipe.sampling.num_samples for p in drawn}
    assert {s["teacher"] for s in samples} == {model_identity(str(policy))}  # the policy answered, nobody else
    assert {s["system_prompt"] for s in samples} == {None}  # the teacher's system prompts are not the policy's
    pairs = [json.loads(x) for x in (out / result.outputs["pairs"]).read_text().splitlines()]
    assert pairs and result.rows["pairs"] == len(pairs)
    answers = {(s["prompt_id"], s["sample_index"]): s["response"] for s in samples}
    scores = {(r["prompt_id"], r["sample_index"]): r["reward"]
              for r in map(json.loads, (out / result.outputs["scores"]).read_text().splitlines())}
    for p in pairs:  # each side is one of the policy's own samples of that prompt, the chosen one scored higher
        chosen, rejected = (p["prompt_id"], p["chosen_index"]), (p["prompt_id"], p["rejected_index"])
        assert p["chosen"][0]["content"] == answers[chosen] and p["rejected"][0]["content"] == answers[rejected]
        assert scores[chosen] - scores[rejected] >= 1e-6
