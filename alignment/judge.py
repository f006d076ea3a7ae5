"""LLM-as-judge: the teacher grades each sample against the recipe's rubric (score stage), or compares two answers
(eval: a checkpoint's against the input model's), greedily, through the same backend the generate stage uses (so
an endpoint serving the 405B teacher also judges). A reply without a readable verdict is counted and scores None;
it never stops the stage."""

from __future__ import annotations

from pathlib import Path

from alignment.backends import Request, open_backend
from alignment.config import JudgeConfig, PairJudgeConfig, TeacherConfig
from alignment.manifest import hash_json
from alignment.verifiers import final_answer


def render_prompt(messages: list[dict]) -> str:
    """A single user turn as its text; a longer conversation with each turn labelled by role."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def judge_request(cfg: JudgeConfig, messages: list[dict], response: str) -> Request:
    # str.replace, not str.format: rubrics often show JSON with braces of their own.
    text = cfg.template.replace("{prompt}", render_prompt(messages)).replace("{response}", response)
    return Request([{"role": "user", "content": text}], n=1, temperature=0.0, top_p=1.0,
                   max_tokens=cfg.max_new_tokens, seed=int(hash_json(text)[:8], 16))


def parse_verdict(cfg: JudgeConfig, reply: str) -> int | None:
    """The last verdict in the reply, or None when there is none or it is outside 0..max_score."""
    try:
        value = int(final_answer(reply, cfg.verdict_regex))
    except (TypeError, ValueError):  # none (None) or not an integer
        return None
    return value if 0 <= value <= cfg.max_score else None


def judge(cfg: JudgeConfig, teacher: TeacherConfig, model: str, conversations: list[tuple[list[dict], str]],
          log_dir: Path) -> list[int | None]:
    """A verdict per (prompt messages, response), in input order."""
    requests = [judge_request(cfg, m, r) for m, r in conversations]
    verdicts: list[int | None] = [None] * len(requests)
    with open_backend(teacher, model, log_dir) as backend:
        for i, result in backend.generate(requests):
            verdicts[i] = parse_verdict(cfg, result.completions[0].text)
    return verdicts


def pair_requests(cfg: PairJudgeConfig, prompts: list[dict], ours: list[str], theirs: list[str]) -> list[list[dict]]:
    """Per prompt, two judge conversations: our answer as A, then our answer as B."""
    def ask(p, a, b):
        text = (cfg.template.replace("{prompt}", render_prompt(p["messages"])).replace("{response_a}", a)
                .replace("{response_b}", b))
        return [{"role": "user", "content": text}]

    return [c for p, o, t in zip(prompts, ours, theirs) for c in (ask(p, o, t), ask(p, t, o))]


def pair_wins(cfg: PairJudgeConfig, ours_first: str, ours_second: str) -> float | None:
    """Our answer's score on one prompt from the two replies (1 won, 0.5 tie, 0 lost), averaged over the orders
    with a readable verdict (A, B or tie); None when neither has one. A judge that always picks A scores 0.5."""
    points = []
    for reply, ours in ((ours_first, "a"), (ours_second, "b")):
        verdict = (final_answer(reply, cfg.verdict_regex) or "").lower()
        if verdict in ("a", "b", "tie"):
            points.append(0.5 if verdict == "tie" else float(verdict == ours))
    return sum(points) / len(points) if points else None
