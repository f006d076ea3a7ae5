"""The stage table: every stage of a round, declared once.

An entry names the recipe sections the stage reads (all that its `run` receives, and what its fingerprint
hashes), how its inputs are found (outputs named in upstream manifests, files and models the recipe names), the
outputs it writes, and the section whose trainer settings it uses (for `accelerate launch` and the machine
checks). The orchestrator, the runner, the CLI, `status` and `stats` all read this table: a new stage is one
entry here and one module in `alignment/stages/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import TypeAdapter

from alignment.config import ModelSource, Recipe, RewardModelSource


@dataclass(frozen=True)
class Upstream:
    """An output of a completed stage; its path comes from that stage's manifest."""

    stage: str
    output: str
    round: int  # 0 for the once-per-recipe bootstrap
    why: str  # who needs it, for the error when that stage has not completed


@dataclass(frozen=True)
class File:
    path: Path
    key: str  # the recipe key that names it


@dataclass(frozen=True)
class Model:
    name: str  # a save_pretrained folder or a hub id
    key: str


Input = Upstream | File | Model


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # top-level recipe keys the stage reads
    inputs: Callable[[Recipe, int], dict[str, Input | list[Input]]]
    outputs: tuple[str, ...]
    trains: str | None = None  # the recipe section holding its TrainerConfig
    when: Callable[[Recipe, int], bool] = lambda recipe, round_n: True  # does round n of this recipe have it?


# --- how inputs are found ---------------------------------------------------------------------------------------


def student(recipe: Recipe, round_n: int) -> Input:
    """Round 1 starts from the recipe's student; round n from the model round n-1 promoted."""
    if round_n > 1:
        return Upstream("promote", "model", round_n - 1, f"round {round_n} starts from the model round {round_n - 1} "
                        f"promoted, but round {round_n - 1} is not complete; run `make round N={round_n - 1}` first")
    if recipe.student.source == ModelSource.bootstrap:
        return Upstream("bootstrap", "student", 0, "the bootstrapped student")
    return Model(recipe.student.model_name_or_path, "student.model_name_or_path")


def teacher(recipe: Recipe, round_n: int) -> Input:
    if recipe.teacher.source == ModelSource.bootstrap:
        return Upstream("bootstrap", "teacher", 0, "the bootstrapped teacher")
    if recipe.teacher.source == ModelSource.previous:
        return student(recipe, round_n)
    return Model(recipe.teacher.model_name_or_path, "teacher.model_name_or_path")


def reward_model(recipe: Recipe, trained_in: int) -> dict[str, Input]:
    """The recipe's reward model: a fixed checkpoint, or the one round `trained_in` trained; none in round 0."""
    rm = recipe.reward.reward_model
    if rm is None or (rm.source == RewardModelSource.trained and trained_in < 1):
        return {}
    if rm.source == RewardModelSource.path:
        return {"reward_model": Model(rm.model_name_or_path, "reward.reward_model.model_name_or_path")}
    return {"reward_model": Upstream("reward_model", "model", trained_in, f"the reward model round {trained_in} trained")}


def train_prompts(recipe: Recipe) -> File:
    return File(recipe.prompts.train_path, "prompts.train_path")


def eval_prompts(recipe: Recipe) -> File:
    return File(recipe.prompts.eval_path, "prompts.eval_path")


def needs_bootstrap(recipe: Recipe, round_n: int) -> bool:
    return (recipe.teacher.source == ModelSource.bootstrap
            or (round_n == 1 and recipe.student.source == ModelSource.bootstrap))


def generate_inputs(r: Recipe, n: int) -> dict:
    inputs = {"teacher": teacher(r, n), "prompts": train_prompts(r)}
    if r.prompts.retry_failed and n > 1:
        inputs["failed_prompts"] = Upstream("select", "failed_prompts", n - 1, "prompts.retry_failed")
    return inputs


def score_inputs(r: Recipe, n: int) -> dict:
    inputs = {"samples": Upstream("generate", "samples", n, "score"), "prompts": train_prompts(r),
              **reward_model(r, n - 1)}
    if r.reward.judge:  # the judge is the teacher
        inputs["teacher"] = teacher(r, n)
    return inputs


def sft_models(r: Recipe, n: int, why: str) -> dict:
    return {"sft": Upstream("sft", "model", n, why), "dpo": Upstream("dpo", "model", n, why)}


