"""Bootstrap: build the tiny recipe's tokenizer, student and teacher in code, since nothing can be downloaded.

A Llama-architecture model is pretrained on chat-formatted problems with reference answers drawn from the task's
generator (the evaluation questions excluded). Every `eval_every` steps its greedy accuracy is measured on a dev
set drawn the same way: the first checkpoint to reach `student_accuracy` becomes the student (weak, not
hopeless), the first to reach `teacher_accuracy` the teacher. Deterministic for a recipe; skipped once done.

    align stage bootstrap --recipe recipes/tiny.yaml
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from alignment.chat import build_tokenizer, render
from alignment.config import InputError
from alignment.backends.hf import sample
from alignment.prompts import read_prompts
from alignment.verifiers import final_answer
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.tasks import arithmetic
from alignment.tiny_models import random_llama, save


def dev_accuracy(model, tokenizer, dev: list[tuple[int, str, int]]) -> float:
    model.eval()
    answers = sample(model, tokenizer, [[{"role": "user", "content": arithmetic.question(*p)}] for p in dev],
                     num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=16, batch_size=len(dev), seeds=None,
                     desc="dev accuracy")
    model.train()
    tokenizer.padding_side = "right"
    return sum(final_answer(a[0].text, r"-?\d+") == str(arithmetic.solve(*p)) for a, p in zip(answers, dev)) / len(dev)


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    cfg = config.bootstrap
    tokenizer = build_tokenizer()
    model = random_llama(tokenizer, seed=config.seed, **cfg.llama_shape())
    held_out = {r["messages"][0]["content"] for r in read_prompts(inputs["eval_prompts"])}
    rng = random.Random(config.seed)
    dev = arithmetic.draw_problems(random.Random(f"{config.seed}-dev"), cfg.dev_size, held_out, unique=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    tokenizer.padding_side = "right"
    model.train()
    saved, curve = {}, []  # name -> the step and accuracy it was saved at; one point per dev check
    bar = tqdm(range(1, cfg.max_steps + 1), desc="bootstrap pretraining", unit="step")
    for step in bar:
        problems = arithmetic.draw_problems(rng, cfg.batch_size, held_out, unique=False)
        texts = [render(tokenizer, [{"role": "user", "content": arithmetic.question(*p)},
                                    {"role": "assistant", "content": arithmetic.solution(*p)}]) for p in problems]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        loss = model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every:
            continue
        acc = dev_accuracy(model, tokenizer, dev)
        curve.append({"step": step, "loss": round(loss.item(), 4), "dev_accuracy": acc})
        bar.set_postfix(loss=f"{loss.item():.3f}", dev_acc=f"{acc:.2f}")
        for name, target in (("student", cfg.student_accuracy), ("teacher", cfg.teacher_accuracy)):
            # the teacher must be a later checkpoint than the student, even when one check jumps past both targets
            later = name == "student" or saved.get("student", {}).get("step", step) < step
            if name not in saved and acc >= target and later:
                save(model, tokenizer, out_dir / name)
                saved[name] = {"step": step, "dev_accuracy": acc}
        if "teacher" in saved:
            break
    if "teacher" not in saved:
        best = max(c["dev_accuracy"] for c in curve) if curve else 0.0
        raise InputError(f"bootstrap: the teacher did not reach bootstrap.teacher_accuracy="
                         f"{cfg.teacher_accuracy} within bootstrap.max_steps={cfg.max_steps} (best dev accuracy "
                         f"{best:.3f}); raise max_steps or learning_rate, or lower the target")
    return StageResult(
        outputs={"student": "student", "teacher": "teacher"},
        rows={"pretraining_examples": step * cfg.batch_size, "dev_problems": len(dev)},
        stats={"parameters": sum(p.numel() for p in model.parameters()), "student": saved["student"],
               "teacher": saved["teacher"], "curve": curve, "vocab_size": len(tokenizer)},
    )
