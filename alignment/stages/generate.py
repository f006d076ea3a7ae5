"""Generate: the teacher writes K candidate responses for each of the round's prompts.

The round's prompts are a seeded draw (seed and round number) from the recipe's training prompt file, so every
round sees fresh prompts where the file allows. The recipe's `teacher.backend` picks the engine: transformers,
an in-process vLLM engine, or OpenAI-compatible endpoints (existing ones, or a vLLM server this stage starts and
stops). A system prompt per capability steers the teacher's tone and format.

Identical requests (same conversation, teacher and settings) are sent once. Results are saved as they finish
(see `alignment.shards`), so re-running a stage that died resumes where it stopped. Each row carries its key
(prompt_id, sample_index) and how it was made (teacher, backend, sampling settings, seed, system prompt), so later
stages join by key, never by position.

    align stage generate --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from alignment.backends import make_requests, open_backend, send
from alignment.prompts import (PromptMix, Prompts, draw_mixture, read_jsonl, read_prompts, system_prompt_for,
                               write_jsonl)
from alignment.seeding import model_identity, request_seed
from alignment.shards import load_shards
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.distribution import distribution


def draw_round_prompts(prompts: Prompts, num_prompts: int, seed: int, round_n: int) -> list[dict]:
    """A seeded draw without replacement, of indices: only the drawn rows are read (they are the rows that
    `random.sample` of a list of all rows would pick). All rows when the source has no more than asked for."""
    if num_prompts >= len(prompts):
        return list(prompts)
    return prompts.take(random.Random(f"{seed}-round-{round_n}").sample(range(len(prompts)), num_prompts))


def round_seed(seed: int, round_n: int) -> int:
    """The base seed of a round's requests: a hash of both, so no two (seed, round) pairs share one (with
    `seed + 1000 * round`, seed 0's round 2 resent seed 1000's round 1)."""
    return request_seed({"recipe_seed": seed, "round": round_n})


def build_requests(prompts: list[dict], config: StageConfig, teacher_id: str, base_seed: int):
    """One request per distinct conversation (alignment.backends.make_requests), the recipe's system prompt
    first: (request_id per prompt, {request_id: Request}, system prompt per prompt_id)."""
    systems = {p["prompt_id"]: system_prompt_for(p, config.teacher.system_prompts) for p in prompts}
    conversations = [([{"role": "system", "content": systems[p["prompt_id"]]}] if systems[p["prompt_id"]] else [])
                     + p["messages"] for p in prompts]
    return *make_requests(conversations, teacher_id, config.sampling.model_dump(), base_seed), systems


def stop_reason(record: list) -> dict:
    """A sample's `stop_reason` key, present only for a tool-call step (alignment.backends.completion_record)."""
    return {"stop_reason": record[3]} if len(record) > 3 else {}


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    t, s = config.teacher, config.sampling
    source = read_prompts(inputs["prompts"])
    if isinstance(source, PromptMix):  # prompts.sources: each source's quota exactly
        prompts = draw_mixture(source, config.prompts.quotas(round_n), config.seed, round_n)
        by_source = dict(zip(map(str, config.prompts.train_sources), config.prompts.quotas(round_n)))
    else:
        prompts = draw_round_prompts(source, config.prompts.num_prompts, config.seed, round_n)
        by_source = {str(config.prompts.train_path): len(prompts)}
    retried = 0
    if "failed_prompts" in inputs:  # last round's prompts where every sample failed: another chance
        drawn = {p["prompt_id"] for p in prompts}
        again = [{k: v for k, v in p.items() if k != "failed_round"} for p in read_jsonl(inputs["failed_prompts"])
                 if p["prompt_id"] not in drawn]
        prompts, retried = prompts + again, len(again)
    teacher, teacher_id = str(inputs["teacher"]), model_identity(str(inputs["teacher"]))
    ids, requests, systems = build_requests(prompts, config, teacher_id, round_seed(config.seed, round_n))

    done = load_shards(out_dir / "shards")
    resumed = sum(rid in done for rid in requests)
    todo = [rid for rid in requests if rid not in done]
    start_s = generate_s = stop_s = 0.0
    retries = 0
    if todo:
        print(f"generate: {len(todo)} requests to send ({resumed} already saved) with backend "
              f"{t.backend.value}, K={s.num_samples}", flush=True)
        t0 = time.time()
        with open_backend(t, teacher, out_dir) as backend:
            t1 = time.time()
            start_s = t1 - t0  # loading the model or starting the server: not generation
            send(backend, requests, done, out_dir / "shards")
            retries = backend.retries
            generate_s = time.time() - t1
        stop_s = time.time() - t1 - generate_s  # stopping the engine or server frees its memory: not generation

    settings = s.model_dump()
    rows = [{"prompt_id": p["prompt_id"], "sample_index": k, "response": c[0], "num_tokens": c[1],
             "prompt_tokens": done[rid]["prompt_tokens"], "finish_reason": c[2], **stop_reason(c),
             "teacher": teacher_id, "backend": t.backend.value, "sampling": settings, "seed": requests[rid].seed,
             "system_prompt": systems[p["prompt_id"]], "request_id": rid}
            for p, rid in zip(prompts, ids) for k, c in enumerate(done[rid]["completions"])]
    write_jsonl(out_dir / "samples.jsonl", rows)

    new_tokens = sum(c[1] or 0 for rid in todo for c in done[rid]["completions"])
    hit_limit = sum(r["finish_reason"] == "length" for r in rows)
    return StageResult(
        outputs={"samples": "samples.jsonl"},
        rows={"prompts": len(prompts), "requests": len(requests), "samples": len(rows)},
        stats={
            "duplicate_prompts_not_sent": len(prompts) - len(requests),
            "failed_prompts_retried": retried,
            "requests_resumed_from_shards": resumed, "requests_sent": len(todo), "retries": retries,
            "backend_start_seconds": round(start_s, 2), "generate_seconds": round(generate_s, 2),
            "backend_stop_seconds": round(stop_s, 2),
            "output_tokens_per_second": round(new_tokens / generate_s, 1) if generate_s > 0 else None,
            "response_tokens": distribution([r["num_tokens"] for r in rows if r["num_tokens"] is not None]),
            "prompt_tokens": distribution([done[rid]["prompt_tokens"] for rid in requests
                                       if done[rid]["prompt_tokens"] is not None]),
            "hit_token_limit": hit_limit, "hit_token_limit_share": hit_limit / max(1, len(rows)),
            "tool_call_steps": sum("stop_reason" in r for r in rows),  # ended with <|eom_id|>, kept as such
            "prompts_by_capability": dict(Counter(p.get("capability") or "default" for p in prompts)),
            "prompts_by_source": by_source,  # drawn this round, before retried ones
            "prompts_with_system_prompt": sum(v is not None for v in systems.values()),
            "distinct_responses_per_prompt": distribution([len({c[0] for c in done[rid]["completions"]}) for rid in ids]),
        },
    )
