"""Revise: execution feedback, as Llama 3 built its code data (section 4.3.1).

A code sample that fails its tests goes back to the teacher: the problem, the failing code as the assistant's
turn, and a user turn with the tail of the error (the failing check or how the program stopped, then its stdout
and stderr). The teacher's answer is run against the same tests; one that fails again goes back with its own
error, up to `revise.max_turns` turns. Which samples: per prompt, the `revise.samples_per_prompt` best-ranked
failing ones (most checks passed, then the lowest sample_index), by default only on prompts none of whose samples
passed (`revise.only_unsolved`).

A dialog grows by an attempt and a feedback turn each turn; one that would no longer fit the teacher's context
(with the answer's max_new_tokens) ends there, counted as `ended_at_context_limit`, instead of failing the stage.

Every revision is a generate request of its own (its conversation, teacher and settings hash to its id and seed;
one sample each), saved to this stage's shards as it finishes, so a killed stage resumes where it stopped: turn t
is rebuilt from the saved answers of turn t - 1. The output is the round's samples with the revisions appended
(each keyed by prompt_id and a new sample_index, with `revision: {of, turn, dialog}`), so score scores them as it
scores any sample and select can keep a passing revision as the prompt's SFT row and its failing first attempt as
the DPO rejected side (`revise.sft_format`, `revise.rejected`).

    align stage revise --recipe recipes/code.yaml --round 1
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

from alignment.backends import make_requests, open_backend, send
from alignment.prompts import read_jsonl, read_prompts, write_jsonl
from alignment.seeding import model_identity, request_seed
from alignment.shards import load_shards
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.distribution import distribution
from alignment.verifiers import applies, code_feedback


ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


class Outcomes:
    """Each tested answer's outcome (passed, share of checks passed, the error to show), by (prompt_id,
    sample_index), saved as it is decided and before any request carries it: a re-run rebuilds the same
    conversations, so the same request ids, from it, even where running the code again would print or time out
    otherwise (an object's address, a loop cut at another point). Addresses are masked for the same reason."""

    def __init__(self, path: Path):
        self.path = path
        lines = path.read_text().split("\n")[:-1] if path.exists() else []  # a line cut by a kill has no "\n"
        self.saved = {(r["prompt_id"], r["sample_index"]): (r["passed"], r["share"], r["error"])
                      for r in map(json.loads, lines)}

    def decide(self, verifiers, items: list[tuple[dict, dict, str]], chars: int) -> list[tuple[bool, float, str]]:
        """(prompt row, sample key {prompt_id, sample_index}, response) -> outcomes, deciding only the unsaved."""
        key = lambda k: (k["prompt_id"], k["sample_index"])  # noqa: E731
        todo = [it for it in items if key(it[1]) not in self.saved]
        if todo:
            with open(self.path, "a") as f:
                for (_, k, _), (passed, share, error) in zip(todo, code_feedback(
                        verifiers, [(p, r) for p, _, r in todo], chars)):
                    self.saved[key(k)] = (passed, share, ADDRESS.sub("0x...", error))
                    f.write(json.dumps({"prompt_id": k["prompt_id"], "sample_index": k["sample_index"],
                                        "passed": passed, "share": share, "error": self.saved[key(k)][2]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return [self.saved[key(k)] for _, k, _ in items]


def pick(group: list[dict], results: dict, cfg) -> list[dict]:
    """The prompt's samples to revise: none when a sample passed and only unsolved prompts are revised; else the
    best-ranked failing ones."""
    if cfg.only_unsolved and any(results[s["sample_index"]][0] for s in group):
        return []
    failing, seen = [], set()
    for s in sorted(group, key=lambda s: (-results[s["sample_index"]][1], s["sample_index"])):
        if not results[s["sample_index"]][0] and s["response"] not in seen:  # a repeated answer: one revision
            seen.add(s["response"])
            failing.append(s)
    return failing[:cfg.samples_per_prompt]


def context_check(config: StageConfig, teacher: str):
    """A test of whether a conversation (a revision or a later dialog turn), with the answer's max_new_tokens, fits
    the teacher's context (its max_position_embeddings, and the engine's max_model_len where this stage starts the
    engine): a dialog grows every turn, and a request over the context would fail the stage. Behind existing
    endpoints serving a model that is not a local folder, the server alone knows its context: every conversation
    is sent."""
    local = Path(teacher, "config.json").is_file()
    if config.teacher.endpoints and not local:
        return lambda conversation: True
    from transformers import AutoConfig

    from alignment.chat import token_ids
    from alignment.template import load_tokenizer

    tokenizer = load_tokenizer(teacher)
    engine_limit = None if config.teacher.endpoints else config.teacher.engine.max_model_len  # theirs, not ours
    context = min(n for n in (getattr(AutoConfig.from_pretrained(teacher), "max_position_embeddings", None),
                              engine_limit, 1 << 40) if n)
    budget = context - config.sampling.max_new_tokens
    return lambda conversation: len(token_ids(tokenizer, conversation, add_generation_prompt=True)) <= budget


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    cfg, verifiers = config.revise, config.reward.verifiers
    samples = read_jsonl(inputs["samples"])
    prompts = read_prompts(inputs["prompts"]).by_id(r["prompt_id"] for r in samples)
    outcomes = Outcomes(out_dir / "outcomes.jsonl")
    first = outcomes.decide(verifiers, [(prompts[s["prompt_id"]], s, s["response"]) for s in samples],
                            cfg.feedback_chars)
    groups: dict[str, list[dict]] = defaultdict(list)
    results: dict[str, dict[int, tuple]] = defaultdict(dict)
    for s, res in zip(samples, first):
        groups[s["prompt_id"]].append(s)
        results[s["prompt_id"]][s["sample_index"]] = res
    tested = [pid for pid in groups if any(v.kind == "code" and applies(v, prompts[pid]) for v in verifiers)]

    # A chain: one failing sample and its revisions so far. `dialog` holds what follows the prompt: the attempts
    # and the feedback on each, so turn t's conversation is the prompt, then the dialog.
    chains = []
    for pid in sorted(groups):
        base = max(s["sample_index"] for s in groups[pid]) + 1
        for c, s in enumerate(pick(groups[pid], results[pid], cfg)):
            error = results[pid][s["sample_index"]][2]
            chains.append({"prompt_id": pid, "of": s["sample_index"], "system": s.get("system_prompt"),
                           "first_index": base + c * cfg.max_turns,
                           "dialog": [{"role": "assistant", "content": s["response"]},
                                      {"role": "user", "content": cfg.feedback_template.format(error=error)}]})

    teacher, teacher_id = str(inputs["teacher"]), model_identity(str(inputs["teacher"]))
    fits = context_check(config, teacher)
    settings = {**config.sampling.model_dump(), "num_samples": 1}
    base_seed = request_seed({"recipe_seed": config.seed, "round": round_n, "stage": "revise"})
    done = load_shards(out_dir / "shards")
    rows, passed_after, sent, resumed, generate_s, start_s = [], defaultdict(int), 0, 0, 0.0, 0.0
    too_long = 0
    with ExitStack() as stack:
        backend = None
        active = chains
        for turn in range(1, cfg.max_turns + 1):
            if not active:
                break
            conversations = [([{"role": "system", "content": c["system"]}] if c["system"] else [])
                             + prompts[c["prompt_id"]]["messages"] + c["dialog"] for c in active]
            room = [fits(conv) for conv in conversations]  # a dialog that outgrew the context ends here, counted
            too_long += sum(not r for r in room)
            active = [c for c, r in zip(active, room) if r]
            conversations = [conv for conv, r in zip(conversations, room) if r]
            if not active:
                break
            ids, requests = make_requests(conversations, teacher_id, settings,
                                          request_seed({"base_seed": base_seed, "turn": turn}))
            todo = [rid for rid in requests if rid not in done]
            resumed += len(requests) - len(todo)
            if todo:
                if backend is None:  # started only when a turn has something to send: a finished stage needs none
                    t0 = time.time()
                    backend = stack.enter_context(open_backend(config.teacher, teacher, out_dir))
                    start_s = time.time() - t0
                print(f"revise: turn {turn}: {len(todo)} revisions to ask for ({len(requests) - len(todo)} "
                      f"already saved)", flush=True)
                t1 = time.time()
                send(backend, requests, done, out_dir / "shards")
                generate_s += time.time() - t1
                sent += len(todo)
            answers = [done[rid]["completions"][0] for rid in ids]
            verdicts = outcomes.decide(verifiers, [(prompts[c["prompt_id"]], {"prompt_id": c["prompt_id"],
                                                   "sample_index": c["first_index"] + turn - 1}, a[0])
                                                   for c, a in zip(active, answers)], cfg.feedback_chars)
            still = []
            for c, rid, (text, num_tokens, finish, *_), (passed, share, error) in zip(active, ids, answers, verdicts):
                rows.append({"prompt_id": c["prompt_id"], "sample_index": c["first_index"] + turn - 1,
                             "response": text, "num_tokens": num_tokens, "prompt_tokens": done[rid]["prompt_tokens"],
                             "finish_reason": finish, "teacher": teacher_id, "backend": config.teacher.backend.value,
                             "sampling": settings, "seed": requests[rid].seed, "system_prompt": c["system"],
                             "request_id": rid, "revision": {"of": c["of"], "turn": turn, "dialog": list(c["dialog"]),
                                                             "passed_tests": passed, "tests_share": share}})
                c["dialog"].append({"role": "assistant", "content": text})
                if passed:
                    passed_after[str(turn)] += 1
                else:
                    c["dialog"].append({"role": "user", "content": cfg.feedback_template.format(error=error)})
                    still.append(c)
            active = still

    write_jsonl(out_dir / "samples.jsonl", samples + rows)
    first_pass = [pid for pid in tested if any(results[pid][s["sample_index"]][0] for s in groups[pid])]
    return StageResult(
        outputs={"samples": "samples.jsonl"},
        rows={"samples": len(samples), "revisions": len(rows), "revised_samples": len(chains)},
        stats={
            "prompts_with_code_tests": len(tested),
            "first_try": {"prompts_passed": len(first_pass),
                          "samples_passed": sum(r[0] for pid in tested for r in results[pid].values()),
                          "samples": sum(len(groups[pid]) for pid in tested)},
            "revised_samples": len(chains),
            "passed_after_turn": {str(t): passed_after[str(t)] for t in range(1, cfg.max_turns + 1)},
            "failed_after_all_turns": len(chains) - sum(passed_after.values()) - too_long,
            "ended_at_context_limit": too_long,
            "requests_sent": sent, "requests_resumed_from_shards": resumed,
            "backend_start_seconds": round(start_s, 2), "generate_seconds": round(generate_s, 2),
            "feedback_chars": distribution([len(c["dialog"][1]["content"]) for c in chains]),
        },
    )
