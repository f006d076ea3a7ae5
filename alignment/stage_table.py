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

from alignment.config import (TRANSPORT, InputError, ModelSource, PromptSource, Recipe, RewardModelSource,
                              TeacherConfig)


@dataclass(frozen=True)
class Upstream:
    """An output of a completed stage; its path comes from that stage's manifest."""

    stage: str
    output: str
    round: int  # 0 for the once-per-recipe bootstrap
    why: str  # who needs it, for the error when that stage has not completed


@dataclass(frozen=True)
class File:
    path: Path | PromptSource  # a prompt source may be a folder or a Hub dataset
    key: str  # the recipe key that names it


@dataclass(frozen=True)
class Model:
    name: str  # a save_pretrained folder or a hub id
    key: str
    revision: str | None = None  # a hub id's pinned commit


Input = Upstream | File | Model


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # top-level recipe keys the stage reads
    inputs: Callable[[Recipe, int], dict[str, Input | list[Input]]]
    outputs: tuple[str, ...]
    trains: str | None = None  # the recipe section holding its TrainerConfig
    kind: str | None = None  # the launcher's resources it runs with (train, generate, eval); None: in place
    when: Callable[[Recipe, int], bool] = lambda recipe, round_n: True  # does round n of this recipe have it?
    once: bool = False  # once per recipe (runs/<recipe>/<stage>/, round 0), shared by every round
    models: tuple[str, ...] = ()  # outputs that are model folders it writes: no manifest unless each loads


# --- how inputs are found ---------------------------------------------------------------------------------------


def student(recipe: Recipe, round_n: int) -> Input:
    """Round 1 starts from the recipe's student; round n from the model round n-1 promoted."""
    if round_n > 1:
        return Upstream("promote", "model", round_n - 1, f"round {round_n} starts from the model round {round_n - 1} "
                        f"promoted, but round {round_n - 1} is not complete; run `make round N={round_n - 1}` first")
    if recipe.student.source == ModelSource.bootstrap:
        return Upstream("bootstrap", "student", 0, "the bootstrapped student")
    if recipe.student.source == ModelSource.gguf:
        return Upstream("import_gguf", "model", 0, "the imported student")
    return Model(recipe.student.model_name_or_path, "student.model_name_or_path", recipe.student.revision)


def fixed_teacher(recipe: Recipe) -> Input | None:
    """The teacher that does not change between rounds: a model the recipe names, or the bootstrap's."""
    t = recipe.teacher
    if t.source == ModelSource.path or (t.source == ModelSource.best and t.model_name_or_path):
        # behind endpoints the name is what the servers serve: they pin what they load
        return Model(t.model_name_or_path, "teacher.model_name_or_path", None if t.endpoints else t.revision)
    if t.source == ModelSource.gguf:
        return Upstream("import_gguf", "model", 0, "the imported teacher")
    if t.source in (ModelSource.bootstrap, ModelSource.best):
        return Upstream("bootstrap", "teacher", 0, "the bootstrapped teacher")
    return None


def teacher(recipe: Recipe, round_n: int) -> Input:
    if recipe.teacher.source == ModelSource.previous:
        return student(recipe, round_n)
    if recipe.teacher.source == ModelSource.best and round_n > 1:
        return Upstream("promote", "best", round_n - 1, f"teacher.source best: the best model up to round "
                        f"{round_n - 1}, which is not complete; run `make round N={round_n - 1}` first")
    return fixed_teacher(recipe)


def reward_model(recipe: Recipe, trained_in: int) -> dict[str, Input]:
    """The recipe's reward model: a fixed checkpoint, or the one round `trained_in` trained; none in round 0."""
    rm = recipe.reward.reward_model
    if rm is None or (rm.source == RewardModelSource.trained and trained_in < 1):
        return {}
    if rm.source == RewardModelSource.path:
        return {"reward_model": Model(rm.model_name_or_path, "reward.reward_model.model_name_or_path", rm.revision)}
    return {"reward_model": Upstream("reward_training", "model", trained_in, f"the reward model round {trained_in} trained")}


