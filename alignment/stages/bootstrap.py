"""Bootstrap: build the tiny recipe's tokenizer, student and teacher in code, since nothing can be downloaded.

A Llama-architecture model is pretrained on chat-formatted problems with reference answers drawn from the task's
generator (the evaluation questions excluded). The student is saved early in that run, weak but not hopeless;
the teacher is the same run trained longer. Deterministic for a given recipe, and skipped once its manifest exists.

    align stage bootstrap --recipe recipes/tiny.yaml
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.chat import build_tokenizer, render
from alignment.config import Recipe
from alignment.prompts import read_prompts
from alignment.stages.result import StageResult
from alignment.tasks import arithmetic


def tiny_llama(cfg, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    ))


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    cfg = recipe.bootstrap
    tokenizer = build_tokenizer()
    model = tiny_llama(cfg, tokenizer, recipe.seed)
    held_out = {r["messages"][0]["content"] for r in read_prompts(inputs["eval_prompts"])}

    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    tokenizer.padding_side = "right"
    saved, losses, excluded = {}, [], 0
    model.train()
    for step in tqdm(range(1, cfg.teacher_steps + 1), desc="bootstrap pretraining", unit="step"):
        problems = []
        while len(problems) < cfg.batch_size:
            p = arithmetic.draw_problem(rng)
            if arithmetic.question(*p) in held_out:
                excluded += 1
                continue
            problems.append(p)
        texts = [render(tokenizer, [{"role": "user", "content": arithmetic.question(*p)},
                                    {"role": "assistant", "content": arithmetic.solution(*p)}]) for p in problems]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        for name, at in (("student", cfg.student_steps), ("teacher", cfg.teacher_steps)):
            if step == at:
                model.save_pretrained(out_dir / name)
                tokenizer.padding_side = "left"
                tokenizer.save_pretrained(out_dir / name)
                tokenizer.padding_side = "right"
                saved[name] = sum(losses[-50:]) / len(losses[-50:])

    params = sum(p.numel() for p in model.parameters())
    return StageResult(
        outputs={"student": "student", "teacher": "teacher"},
        rows={"pretraining_examples": cfg.teacher_steps * cfg.batch_size},
        stats={"parameters": params, "final_loss_student": saved["student"], "final_loss_teacher": saved["teacher"],
               "held_out_questions_excluded": excluded, "vocab_size": len(tokenizer)},
    )
