"""The orchestrator: decides which stages of a round are due, in what order, and runs each in its own process.

A stage is due when its folder has no manifest, or the manifest's fingerprint differs from the one computed now
from the stage's recipe section and its inputs' identities. Inputs are exactly the paths named in upstream
manifests (or in the recipe), never "the latest folder".

    align round 1 --recipe recipes/tiny.yaml [key.path=value ...]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from alignment.config import InputError, ModelSource, Recipe, stage_config
from alignment.consistency import check_chat_templates
from alignment.manifest import hash_file, hash_json, hash_model_dir, read_manifest, write_json_atomic

ROUND_STAGES = ("generate", "score", "select", "reward_model", "sft", "dpo", "eval", "promote")
EVAL_STAGES = ("eval", "promote")


class StageFailed(Exception):
    pass


def round_dir(recipe: Recipe, round_n: int) -> Path:
    return recipe.runs_dir / recipe.name / f"round-{round_n}"


def stage_dir(recipe: Recipe, round_n: int, stage: str) -> Path:
    if stage == "bootstrap":  # built once per recipe, shared by every round
        return recipe.runs_dir / recipe.name / "bootstrap"
    return round_dir(recipe, round_n) / stage


# --- input identities: {"path": ..., "hash": ...} ------------------------------------------------------------


def upstream(folder: Path, output: str, why: str) -> dict:
    """An output named in a completed stage's manifest; its identity is that stage's fingerprint."""
    m = read_manifest(folder)
    if m is None:
        raise InputError(f"{why}: {folder} has no manifest.json (that stage has not completed)")
    return {"path": os.path.normpath(folder / m["outputs"][output]), "hash": f"{m['fingerprint']}:{output}"}


def data_file(path: Path, key: str) -> dict:
    if not path.is_file():
        raise InputError(f"{key}: {path} does not exist")
    return {"path": str(path), "hash": hash_file(path)}


def model_path(name: str) -> dict:
    p = Path(name)
    return {"path": name, "hash": hash_model_dir(p) if p.is_dir() else hash_json(name)}


def student_input(recipe: Recipe, round_n: int) -> dict:
    """Round 1 starts from the recipe's student; round n from the model round n-1 promoted."""
    if round_n > 1:
        prev = stage_dir(recipe, round_n - 1, "promote")
        return upstream(prev, "model", f"round {round_n} starts from the model round {round_n - 1} promoted, but "
                        f"round {round_n - 1} is not complete; run `make round N={round_n - 1}` first")
    if recipe.student.source == ModelSource.bootstrap:
        return upstream(stage_dir(recipe, 0, "bootstrap"), "student", "the bootstrapped student")
    return model_path(recipe.student.model_name_or_path)


def teacher_input(recipe: Recipe, round_n: int) -> dict:
    if recipe.teacher.source == ModelSource.bootstrap:
        return upstream(stage_dir(recipe, 0, "bootstrap"), "teacher", "the bootstrapped teacher")
    if recipe.teacher.source == ModelSource.previous:
        return student_input(recipe, round_n)
    return model_path(recipe.teacher.model_name_or_path)


def stage_inputs(recipe: Recipe, round_n: int, stage: str) -> dict[str, dict]:
    d = lambda s: stage_dir(recipe, round_n, s)  # noqa: E731
    train = lambda: data_file(recipe.prompts.train_path, "prompts.train_path")  # noqa: E731
    if stage == "bootstrap":
        return {"eval_prompts": data_file(recipe.prompts.eval_path, "prompts.eval_path")}
    if stage == "generate":
        inputs = {"teacher": teacher_input(recipe, round_n), "prompts": train()}
        if recipe.prompts.retry_failed and round_n > 1:
            inputs["failed_prompts"] = upstream(stage_dir(recipe, round_n - 1, "select"), "failed_prompts",
                                                "prompts.retry_failed")
        return inputs
    if stage == "score":
        inputs = {"samples": upstream(d("generate"), "samples", "score"), "prompts": train(),
                  **reward_model_input(recipe, round_n - 1)}
        if recipe.reward.judge:
            inputs["teacher"] = teacher_input(recipe, round_n)
        return inputs
    if stage == "select":
        return {"samples": upstream(d("generate"), "samples", "select"),
                "scores": upstream(d("score"), "scores", "select"), "prompts": train()}
    if stage == "reward_model":  # every pair selected so far, this round's included
        return {"model": student_input(recipe, round_n), **{
            f"pairs_round_{k}": upstream(stage_dir(recipe, k, "select"), "pairs", f"reward_model (round {k})")
            for k in range(1, round_n + 1)}}
    if stage == "sft":
        return {"model": student_input(recipe, round_n), "sft": upstream(d("select"), "sft", "sft")}
    if stage == "dpo":
        inputs = {"model": upstream(d("sft"), "model", "dpo"), "pairs": upstream(d("select"), "pairs", "dpo")}
        if recipe.dpo.ref_model_name_or_path:
            inputs["ref_model"] = model_path(recipe.dpo.ref_model_name_or_path)
        return inputs
    if stage == "eval":
        return {"input": student_input(recipe, round_n), "sft": upstream(d("sft"), "model", "eval"),
                "dpo": upstream(d("dpo"), "model", "eval"),
                "eval_prompts": data_file(recipe.prompts.eval_path, "prompts.eval_path"),
                **reward_model_input(recipe, round_n)}
    if stage == "promote":
        return {"metrics": upstream(d("eval"), "metrics", "promote"), "input": student_input(recipe, round_n),
                "sft": upstream(d("sft"), "model", "promote"), "dpo": upstream(d("dpo"), "model", "promote")}
    raise InputError(f"unknown stage {stage!r}")