def gguf_file(recipe: Recipe) -> File:
    """The GGUF file inside its installed package (by content, so a new package version makes the import stale)."""
    from importlib import metadata

    package, name = recipe.gguf.package, recipe.gguf.file
    try:
        files = metadata.distribution(package).files or []
    except metadata.PackageNotFoundError:
        raise InputError(f"gguf.package: {package} is not installed (`make` installs the pinned version; or pip "
                         f"install --no-deps {package})") from None
    found = [f for f in files if f.name == name]
    if not found:
        raise InputError(f"gguf.file: {package} ships no {name}; its GGUF files: "
                         f"{sorted(f.name for f in files if f.name.endswith('.gguf'))}")
    return File(Path(found[0].locate()), "gguf.file")


def prompt_file(recipe: Recipe, key: str) -> File | list[File]:
    """`prompts.eval_path` (one File per source when it lists several), or the training prompts:
    `prompts.train_path`, or one File per `prompts.sources`."""
    if key == "train_path" and recipe.prompts.sources:
        return [File(s.source, f"prompts.sources[{i}]") for i, s in enumerate(recipe.prompts.sources)]
    if isinstance(sources := getattr(recipe.prompts, key), list):  # eval_path: several held-out sets
        return [File(s, f"prompts.{key}[{i}]") for i, s in enumerate(sources)]
    return File(sources, f"prompts.{key}")


def needs(stage: str):
    """Whether round n reads an output of this once-per-recipe stage: as its fixed teacher, or as round 1's student."""
    return lambda r, n: any(isinstance(m, Upstream) and m.stage == stage
                            for m in (fixed_teacher(r), n == 1 and student(r, 1)))


def evaluates_teacher(recipe: Recipe, round_n: int = 0) -> bool:
    """A fixed teacher we can load is evaluated once, as the rounds' reference (remote endpoints cannot be)."""
    return fixed_teacher(recipe) is not None and not recipe.teacher.endpoints


def promote_inputs(r: Recipe, n: int) -> dict:
    """The round's metrics and answers, its three models, and the best model before this round (with its record)
    from which `promote` carries the best model so far forward."""
    inputs = {"metrics": Upstream("eval", "metrics", n, "promote"), "answers": Upstream("eval", "answers", n, "promote"),
              "input": student(r, n), **sft_models(r, n, "promote")}
    if n > 1:
        inputs.update(best_before=Upstream("promote", "best", n - 1, "promote"),
                      best_before_record=Upstream("promote", "best_record", n - 1, "promote"))
    elif evaluates_teacher(r):
        inputs.update(best_before=fixed_teacher(r), best_before_record=Upstream("teacher_eval", "record", 0, "promote"))
    return inputs


def sft_inputs(r: Recipe, n: int) -> dict:
    """The model SFT starts from (`sft.init`), this round's selected rows, the earlier rounds' that
    `sft.accumulate` adds (newest first) and the extra conversation files (keys only when there are some, so a
    recipe without them keeps its fingerprints)."""
    inputs = {"model": student(r, n if r.sft.init == "previous" else 1), "sft": Upstream("select", "sft", n, "sft")}
    first = 1 if r.sft.accumulate == "all" else max(1, n - r.sft.accumulate)
    if earlier := [Upstream("select", "sft", k, f"sft.accumulate (round {k})") for k in range(n - 1, first - 1, -1)]:
        inputs["earlier_sft"] = earlier
    if r.dialogs is not None:  # later dialog turns, of the same rounds
        inputs["dialogs_sft"] = [Upstream("dialogs", "sft", k, f"sft: dialogs (round {k})")
                                 for k in range(n, first - 1, -1)]
    if r.sft.extra_sources:
        inputs["extra_sft"] = [File(s.path, "sft.extra_sources") for s in r.sft.extra_sources]
    return inputs


def round_samples(r: Recipe, n: int, why: str) -> Upstream:
    """The round's samples: generate's, or with execution feedback revise's (generate's with the revisions)."""
    return Upstream("revise" if r.revise is not None else "generate", "samples", n, why)


def pair_stage(r: Recipe) -> str:
    """Where DPO's pairs come from: select (the teacher's samples) or policy_pairs (the SFT model's)."""
    return "policy_pairs" if r.dpo.pairs_from == "policy" else "select"


def sft_models(r: Recipe, n: int, why: str) -> dict:
    return {"sft": Upstream("sft", "model", n, why), "dpo": Upstream("dpo", "model", n, why)}


