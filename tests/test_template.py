"""The chat format read off each model's own template (alignment.template), on four families built in code."""

import pytest
from alignment.chat import build_tokenizer
from alignment.config import InputError, load_recipe
from alignment.stages.dpo import build_trainer
from alignment.template import end_of_turn_id, ensure_pad_token, formatting_token_ids, load_tokenizer
from alignment.tiny_models import random_llama
from template_families import families

FAMILIES = families()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_formatting_tokens_end_of_turn_and_pad_come_from_the_template(name):
    tok, formatting, end_of_turn, pad = families()[name]
    assert {tok.convert_ids_to_tokens(i) for i in formatting_token_ids(tok)} == formatting
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok, name)) == end_of_turn
    assert ensure_pad_token(tok, name) == pad
    assert tok.pad_token == ("<|finetune_right_pad_id|>" if pad == "own" else pad) and tok.pad_token_id is not None


def test_a_template_with_no_special_tokens_has_nothing_to_mask_and_no_end_of_turn():
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert formatting_token_ids(tok) == []
    with pytest.raises(InputError, match="writes no special token after an assistant turn"):
        end_of_turn_id(tok, "teacher.model_name_or_path")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dpo_masks_the_familys_end_of_turn_in_every_completion_and_counts_it(tmp_path, name):
    tok, _, end_of_turn, _ = families()[name]
    ensure_pad_token(tok, name)
    # Responses with no formatting token inside: what the template writes after each is masked, nothing else.
    pairs = [{"prompt": [{"role": "user", "content": "What is 7 + 8?"}],
              "chosen": [{"role": "assistant", "content": "7 + 8 = 15"}],
              "rejected": [{"role": "assistant", "content": "16"}]}] * 2
    model = random_llama(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    batches = {}
    for mask in (True, False):
        recipe = load_recipe("recipes/tiny.yaml", ["dpo.report_to=[]", "dpo.max_length=256",
                                                   f"dpo.mask_formatting_tokens={str(mask).lower()}"])
        trainer = build_trainer(recipe, model, tok, pairs, tmp_path / str(mask))
        batches[mask] = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        if mask:
            counted = trainer.data_collator.masked_per_batch[-1]
    dropped = (batches[False]["completion_mask"] - batches[True]["completion_mask"]).bool()
    # one end of turn after each of 2 chosen and 2 rejected responses
    assert [tok.convert_ids_to_tokens(int(t)) for t in batches[True]["input_ids"][dropped]] == [end_of_turn] * 4
    assert counted == 4  # what the stage's statistics record for this batch
    kept = batches[True]["input_ids"][0][batches[True]["completion_mask"][0].bool()]
    assert tok.decode(kept).strip().startswith("7 + 8 = 15") and end_of_turn not in tok.decode(kept)


def test_a_tokenizer_without_pad_or_eos_is_refused_naming_the_key(tmp_path):
    tok = families()["chatml"][0]  # fresh: other tests give theirs a pad
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match="student.model_name_or_path: the tokenizer has neither a pad token nor"):
        load_tokenizer(tmp_path / "m", "student.model_name_or_path")


def test_a_tokenizer_without_a_pad_token_generates_scores_and_trains(tmp_path):
    """Meta's Llama 3.x base tokenizers have no pad token; transformers raised ValueError in generate (teacher),
    the reward model and the trainers. Every stage loads tokenizers through load_tokenizer, which picks one."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignment.backends.hf import load_policy, sample
    from alignment.rewards import RewardModel
    from alignment.tiny_models import save
    from alignment.training import load_for_training

    tok = families()["chatml"][0]
    assert tok.pad_token is None
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    save(random_llama(tok, seed=0, **shape), tok, tmp_path / "policy")
    model, loaded = load_policy(str(tmp_path / "policy"))
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_choice == "<|im_end|>"  # its EOS: it has no reserved pad
    questions = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "And 10 + 20 + 30?"}]]
    out = sample(model, loaded, questions, num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=4, batch_size=2,
                 seeds=[1, 2], desc="no pad")  # two prompts of different length: the batch is padded
    assert [len(o) for o in out] == [2, 2]
    assert load_for_training(tmp_path / "policy")[1].pad_token == "<|im_end|>"

    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), num_labels=1, **shape))
    save(rm, tok, tmp_path / "rm")
    answers = [q + [{"role": "assistant", "content": a}] for q, a in zip(questions, ["5", "60, as 10 + 20 + 30 = 60"])]
    together = RewardModel(str(tmp_path / "rm"), batch_size=2)(answers)
    alone = [RewardModel(str(tmp_path / "rm"), batch_size=1)([a])[0] for a in answers]
    assert together == pytest.approx(alone, abs=1e-5)  # padding is masked: batching changes no score
