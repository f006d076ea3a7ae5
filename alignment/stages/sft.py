"""SFT: fine-tune the round's input model on the rejection-sampled best responses (TRL SFTTrainer).

Rows are prompt-completion conversations, so the loss falls on the response tokens only: the prompt, rendered
with the chat template and its generation header, is masked, as in Llama 3. Optional: packing (padding-free),
LoRA/QLoRA adapters merged into a full model at the end, several seeds averaged, multi-process training through
`accelerate launch`. An interrupted run resumes from its last checkpoint.

    align stage sft --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignment.config import InputError
from alignment.prompts import read_jsonl
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.training import (load_for_training, loss_summary, newest_first, peft_config, selected_rows, train_runs,
                                trainer_fields)


def build_trainer(config: StageConfig, model, tokenizer, rows: list[dict], out_dir: Path, seed: int | None = None):
    cfg = config.sft
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    # Packing uses TRL's best-fit decreasing: whole examples per row (none cut), padding-free. transformers reads
    # the restarting position ids as example boundaries and masks attention per example, with SDPA too.
    args = SFTConfig(**trainer_fields(cfg, out_dir, config.seed if seed is None else seed),
                     completion_only_loss=True, packing=cfg.packing, packing_strategy="bfd")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=peft_config(cfg))


ROLES = ("system", "user", "assistant", "ipython", "tool")


def conversation_rows(path: Path) -> list[dict]:
    """An extra source's rows as prompt-completion examples, checked: `prompt` and `completion` message lists (the
    completion all assistant messages), or a `messages` dialog ending in the assistant's turn. A dialog gives one
    example per assistant message, everything before it as the prompt, so every assistant message of a multi-turn
    or tool-call dialog is trained (a tool-call step ending with its stop_reason) and no tool output or user turn
    is."""
    rows = []
    for i, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {i}: a JSON object with `prompt` and `completion`, or `messages`")
        dialog = "messages" in row and "completion" not in row
        msgs = row["messages"] if dialog else (row.get("prompt") or []) + (row.get("completion") or [])
        if dialog and not (isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) for m in msgs)
                           and msgs[-1].get("role") == "assistant"):
            raise InputError(f"{path}: row {i}: messages must be a list of messages ending in the assistant's")
        for key in ("messages",) if dialog else ("prompt", "completion"):
            if not (isinstance(row.get(key), list) and row[key] and all(isinstance(m, dict) for m in row[key])):
                raise InputError(f"{path}: row {i}: needs `prompt` and `completion` (message lists) or `messages`")
            if bad := next((m for m in row[key] if m.get("role") not in ROLES
                            or not isinstance(m.get("content"), str)), None):
                raise InputError(f"{path}: row {i}: {key}: a message needs a role ({', '.join(ROLES)}) and a "
                                 f"string content, got {json.dumps(bad)[:80]}")
        if not dialog and (bad := next((m for m in row["completion"] if m["role"] != "assistant"), None)):
            raise InputError(f"{path}: row {i}: completion: every message is trained on, so all must be the "
                             f"assistant's, got a {bad['role']} message (give a tool-call dialog as `messages`)")
        if dialog:
            rows += [{"prompt": msgs[:j], "completion": [m], "_where": (str(path), i)}
                     for j, m in enumerate(msgs) if m["role"] == "assistant" and j > 0]
        else:
            rows.append({"prompt": row["prompt"], "completion": row["completion"], "_where": (str(path), i)})
    return rows


def balance(rows: list[dict], cfg, seed: int, round_n: int) -> tuple[list[dict], dict]:
    """`sft.balance`: each capability keeps a seeded draw of its rows, k_c = floor(share_c * N) with N the largest
    total every capability can fill at its share (N = min over c of rows_c / share_c). Refused, naming the
    capability, when a capability has rows but no share, a share but no rows, or ends past the tolerance."""
    total = sum(cfg.shares.values())
    target = {c: s / total for c, s in cfg.shares.items()}
    by_cap: dict[str, list[dict]] = {}
    for r in rows:
        by_cap.setdefault(r.get("capability") or "default", []).append(r)
    if unknown := sorted(set(by_cap) - set(target)):
        raise InputError(f"sft.balance.shares: SFT rows of capability {unknown[0]!r} ({len(by_cap[unknown[0]])} rows) "
                         f"have no share; give it one (shares: {sorted(target)})")
    if empty := sorted(c for c in target if c not in by_cap):
        raise InputError(f"sft.balance.shares: capability {empty[0]!r} has a share but no SFT rows this round (after "
                         "filtering); it cannot be brought to its share")
    n = min(len(by_cap[c]) / target[c] for c in target)
    kept = {c: random.Random(f"{seed}-{round_n}-balance-{c}").sample(by_cap[c], min(len(by_cap[c]),
                                                                                   int(target[c] * n + 1e-9)))
            for c in target}
    out = [r for c in target for r in kept[c]]
    shares = {c: len(kept[c]) / max(1, len(out)) for c in target}
    stats = {c: {"rows": len(by_cap[c]), "kept": len(kept[c]), "target": round(target[c], 4),
                 "share": round(shares[c], 4)} for c in target}
    worst = max(target, key=lambda c: abs(shares[c] - target[c]))
    if abs(shares[worst] - target[worst]) > cfg.tolerance:
        raise InputError(f"sft.balance: capability {worst!r} ends at {shares[worst]:.3f} of the {len(out)} kept rows, "
                         f"{abs(shares[worst] - target[worst]):.3f} from its share {target[worst]:.3f} (tolerance "
                         f"{cfg.tolerance}); too few rows to balance: raise the tolerance or draw more prompts")
    return out, {"per_capability": stats, "max_deviation": round(abs(shares[worst] - target[worst]), 4),
                 "tolerance": cfg.tolerance, "rows_before": len(rows), "rows_after": len(out)}


def assemble(cfg, inputs: dict, seed: int, round_n: int) -> tuple[list[dict], dict]:
    """The round's SFT rows: this round's selection, the earlier rounds' that `sft.accumulate` adds (a row
    repeated across rounds is kept once, the newest), then each extra source `epochs` times (whole repeats, and a
    seeded share of its rows for the fraction). With the count per source, for the statistics."""
    earlier = inputs.get("earlier_sft", [])
    rounds = [(f"round {round_n}", inputs["sft"])] + [(f"round {round_n - 1 - i}", p) for i, p in enumerate(earlier)]
    # later dialog turns (the dialogs stage), this round's first: each turn a row with the dialog before it
    rounds += [(f"round {round_n - i} dialogs", p) for i, p in enumerate(inputs.get("dialogs_sft", []))]
    rows, sources = newest_first(rounds, ("prompt", "completion"))
    for spec, path in zip(cfg.extra_sources, inputs.get("extra_sft", [])):
        own = conversation_rows(Path(path))
        whole, part = int(spec.epochs), spec.epochs - int(spec.epochs)
        share = int(part * len(own) + 0.5)  # half up: 1.5 epochs of one row is two rows
        extra = own * whole + random.Random(f"{seed}-{round_n}-{spec.path}").sample(own, share)
        sources[str(spec.path)] = {"rows": len(own), "epochs": spec.epochs, "used": len(extra)}
        rows += [{**r, "capability": spec.capability} for r in extra] if spec.capability else extra
    return rows, sources


def run(config: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    cfg = config.sft
    rows, sources = assemble(cfg, inputs, config.seed, round_n)
    balanced = None
    if cfg.balance is not None:
        rows, balanced = balance(rows, cfg.balance, config.seed, round_n)
    rows, tokenizer, over, left_out = selected_rows(rows, inputs["sft"], "SFT examples", inputs["model"], cfg.max_length,
                                          "sft.max_length", ("completion",))

    def build(run_dir: Path, seed: int):
        model, tok = load_for_training(inputs["model"], cfg)  # each run starts from the same weights
        return build_trainer(config, model, tok, rows, run_dir, seed)

    histories, runs = train_runs(cfg, config.seed, out_dir, inputs["model"], build)
    stats = {**loss_summary(histories[0]), **runs, "lora": cfg.lora is not None, "packing": cfg.packing,
             "pad_token": tokenizer.pad_choice, **({"sources": sources} if len(sources) > 1 else {}),
             **({"balance": balanced} if balanced else {})}
    if len(histories) > 1:
        stats["last_loss_per_run"] = [loss_summary(h).get("last_loss") for h in histories]
    return StageResult(outputs={"model": "model", "log_history": "log_history.json", "logs": "logs"},
                       rows={"examples": len(rows), "truncated": over, "tool_call_steps_left_out": left_out},
                       stats=stats)