def reward_model_input(recipe: Recipe, trained_in: int) -> dict[str, dict]:
    """{"reward_model": identity} for the recipe's reward model: a fixed checkpoint, or the one the reward_model
    stage of round `trained_in` trained; {} when there is none (no reward model, or round 0 for `trained`)."""
    rm = recipe.reward.reward_model
    if rm is None:
        return {}
    if rm.model_name_or_path != "trained":
        return {"reward_model": model_path(rm.model_name_or_path)}
    if trained_in < 1:
        return {}
    return {"reward_model": upstream(stage_dir(recipe, trained_in, "reward_model"), "model",
                                     f"the reward model round {trained_in} trained")}


def recipe_stages(recipe: Recipe, stages: tuple[str, ...]) -> tuple[str, ...]:
    """The stages this recipe has: reward_model only when it trains one."""
    return tuple(s for s in stages if s != "reward_model" or recipe.reward_training is not None)


# --- running -------------------------------------------------------------------------------------------------


def fingerprint(stage: str, config: dict, inputs: dict[str, dict]) -> str:
    return hash_json({"stage": stage, "config": config, "inputs": {k: v["hash"] for k, v in inputs.items()}})


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def stage_command(recipe: Recipe, stage: str, job: Path) -> list[str]:
    """`python -m alignment.runner job.json`, or the same under `accelerate launch` for a distributed trainer."""
    cfg = trainer_config(recipe, stage)
    if cfg is None or cfg.distributed is None:
        return [sys.executable, "-m", "alignment.runner", str(job)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ACCELERATE_CONFIGS / f"{cfg.distributed}.yaml"), "--num_processes", str(cfg.num_processes),
            "-m", "alignment.runner", str(job)]


def trainer_config(recipe: Recipe, stage: str):
    """The TrainerConfig of a training stage, None for the others."""
    return {"sft": recipe.sft, "dpo": recipe.dpo, "reward_model": recipe.reward_training}.get(stage)


def stage_env(recipe: Recipe, stage: str) -> dict:
    env = dict(os.environ)
    cfg = trainer_config(recipe, stage)
    if cfg is not None and cfg.distributed and not torch_cuda_available():
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo: accelerate's config alone would run one process
    return env


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def partial_fingerprint(folder: Path) -> str | None:
    """The fingerprint of the run that left `job.json` in the folder, if any."""
    try:
        return json.loads((folder / "job.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def run_stage(recipe: Recipe, round_n: int, stage: str, *, recipe_file: str, overrides: list[str],
              force: bool = False) -> bool:
    """Run the stage in a fresh process unless its manifest is current; True when it ran."""
    folder = stage_dir(recipe, round_n, stage)
    config = stage_config(recipe, stage)
    inputs = stage_inputs(recipe, round_n, stage)
    fp = fingerprint(stage, config, inputs)
    old = read_manifest(folder)
    if old is not None and old["fingerprint"] == fp and not force:
        print(f"[round {round_n}] {stage}: up to date ({old['wall_time_s']:.0f}s when it ran), skipped", flush=True)
        return False
    # A run that died with this very fingerprint left work that is still valid (generation shards, trainer
    # checkpoints): keep its folder and resume. Anything else starts from an empty folder, so stale outputs of an
    # earlier run never mix with this one's.
    resume = old is None and partial_fingerprint(folder) == fp
    why = ("forced" if force and old else "recipe or inputs changed" if old
           else "resuming an interrupted run" if resume else "not done yet")
    print(f"[round {round_n}] {stage}: running ({why})", flush=True)
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    job = {"stage": stage, "round": round_n, "recipe": recipe.model_dump(mode="json"), "recipe_file": recipe_file,
           "overrides": overrides, "config": config, "inputs": inputs, "fingerprint": fp}
    write_json_atomic(folder / "job.json", job)
    start = time.time()
    proc = subprocess.run(stage_command(recipe, stage, folder / "job.json"), env=stage_env(recipe, stage))
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} of round {round_n} failed (exit code {proc.returncode}); {folder} has "
                          "no manifest, so the next run of this round starts that stage again")
    print(f"[round {round_n}] {stage}: done in {time.time() - start:.0f}s", flush=True)
    return True


