"""Teacher eval: the fixed teacher, evaluated once per recipe on the held-out prompts exactly as each round's
models are. Rounds read against it (a reference row in the round table, a line in the report), and with
`teacher.source: best` it is the bar a promoted student must pass before the rounds sample from the student.

    align stage teacher_eval --recipe recipes/tiny.yaml
"""

from __future__ import annotations

from pathlib import Path

from alignment.manifest import write_json_atomic
from alignment.prompts import read_prompts, write_jsonl
from alignment.stage_table import StageConfig
from alignment.stages.eval import evaluate, serving
from alignment.stages.result import StageResult


def run(config: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    prompts = read_prompts(inputs["eval_prompts"])[:config.eval.num_prompts]  # the rounds' prompts (None: all)
    reward_model = str(inputs["reward_model"]) if "reward_model" in inputs else None
    # served on the teacher's own engine (its tensor parallel split, its FP8), as generate serves it
    metrics, answers = evaluate(config, {"teacher": inputs["teacher"]}, prompts, out_dir, reward_model,
                                serving(config, teacher=True))
    metrics, answers = metrics["teacher"], answers["teacher"]
    write_jsonl(out_dir / "answers.jsonl", answers)
    write_json_atomic(out_dir / "metrics.json", {"teacher": metrics})
    outcomes = {a["prompt_id"]: float(a["verified"]) for a in answers if a["verified"] is not None}
    write_json_atomic(out_dir / "record.json", {"name": "teacher", "accuracy": metrics.get("accuracy"),
                                                "outcomes": outcomes})
    return StageResult(outputs={"metrics": "metrics.json", "answers": "answers.jsonl", "record": "record.json"},
                       rows={"prompts": len(prompts)}, stats=metrics)
