"""Dialogs: multi-turn rollouts, each later turn of a dialog selected as its own example (`dialogs:` in a recipe).

Llama 3's SFT dialogs average 4.7 turns. Turn 1 is the round's own generate, score and select; this stage takes
select's SFT rows (each a prompt with its chosen response) and, for turns 2..`dialogs.turns`, appends the chosen
response and a next user turn, then has the teacher answer with K samples that are scored and selected exactly as
the first turn's were (the generate, score and select stages run on the turn's prompts, in `turn-<t>/`). The next
user turn is the prompt row's `followups[t-2]` (with the answer or tests its verifiers check), or, with
`dialogs.user: simulator`, what the teacher writes when asked for the user's next message. A dialog ends where a
turn had no chosen response (nothing passed select), no next user turn, or would no longer fit the teacher's
context with the answer's max_new_tokens (each counted).

Each turn's requests are generate requests with their own seeds, saved in shards, so a killed stage resumes: the
turn prompts are rebuilt from the previous turn's selection, which is the same, and only unsent requests go out.

    align stage dialogs --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from alignment.backends import make_requests, open_backend, send
from alignment.prompts import read_jsonl, read_prompts, system_prompt_for, write_jsonl
from alignment.seeding import model_identity
from alignment.shards import load_shards
from alignment.config import PromptSource
from alignment.stage_table import StageConfig, view
from alignment.stages import generate, score, select
from alignment.stages.result import StageResult
from alignment.stages.revise import context_check
from alignment.distribution import distribution

TURN = "#turn-"  # a later turn's prompt_id: the dialog's first prompt_id, then this, then the turn's number


def user_turn(followup) -> dict:
    """A scripted follow-up as a prompt row's fields: the user message, and what its turn is verified against."""
    turn = followup if isinstance(followup, dict) else {"content": followup}
    return {"message": {"role": "user", "content": turn["content"]},
            **{k: turn[k] for k in ("answer", "tests") if k in turn}}