# --- the table ---------------------------------------------------------------------------------------------------

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("bootstrap", ("bootstrap", "seed"), lambda r, n: {"eval_prompts": prompt_file(r, "eval_path")},
          ("student", "teacher"), kind="train", when=needs("bootstrap"), once=True, models=("student", "teacher")),
    Stage("import_gguf", ("gguf",), lambda r, n: {"gguf": gguf_file(r)} if r.gguf else {}, ("model",),
          kind="train", when=needs("import_gguf"), once=True, models=("model",)),
    Stage("teacher_eval", ("eval", "reward", "seed", "teacher"), lambda r, n: {
        "teacher": fixed_teacher(r), "eval_prompts": prompt_file(r, "eval_path"), **reward_model(r, 0)},
        ("metrics", "answers", "record"), kind="generate", when=evaluates_teacher, once=True),
    Stage("generate", ("teacher", "sampling", "prompts", "seed"), lambda r, n: {
        "teacher": teacher(r, n), "prompts": prompt_file(r, "train_path"),
        **({"failed_prompts": Upstream("select", "failed_prompts", n - 1, "prompts.retry_failed")}
           if r.prompts.retry_failed and n > 1 else {})}, ("samples",), kind="generate"),
    # execution feedback: failing code samples revised by the teacher; its samples (the round's, revisions
    # appended) are what score and select read
    Stage("revise", ("revise", "teacher", "sampling", "reward", "seed"), lambda r, n: {
        "samples": Upstream("generate", "samples", n, "revise"), "prompts": prompt_file(r, "train_path"),
        "teacher": teacher(r, n)}, ("samples",), kind="generate", when=lambda r, n: r.revise is not None),
    Stage("score", ("reward", "teacher"), lambda r, n: {  # `teacher`: the judge, if any, is the teacher
        "samples": round_samples(r, n, "score"), "prompts": prompt_file(r, "train_path"),
        **reward_model(r, n - 1), **({"teacher": teacher(r, n)} if r.reward.judge else {})},
        ("scores",), kind="eval"),  # eval resources: the reward model
    Stage("select", ("select", "seed", "revise"), lambda r, n: {
        "samples": round_samples(r, n, "select"), "scores": Upstream("score", "scores", n, "select"),
        "prompts": prompt_file(r, "train_path")}, ("sft", "pairs", "failed_prompts", "plots")),
    # multi-turn rollouts: later turns of each selected answer's dialog, generated, scored and selected as the
    # first turn was (the judge, if any, is the teacher)
    Stage("dialogs", ("dialogs", "teacher", "sampling", "prompts", "seed", "reward", "select", "revise"),
          lambda r, n: {
        "sft": Upstream("select", "sft", n, "dialogs"), "prompts": prompt_file(r, "train_path"),
        "teacher": teacher(r, n), **reward_model(r, n - 1)},
        ("sft", "pairs"), kind="generate", when=lambda r, n: r.dialogs is not None),
    # every pair selected so far, this round's included, and the recipe's preference files (by content, so that
    # editing one makes the stage stale; a key only when there are some, so older runs keep their fingerprints)
    Stage("reward_training", ("reward_training", "seed"), lambda r, n: {
        "model": student(r, n),
        "pairs": [Upstream("select", "pairs", k, f"reward_model (round {k})") for k in range(1, n + 1)],
        **({"preferences": [File(p, "reward_training.preference_paths") for p in r.reward_training.preference_paths]}
           if r.reward_training.preference_paths else {})},
        ("model", "log_history", "logs"), trains="reward_training", kind="train", models=("model",),
        when=lambda r, n: r.reward_training is not None),
    Stage("sft", ("sft", "seed"), sft_inputs,
          ("model", "log_history", "logs"), trains="sft", kind="train", models=("model",)),
    # on-policy pairs (dpo.pairs_from: policy): the SFT model samples the round's prompts; scored and paired as
    # select pairs the teacher's, served as eval serves the round's checkpoints
    Stage("policy_pairs", ("teacher", "sampling", "prompts", "seed", "reward", "select", "revise", "eval"),
          lambda r, n: {
        "policy": Upstream("sft", "model", n, "dpo.pairs_from"), "prompts": prompt_file(r, "train_path"),
        **({"failed_prompts": Upstream("select", "failed_prompts", n - 1, "prompts.retry_failed")}
           if r.prompts.retry_failed and n > 1 else {}),
        **reward_model(r, n - 1), **({"teacher": teacher(r, n)} if r.reward.judge else {})},
        ("pairs", "samples", "scores"), kind="generate", when=lambda r, n: r.dpo.pairs_from == "policy"),
    Stage("dpo", ("dpo", "seed"), lambda r, n: {
        "model": Upstream("sft", "model", n, "dpo"), "pairs": Upstream(pair_stage(r), "pairs", n, "dpo"),
        **({"ref_model": Model(r.dpo.ref_model_name_or_path, "dpo.ref_model_name_or_path", r.dpo.ref_model_revision)}
           if r.dpo.ref_model_name_or_path else {}),
        **({"earlier_pairs": [Upstream(pair_stage(r), "pairs", k, f"dpo.accumulate (round {k})")
                              for k in range(n - 1, max(1, n - r.dpo.accumulate) - 1, -1)]}
           if r.dpo.accumulate and n > 1 else {}),
        **({"dialogs_pairs": [Upstream("dialogs", "pairs", k, f"dpo: dialogs (round {k})")
                              for k in range(n, max(1, n - r.dpo.accumulate) - 1, -1)]}
           if r.dialogs is not None and r.dpo.pairs_from == "samples" else {}),
        **({"preferences": [File(s.path, "dpo.preference_sources") for s in r.dpo.preference_sources]}
           if r.dpo.preference_sources else {})}, ("model", "log_history", "logs"), trains="dpo", kind="train",
        models=("model",)),
    # eval reads `teacher` for its default backend and engine, and for the judge (the teacher, on its backend)
    Stage("eval", ("eval", "reward", "seed", "teacher"), lambda r, n: {
        "input": student(r, n), **sft_models(r, n, "eval"), "eval_prompts": prompt_file(r, "eval_path"),
        **reward_model(r, n), **({"teacher": teacher(r, n)} if r.eval.judge else {})},
        ("metrics", "answers"), kind="eval"),
    Stage("promote", ("gate",), promote_inputs, ("decision", "model", "best", "best_record")),
)}
EVAL_STAGES = ("eval", "promote")  # what `align eval` runs
MODEL_MAKERS = ("bootstrap", "import_gguf")  # they make the models a round starts from: checks wait for them


