"""The DPO stage's loss (TRL's DPOTrainer as the stage configures it) against a hand computation on a tiny batch:
sequences scored one at a time with plain log-softmax, formatting tokens dropped by hand, Llama 3's formula."""

import pytest
import torch
import torch.nn.functional as F

from alignment.chat import build_tokenizer, token_ids
from alignment.config import load_recipe
from alignment.stages.dpo import build_trainer
from alignment.tiny_models import random_llama

# What Llama 3's template writes around contents, and its end of a tool-call step.
LLAMA3_FORMATTING = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
PAIRS = [  # the second chosen response carries an end-of-message token inside it, masked too
    {"prompt": [{"role": "user", "content": "What is 95 - 55?"}],
     "chosen": [{"role": "assistant", "content": "95 - 55 = 40"}],
     "rejected": [{"role": "assistant", "content": "95 - 55 = 50"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 8?"}],
     "chosen": [{"role": "assistant", "content": "15<|eom_id|>ok"}],
     "rejected": [{"role": "assistant", "content": "7 + 8 = 16, I think"}]},
]


def sequence_logps(model, tok, prompt, response, mask: bool) -> torch.Tensor:
    """Per-token log-probabilities of the response tokens (the template's end-of-turn included), one sequence,
    no padding; formatting tokens dropped when `mask`."""
    p = token_ids(tok, prompt, add_generation_prompt=True)
    full = token_ids(tok, prompt + response)
    assert full[:len(p)] == p
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logps = F.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    resp = logps[len(p) - 1:]
    resp_tokens = full[len(p):]
    special = {tok.convert_tokens_to_ids(t) for t in LLAMA3_FORMATTING}
    keep = [not (mask and t in special) for t in resp_tokens]
    return resp[torch.tensor(keep)]


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("terms", [(["sigmoid"], [1.0]), (["sigmoid", "sft"], [1.0, 0.2])])
def test_dpo_loss_matches_hand_computation(tmp_path, mask, terms):
    loss_type, weights = terms
    tok = build_tokenizer()
    policy = random_llama(tok, seed=0, **SHAPE)
    ref = random_llama(tok, seed=1, **SHAPE)  # a reference unlike the policy, so the DPO term is not log 2
    beta = 0.1
    recipe = load_recipe("recipes/tiny.yaml", [f"dpo.mask_formatting_tokens={str(mask).lower()}",
                                               f"dpo.loss_type={loss_type}", f"dpo.loss_weights={weights}",
                                               f"dpo.beta={beta}", "dpo.report_to=[]", "dpo.max_length=256"])
    trainer = build_trainer(recipe, policy, tok, PAIRS, tmp_path, ref_model=ref)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    policy.eval()  # no dropout in either computation
    loss = trainer.compute_loss(trainer.model, batch).item()

    dpo_terms, chosen_tokens = [], []
    for pair in PAIRS:
        lp = {k: sequence_logps(policy, tok, pair["prompt"], pair[k], mask) for k in ("chosen", "rejected")}
        lr = {k: sequence_logps(ref, tok, pair["prompt"], pair[k], mask) for k in ("chosen", "rejected")}
        margin = (lp["chosen"].sum() - lr["chosen"].sum()) - (lp["rejected"].sum() - lr["rejected"].sum())
        dpo_terms.append(-F.logsigmoid(beta * margin))
        chosen_tokens.append(lp["chosen"])
    expected = weights[0] * torch.stack(dpo_terms).mean()
    if "sft" in loss_type:
        expected += weights[1] * -torch.cat(chosen_tokens).mean()  # NLL averaged over every chosen token
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_masking_changes_the_loss_and_removes_exactly_the_formatting_tokens(tmp_path):
    tok = build_tokenizer()
    recipe = load_recipe("recipes/tiny.yaml", ["dpo.report_to=[]", "dpo.max_length=256"])
    trainer = build_trainer(recipe, random_llama(tok, seed=0, **SHAPE), tok, PAIRS, tmp_path)
    unmasked = build_trainer(load_recipe("recipes/tiny.yaml", ["dpo.report_to=[]", "dpo.max_length=256", "dpo.mask_formatting_tokens=false"]),
                             random_llama(tok, seed=0, **SHAPE), tok, PAIRS, tmp_path / "u")
    rows = [trainer.train_dataset[i] for i in range(2)]
    a, b = trainer.data_collator(rows), unmasked.data_collator(rows)
    dropped = (b["completion_mask"] - a["completion_mask"]).bool()
    # 4 end-of-turn tokens (2 chosen, 2 rejected) and the one end-of-message token inside a chosen response
    assert dropped.sum().item() == 5
    names = {tok.convert_ids_to_tokens(int(t)) for t in a["input_ids"][dropped]}
    assert names == {"<|eot_id|>", "<|eom_id|>"}


@pytest.mark.parametrize("precompute", [True, False])
def test_the_recipes_precompute_setting_reaches_trl(tmp_path, precompute):
    """`dpo.precompute_ref_log_probs` is TRL's: on, the reference's log-probabilities (the masked hand computation
    above) are in the data before any step; off, they are not, and the reference runs at every step."""
    tok = build_tokenizer()
    recipe = load_recipe("recipes/tiny.yaml", ["dpo.report_to=[]", "dpo.max_length=256",
                                               f"dpo.precompute_ref_log_probs={str(precompute).lower()}"])
    policy = random_llama(tok, seed=0, **SHAPE)
    # Run at every step, a full fine-tuning reference is a second model (the stage loads it from the SFT model's
    # folder; this policy has none to load from); precomputed, TRL takes it from the untrained policy.
    ref = None if precompute else random_llama(tok, seed=0, **SHAPE)
    trainer = build_trainer(recipe, policy, tok, PAIRS, tmp_path, ref_model=ref)
    assert trainer.args.precompute_ref_log_probs is precompute
    assert ("ref_chosen_logps" in trainer.train_dataset.column_names) is precompute
    if precompute:
        for i, pair in enumerate(PAIRS):
            for k in ("chosen", "rejected"):
                expected = sequence_logps(policy, tok, pair["prompt"], pair[k], mask=True).sum().item()
                assert trainer.train_dataset[i][f"ref_{k}_logps"] == pytest.approx(expected, rel=1e-5)


def test_reference_log_probs_are_recovered_from_the_logged_rewards():
    from alignment.stages.dpo import log_probs

    history = [{"step": 5, "logps/chosen": -10.0, "logps/rejected": -12.0, "rewards/chosen": 0.5,
                "rewards/rejected": -0.2}, {"step": 5, "train_loss": 0.6}]
    # reward = beta * (policy - reference): reference = policy - reward / beta = -10 - 5 and -12 + 2
    assert log_probs(history, beta=0.1) == [{"step": 5, "policy_chosen": -10.0, "policy_rejected": -12.0,
                                             "ref_chosen": -15.0, "ref_rejected": -10.0}]
