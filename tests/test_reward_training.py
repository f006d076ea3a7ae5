"""The reward_training stage: ranked triples, a stable held-out split, and a reward model that learns a preference
it can then be checked on, through the stage's own `run`."""

import json
import random

import pytest
from transformers import AutoConfig

from alignment.chat import build_tokenizer
from alignment.config import InputError, load_recipe
from alignment.stages import reward_training
from alignment.tiny_models import random_llama, save

P = [{"role": "user", "content": "Is 2 + 2 = 4?"}]
A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731


def test_an_edited_response_ranks_above_chosen_above_rejected():
    row = {"prompt_id": "x", "prompt": P, "chosen": A("yes"), "rejected": A("no"), "edited": A("Yes, it is.")}
    pairs = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in reward_training.ranked_pairs(row)]
    assert pairs == [("Yes, it is.", "yes"), ("Yes, it is.", "no"), ("yes", "no")]
    assert len(reward_training.ranked_pairs({**row, "edited": None})) == 1


def test_the_held_out_split_is_by_prompt_and_stable():
    ids = [f"prompt-{i}" for i in range(5000)]
    held = [reward_training.held_out(i, 0.1) for i in ids]
    assert held == [reward_training.held_out(i, 0.1) for i in ids]  # the same prompts every round
    assert 0.08 < sum(held) / len(held) < 0.12
    assert not any(reward_training.held_out(i, 0.0) for i in ids)


def test_a_bad_preference_file_is_named(tmp_path):
    f = tmp_path / "human.jsonl"
    f.write_text(json.dumps({"prompt": P, "chosen": A("a"), "rejected": "b"}) + "\n")
    with pytest.raises(InputError, match=r"human.jsonl: row 1: rejected must be a non-empty list of messages"):
        reward_training.read_preferences(f)


@pytest.mark.slow
def test_the_stage_trains_a_reward_model_that_ranks_held_out_pairs(tmp_path):
    tok = build_tokenizer()
    model = save(random_llama(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2), tok, tmp_path / "policy")
    human = tmp_path / "human.jsonl"  # one annotated row with an edit: three more pairs
    human.write_text(json.dumps({"prompt": P, "chosen": A("yes. Correct."), "rejected": A("no. Wrong."),
                                 "edited": A("Yes, 4. Correct.")}) + "\n")
    recipe = load_recipe("recipes/tiny.yaml", ["reward_training.num_train_epochs=3", "reward_training.logging_steps=5",
                                               "reward_training.report_to=[]", f"reward_training.preference_paths=[{human}]",
                                               "reward_training.held_out_share=0.2"])

    def train(good: str, bad: str, name: str):
        rng = random.Random(0)
        rows = []
        for i in range(400):  # the right sum is chosen, a wrong one rejected; a closing word marks which is which
            a, b = rng.randrange(10, 50), rng.randrange(10, 50)
            wrong = a + b + rng.choice([-10, -1, 1, 10])
            rows.append({"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                         "chosen": A(f"{a} + {b} = {a + b}. {good}"), "rejected": A(f"{a} + {b} = {wrong}. {bad}")})
        pairs = [tmp_path / f"{name}-round-{k}.jsonl" for k in (1, 2)]  # two rounds' select outputs, 200 rows each
        for k, path in enumerate(pairs):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[200 * k:200 * (k + 1)]))
        out = tmp_path / name
        out.mkdir()
        return reward_training.run(recipe, {"model": model, "pairs": pairs, "preferences": [human]}, out, 2), out

    # An untrained head ranks every pair by the closing word, so it gets all of them right or all wrong. The words
    # are set against the untrained preference (the head starts from the recipe's seed either way), so a held-out
    # accuracy near 1 afterwards can only come from training.
    result, out = train("Correct.", "Wrong.", "a")
    if result.stats["held_out_pair_accuracy_before"] > 0.5:
        result, out = train("Wrong.", "Correct.", "b")
    assert result.rows["preference_rows"] == 401  # both rounds' files and the annotated row
    assert result.stats["resumed_from_step"] == {} and result.stats["seeds"] == [recipe.seed]
    assert result.rows["train_pairs"] + result.rows["held_out_pairs"] == 403
    assert 50 <= result.rows["held_out_pairs"] <= 110  # ~20% of 400 prompts
    assert result.stats["held_out_pair_accuracy_before"] < 0.5
    assert result.stats["held_out_pair_accuracy"] >= 0.95
    cfg = AutoConfig.from_pretrained(out / "model")  # what scoring with `reward_model: trained` will load
    assert cfg.num_labels == 1 and cfg.architectures == ["LlamaForSequenceClassification"]