def as_text(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def simulated_users(config: StageConfig, dialogs: dict[str, list[dict]], teacher: str, folder: Path,
                    round_n: int) -> dict[str, dict]:
    """The teacher's next user message for each dialog, one sample each, saved in shards like any request."""
    conversations = [[{"role": "user", "content": config.dialogs.simulator_prompt.format(dialog=as_text(d))}]
                     for d in dialogs.values()]
    sampling = {**config.sampling.model_dump(), "num_samples": 1}
    ids, requests = make_requests(conversations, model_identity(teacher), sampling,
                                  generate.round_seed(config.seed, round_n))
    done = load_shards(folder / "shards")
    if any(rid not in done for rid in requests):
        with open_backend(config.teacher, teacher, folder) as backend:
            send(backend, requests, done, folder / "shards")
    texts = {pid: done[rid]["completions"][0][0].strip() for pid, rid in zip(dialogs, ids)}
    return {pid: {"message": {"role": "user", "content": t}} for pid, t in texts.items() if t}


def next_prompts(chosen: list[dict], origins: dict[str, dict], turn: int, users: dict[str, dict]) -> list[dict]:
    """Turn `turn`'s prompt rows: each chosen row's dialog, its chosen answer, then the next user turn."""
    rows = []
    for r in chosen:
        first = r["prompt_id"].split(TURN)[0]
        if first not in users:
            continue
        nxt, origin = users[first], origins[first]
        rows.append({"prompt_id": f"{first}{TURN}{turn}", "messages": r["prompt"] + r["completion"] + [nxt["message"]],
                     **{k: nxt[k] for k in ("answer", "tests") if k in nxt},
                     **({"capability": origin["capability"]} if "capability" in origin else {})})
    return rows


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    cfg = config.dialogs
    chosen = read_jsonl(inputs["sft"])  # turn 1: select's rows, each a prompt and its chosen answer
    origins = read_prompts(inputs["prompts"]).by_id({r["prompt_id"] for r in chosen})
    models = {k: inputs[k] for k in ("reward_model", "teacher") if k in inputs}
    sft_rows, pair_rows, per_turn, ended = [], [], {}, Counter()
    lengths = Counter({r["prompt_id"]: 1 for r in chosen})  # assistant turns each dialog reached
    fits = context_check(config, str(inputs["teacher"]))
    with_system = lambda row: ([{"role": "system", "content": s}]  # noqa: E731  (as generate sends it)
                               if (s := system_prompt_for(row, config.teacher.system_prompts)) else []) \
        + row["messages"]
    for turn in range(2, cfg.turns + 1):
        folder = out_dir / f"turn-{turn}"
        for name in ("generate", "score", "select"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        if cfg.user == "followups":
            users = {pid: user_turn(o["followups"][turn - 2]) for pid, o in origins.items()
                     if len(o.get("followups", [])) > turn - 2}
        else:
            dialogs = {r["prompt_id"].split(TURN)[0]: r["prompt"] + r["completion"] for r in chosen}
            users = simulated_users(config, dialogs, str(inputs["teacher"]), folder / "simulator", round_n)
        ended["no_next_user_turn"] += sum(r["prompt_id"].split(TURN)[0] not in users for r in chosen)
        rows = next_prompts(chosen, origins, turn, users)
        # a dialog that would outgrow the teacher's context (with the answer's max_new_tokens) ends here, counted
        room = [fits(with_system(r)) for r in rows]
        ended["at_context_limit"] += room.count(False)
        rows = [r for r, ok in zip(rows, room) if ok]
        if not rows:
            break
        prompts = folder / "prompts.jsonl"
        write_jsonl(prompts, rows)
        # every row of the turn's file, in its order: the stages' own draw takes all when asked for no fewer
        drawn = config.prompts.model_copy(update={"num_prompts": len(rows), "sources": [],
                                                  "train_path": PromptSource(path=prompts)})
        sampled = generate.run(view(config, "generate", prompts=drawn), {"teacher": inputs["teacher"],
                                                                         "prompts": prompts},
                               folder / "generate", round_n)
        samples = folder / "generate" / sampled.outputs["samples"]
        scored = score.run(view(config, "score"), {"samples": samples, "prompts": prompts, **models},
                           folder / "score", round_n)
        picked = select.run(view(config, "select"), {"samples": samples, "prompts": prompts,
                                                     "scores": folder / "score" / scored.outputs["scores"]},
                            folder / "select", round_n)
        new_chosen = read_jsonl(folder / "select" / picked.outputs["sft"])
        pairs = read_jsonl(folder / "select" / picked.outputs["pairs"])
        ended["no_chosen_response"] += len(rows) - len(new_chosen)
        for r in new_chosen:
            lengths[r["prompt_id"].split(TURN)[0]] = turn
        sft_rows += [{**r, "turn": turn} for r in new_chosen]
        pair_rows += [{**r, "turn": turn} for r in pairs]
        per_turn[str(turn)] = {"dialogs": len(rows), "sft": len(new_chosen), "pairs": len(pairs),
                               "verified": scored.stats["verified"],
                               "hit_token_limit": sampled.stats["hit_token_limit"],
                               "prompt_tokens": sampled.stats["prompt_tokens"]}
        chosen = new_chosen
        if not chosen:
            break

    write_jsonl(out_dir / "sft.jsonl", sft_rows)
    write_jsonl(out_dir / "pairs.jsonl", pair_rows)
    return StageResult(
        outputs={"sft": "sft.jsonl", "pairs": "pairs.jsonl"},
        rows={"dialogs": len(lengths), "sft": len(sft_rows), "pairs": len(pair_rows)},
        stats={"user": cfg.user, "turns_planned": cfg.turns, "per_turn": per_turn,
               "dialog_ended": {k: v for k, v in ended.items() if v},
               # assistant turns each dialog reached, the first included (Llama 3's SFT dialogs: 4.7 on average)
               "assistant_turns_per_dialog": distribution(list(lengths.values()))},
    )