def round_models(recipe: Recipe, round_n: int) -> dict[str, str]:
    """Every model of the round that renders conversations, the student first."""
    models = {"student": student_input(recipe, round_n)["path"]}
    if not recipe.teacher.endpoints:  # a remote teacher applies its server's template; we cannot load it here
        models["teacher"] = teacher_input(recipe, round_n)["path"]
    rm = reward_model_input(recipe, round_n - 1).get("reward_model")
    if rm:  # a trained one was made from the student: its template is the student's by construction
        models["reward model"] = rm["path"]
    return models


def needs_bootstrap(recipe: Recipe, round_n: int) -> bool:
    return (recipe.teacher.source == ModelSource.bootstrap
            or (round_n == 1 and recipe.student.source == ModelSource.bootstrap))


def run_round(recipe: Recipe, round_n: int, *, recipe_file: str, overrides: list[str],
              stages: tuple[str, ...] = ROUND_STAGES) -> dict:
    """Run whichever of `stages` are due for round n, then print its evaluation and promotion."""
    if round_n < 1:
        raise InputError(f"round must be 1 or more, got {round_n}")
    if recipe.rounds is not None and round_n > recipe.rounds:
        raise InputError(f"round {round_n}: the recipe plans {recipe.rounds} rounds (key `rounds`); raise it to go on")
    if stages == EVAL_STAGES and not round_dir(recipe, round_n).exists():
        raise InputError(f"round {round_n} does not exist: no folder {round_dir(recipe, round_n)}; "
                         f"run `make round N={round_n}` first")
    if round_n > 1:
        student_input(recipe, round_n)  # fail now, before any work, if round n-1 is missing
    if stages == ROUND_STAGES and needs_bootstrap(recipe, round_n):
        stages = ("bootstrap",) + stages
    stages = recipe_stages(recipe, stages)
    for stage in stages:
        if stage == "generate":  # models exist now (bootstrap ran); check them before any spends time
            check_chat_templates(round_models(recipe, round_n))
        run_stage(recipe, round_n, stage, recipe_file=recipe_file, overrides=overrides)
    metrics = json.loads((stage_dir(recipe, round_n, "eval") / "metrics.json").read_text())
    decision = json.loads((stage_dir(recipe, round_n, "promote") / "decision.json").read_text())
    print(format_metrics(round_n, metrics))
    print(f"promoted: {decision['promoted']}{' (forced)' if decision['forced'] else ''}")
    for reason in decision["reasons"]:
        print(f"  {reason}")
    return metrics


def status(recipe: Recipe, round_n: int, stage: str) -> str:
    """'done' (manifest matches the recipe and inputs now), 'stale' (it does not), or 'missing'."""
    m = read_manifest(stage_dir(recipe, round_n, stage))
    if m is None:
        return "missing"
    try:
        fp = fingerprint(stage, stage_config(recipe, stage), stage_inputs(recipe, round_n, stage))
    except InputError:
        return "stale"  # an input it was built from is gone
    return "done" if m["fingerprint"] == fp else "stale"


def status_table(recipe: Recipe) -> str:
    rounds = sorted(int(p.name.split("-")[1]) for p in (recipe.runs_dir / recipe.name).glob("round-*")
                    if p.name.split("-")[1].isdigit())
    stages = recipe_stages(recipe, ("bootstrap",) + ROUND_STAGES if recipe.bootstrap else ROUND_STAGES)
    lines = [f"{recipe.runs_dir / recipe.name}", "round  " + "".join(f"{s:>10}" for s in stages)]
    for n in rounds or [1]:
        cells, behind = [], False
        for s in stages:
            if s == "bootstrap" and not needs_bootstrap(recipe, n):
                cells.append("-")
                continue
            c = status(recipe, n, s)
            if c == "done" and behind:
                c = "stale"  # each stage builds on the ones before it: an unfinished one invalidates the rest
            behind |= c != "done"
            cells.append(c)
        lines.append(f"{n:<7}" + "".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def format_metrics(round_n: int, metrics: dict) -> str:
    cols = ["accuracy", "mean_reward"] + sorted(k for k in metrics["input"] if k.startswith("pass@")) + [
        "win_rate_vs_input", "mean_response_tokens", "length_drift_vs_input", "hit_token_limit_share"] + sorted(
        k for k in metrics["input"] if k.startswith("lm_eval/"))
    short = {"mean_response_tokens": "tokens", "length_drift_vs_input": "len_drift", "win_rate_vs_input": "win_rate",
             "hit_token_limit_share": "at_limit"}
    head = [short.get(c, c.split("/")[1] if c.startswith("lm_eval/") else c) for c in cols]
    width = [max(12, len(h) + 2) for h in head]
    lines = [f"round {round_n} held-out evaluation", f"{'model':<8}" + "".join(f"{h:>{w}}" for h, w in zip(head, width))]
    for name in ("input", "sft", "dpo"):
        vals = [metrics[name].get(c) for c in cols]
        lines.append(f"{name:<8}" + "".join(f"{'-' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(vals, width)))
    return "\n".join(lines)