def asks_teacher(recipe: Recipe, stage: str) -> bool:
    """Does the stage send requests to the teacher: generate, revise, dialogs, and score with a judge (the judge is
    the teacher)."""
    return stage in ("generate", "revise", "dialogs") or (stage in ("score", "policy_pairs")
                                                           and recipe.reward.judge is not None)


def job_kind(recipe: Recipe, stage: str) -> str | None:
    """The launcher resources the stage runs with: a stage that asks the teacher runs as generate does; select and
    promote (None), seconds of file work, run where the orchestrator runs (a queue wait would cost more)."""
    return "generate" if asks_teacher(recipe, stage) else STAGES[stage].kind


def round_stages(recipe: Recipe, round_n: int, names=tuple(STAGES)) -> list[Stage]:
    """The stages of `names` that round n of this recipe has, in order."""
    return [STAGES[s] for s in names if STAGES[s].when(recipe, round_n)]


def upstreams(inputs: dict) -> list[Upstream]:
    return [x for v in inputs.values() for x in (v if isinstance(v, list) else [v]) if isinstance(x, Upstream)]


# --- what a stage reads of the recipe ------------------------------------------------------------------------------

# Teacher fields that change how requests reach the model but not the samples (marked TRANSPORT in config.py): the
# stage reads them, but editing them (a new port after a server died, more concurrency) resumes the stage instead of
# starting it again.
TEACHER_TRANSPORT = {name for name, f in TeacherConfig.model_fields.items() if f.json_schema_extra == TRANSPORT}


def stage_config(recipe: Recipe, stage: str) -> dict:
    """The recipe sections the stage declares, as JSON: what its `run` receives."""
    return recipe.model_dump(mode="json", include=set(STAGES[stage].sections))


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


def view(config: StageConfig, stage: str, **replace) -> StageConfig:
    """A composite stage's configuration as the stage it runs (`stage`, whose sections are a subset of its own)
    declares it, with `replace`d sections: policy_pairs and dialogs run generate, score and select this way."""
    out = object.__new__(StageConfig)
    out._stage = stage
    for key in STAGES[stage].sections:
        setattr(out, key, replace.get(key, getattr(config, key)))
    return out


def trainer_config(recipe: Recipe, stage: str):
    """The TrainerConfig of a training stage, None for the others."""
    section = STAGES[stage].trains
    return getattr(recipe, section) if section else None