# --- the table ---------------------------------------------------------------------------------------------------

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("bootstrap", ("bootstrap", "seed"), lambda r, n: {"eval_prompts": eval_prompts(r)},
          ("student", "teacher"), when=needs_bootstrap),
    Stage("generate", ("teacher", "sampling", "prompts", "seed"), generate_inputs, ("samples",)),
    Stage("score", ("reward", "teacher"), score_inputs, ("scores",)),
    Stage("select", ("select", "seed"), lambda r, n: {
        "samples": Upstream("generate", "samples", n, "select"), "scores": Upstream("score", "scores", n, "select"),
        "prompts": train_prompts(r)}, ("sft", "pairs", "failed_prompts", "plots")),
    # every pair selected so far, this round's included
    Stage("reward_model", ("reward_training", "seed"), lambda r, n: {
        "model": student(r, n),
        "pairs": [Upstream("select", "pairs", k, f"reward_model (round {k})") for k in range(1, n + 1)]},
        ("model", "log_history", "logs"), trains="reward_training",
        when=lambda r, n: r.reward_training is not None),
    Stage("sft", ("sft", "seed"), lambda r, n: {"model": student(r, n), "sft": Upstream("select", "sft", n, "sft")},
          ("model", "log_history", "logs"), trains="sft"),
    Stage("dpo", ("dpo", "seed"), lambda r, n: {
        "model": Upstream("sft", "model", n, "dpo"), "pairs": Upstream("select", "pairs", n, "dpo"),
        **({"ref_model": Model(r.dpo.ref_model_name_or_path, "dpo.ref_model_name_or_path")}
           if r.dpo.ref_model_name_or_path else {})}, ("model", "log_history", "logs"), trains="dpo"),
    Stage("eval", ("eval", "reward", "seed"), lambda r, n: {
        "input": student(r, n), **sft_models(r, n, "eval"), "eval_prompts": eval_prompts(r), **reward_model(r, n)},
        ("metrics", "answers")),
    Stage("promote", ("gate",), lambda r, n: {
        "metrics": Upstream("eval", "metrics", n, "promote"), "answers": Upstream("eval", "answers", n, "promote"),
        "input": student(r, n), **sft_models(r, n, "promote")},
        ("decision", "model")),
)}
EVAL_STAGES = ("eval", "promote")  # what `align eval` runs


def round_stages(recipe: Recipe, round_n: int, names=tuple(STAGES)) -> list[Stage]:
    """The stages of `names` that round n of this recipe has, in order."""
    return [STAGES[s] for s in names if STAGES[s].when(recipe, round_n)]


def upstreams(inputs: dict) -> list[Upstream]:
    return [x for v in inputs.values() for x in (v if isinstance(v, list) else [v]) if isinstance(x, Upstream)]


# --- what a stage reads of the recipe ------------------------------------------------------------------------------

# Teacher fields that change how requests reach the model but not the samples: the stage reads them, but editing
# them (a new port after a server died, more concurrency) resumes the stage instead of starting it again.
TEACHER_TRANSPORT = {"serve", "server_port", "server_startup_timeout_s", "endpoints",
                     "api_key_env", "max_concurrency", "request_timeout_s", "max_retries", "retry_backoff_s"}


def stage_config(recipe: Recipe, stage: str) -> dict:
    """The recipe sections the stage declares, as JSON: what its `run` receives."""
    data = recipe.model_dump(mode="json")
    return {k: data[k] for k in STAGES[stage].sections}


def hashed_config(config: dict) -> dict:
    """The part of a stage's config that decides its outputs."""
    if "teacher" not in config:
        return config
    return {**config, "teacher": {k: v for k, v in config["teacher"].items() if k not in TEACHER_TRANSPORT}}


class StageConfig:
    """The recipe sections one stage declared, as attributes (`cfg.sft`, `cfg.seed`). Reading any other is an
    error, so a stage cannot depend on a setting that its fingerprint does not hash."""

    def __init__(self, stage: str, config: dict):
        self._stage = stage
        for key, value in config.items():  # typed again: sections are pydantic models, as in the Recipe
            setattr(self, key, TypeAdapter(Recipe.model_fields[key].annotation).validate_python(value))

    def __getattr__(self, name: str):  # called only for attributes that were not set
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"stage {self._stage!r} read the recipe key {name!r}, which its entry in "
                             "alignment/stage_table.py does not declare")
