"""Every check that runs before any work, in one ordered list (CHECKS) that `align validate`, `round`, `eval` and
`stage` all walk; a command runs the checks named for it, in this order, so a bad recipe fails on its first problem
and never half-way through a round. The schema (alignment/config.py) decides only what the YAML alone decides; all
that looks at files, packages, models or this machine is here:

    recipe        the YAML against the schema (load_recipe): file, line and key of the first problem
    pins          each Hub id without a revision gets the run's pinned commit (alignment/pins.py); the commands that
                  start work resolve `main` and record it the first time
    prompts       every prompt source read and checked, held out from training, their fields what the verifiers read
    environment   packages and folders the recipe's settings need (report_to, lm-eval, its include folder)
    models        every model the recipe names: a folder with a config, or a pinned Hub id that is cached or reachable
    stage inputs  what only a later stage reads: preference files, lm-eval tasks and the modules they import
    machine       what this machine (or the SLURM nodes) lacks for the training stages: notes for validate, errors
                  for round and stage
    memory        the memory plan of the stages the command runs, against the launcher's GPUs

and, once the models a round reads exist (round.run_round), `check_round_models`: their templates, end of turn and
the prompts' lengths against each model's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

from alignment.config import Backend, InputError, Recipe, TrainerConfig, load_recipe
from alignment.consistency import check_chat_templates, check_prompt_lengths
from alignment.hub import hub_offline, pinned_snapshot
from alignment.inputs import identity
from alignment.pins import pin
from alignment.prompts import content_key, draw_mixture, read_prompts
from alignment.stage_table import STAGES, reward_model, student, teacher
from alignment.template import end_of_turn_id, holds_tool_call_step, load_tokenizer
from alignment.verifiers import check_counts, check_examples, check_isolation, check_prompt_fields


@dataclass
class Checked:
    """What the checks found: the recipe, the prompt counts, and notes to print (nothing in them stops a run)."""

    recipe: Recipe
    train: int = 0
    held_out: int = 0
    notes: list[str] = field(default_factory=list)


def run(recipe_file: str, overrides: list[str], command: str, stage: str | None = None) -> Checked:
    """The checks of `command` (validate, round, eval, stage, status, stats, report), in CHECKS' order."""
    recipe, notes = pin(load_recipe(recipe_file, overrides), resolve=command in RUNS)
    checked = Checked(recipe, notes=notes)
    for _, commands, check in CHECKS:
        if command in commands:
            check(checked, command, stage)
    return checked


# --- the checks, in the order they run ------------------------------------------------------------------------


def check_prompts(c: Checked, command: str, stage: str | None) -> None:
    """The prompt sources the recipe names: read and checked row by row, the held-out set apart from training, the
    fields each verifier reads present, every round's mixture quota fitting its source."""
    recipe = c.recipe
    p = recipe.prompts
    train, train_name = read_prompts(p.train_sources), p.train_path or "prompts.sources"
    held_out = read_prompts(p.eval_path)
    eval_name = "prompts.eval_path" if isinstance(p.eval_path, list) else p.eval_path
    for path, rows in ((train_name, train), (eval_name, held_out)):
        check_prompt_fields(recipe.reward.verifiers, rows, path)
    if p.sources:  # every round's quotas fit their sources (the rounds the recipe plans, or those it names)
        last = recipe.rounds or max([1, *(n for s in p.sources for n in s.rounds)])
        for n in range(1, last + 1):
            draw_mixture(train, p.quotas(n), recipe.seed, n)
    check_isolation(recipe.reward.verifiers)
    check_examples(recipe.reward.verifiers, recipe.teacher.system_prompts)
    if shared := {p["prompt_id"] for p in train} & {p["prompt_id"] for p in held_out}:
        raise InputError(f"{eval_name}: {len(shared)} prompt ids also in {train_name}, "
                         f"e.g. {sorted(shared)[:3]}; the evaluation split must be held out")
    trained_on = {content_key(p["messages"]): p["prompt_id"] for p in train}
    if leaked := [(p["prompt_id"], trained_on[k]) for p in held_out if (k := content_key(p["messages"])) in trained_on]:
        raise InputError(f"{eval_name}: {len(leaked)} held-out prompts ask what a training prompt asks "
                         f"(case and spacing aside), e.g. {leaked[0][0]!r} = {leaked[0][1]!r} in "
                         f"{train.where(train.ids[leaked[0][1]])}; the evaluation split must be held out")
    t = recipe.teacher  # (eval's servers serve this run's checkpoints: local folders, whose template renders)
    if t.backend == Backend.openai and t.endpoints and not Path(str(t.model_name_or_path), "tokenizer_config.json"
                                                                 ).is_file():
        if row := next((r for r in train if holds_tool_call_step(r["messages"])), None):
            raise InputError(f"{train_name}: prompt {row['prompt_id']!r} holds a tool-call step (a message with "
                             "stop_reason: end_of_message), which OpenAI's chat API cannot carry, and the teacher's "
                             "endpoints serve a model that is not a local folder whose template could render it. Use "
                             "teacher.backend transformers or vllm, or name the model's local folder")
    if recipe.dialogs is not None and recipe.dialogs.user == "followups" and not any("followups" in p for p in train):
        raise InputError(f"dialogs.user is followups, but no prompt of {train_name} has `followups` (the next user "
                         "turns); add them to the rows, map their column (columns.followups), or use "
                         "dialogs.user: simulator")
    capabilities = {p.get("capability") or "default" for p in train}
    if unused := sorted(set(recipe.teacher.system_prompts) - capabilities - {"default"}):
        raise InputError(f"teacher.system_prompts: {unused} match no prompt's capability in "
                         f"{train_name} (it has {sorted(capabilities)}); a misspelt key would "
                         "silently leave those prompts without their system prompt")
    c.train, c.held_out = len(train), len(held_out)


def check_environment(c: Checked, command: str, stage: str | None) -> None:
    """Packages and folders the recipe's settings need on this machine (the schema never looks at the machine,
    so a recipe validates the same everywhere and fails here, before work, where it cannot run)."""
    r = c.recipe
    for key in (s.trains for s in STAGES.values() if s.trains and getattr(r, s.trains) is not None):
        if missing := [x for x in getattr(r, key).report_to if find_spec(x) is None]:
            raise InputError(f"{key}.report_to {missing}: not installed in this environment (pip install {missing[0]})")
    if r.eval.lm_eval_include_path is not None and not r.eval.lm_eval_include_path.is_dir():
        raise InputError(f"eval.lm_eval_include_path: {r.eval.lm_eval_include_path} is not a folder")
    if r.eval.lm_eval_tasks and find_spec("lm_eval") is None:
        raise InputError("eval.lm_eval_tasks needs the lm-eval package (pip install lm-eval)")


def check_share(c: Checked, command: str, stage: str | None) -> None:
    """Per code verifier, the share of its prompts' asserts that the parent decides, outside the candidate (a
    note: a row with inside checks is refused when scored, unless the verifier allows them)."""
    recipe = c.recipe
    if not any(v.kind == "code" for v in recipe.reward.verifiers):
        return
    rows = [*read_prompts(recipe.prompts.train_sources), *read_prompts(recipe.prompts.eval_path)]
    c.notes += [f"code verifier {name!r}: {out} of {out + inside} asserts decided outside the candidate's process "
            f"({out / (out + inside):.1%}); {inside} inside" + (" (allow_inside_checks)" if inside else "")
            for name, (out, inside) in check_counts(recipe.reward.verifiers, rows).items() if out + inside]


def check_stage_inputs(c: Checked, command: str, stage: str | None) -> None:
    """What only a later stage would read: the reward model's extra preference files and the lm-eval tasks, by
    name and by the modules they import (indexing lm-eval's bundled tasks takes ~15 s, so only when the recipe's
    folder lacks one). Not for `status`, `stats` and `report`, which stay offline and quick."""
    recipe = c.recipe
    for i, path in enumerate(recipe.reward_training.preference_paths if recipe.reward_training else []):
        if not Path(path).is_file():
            raise InputError(f"reward_training.preference_paths[{i}]: {path} does not exist")
    if recipe.eval.lm_eval_tasks:
        from alignment.lm_eval_tasks import check_task_imports, task_manager

        include = str(recipe.eval.lm_eval_include_path) if recipe.eval.lm_eval_include_path else None
        manager = task_manager(include, tuple(recipe.eval.lm_eval_tasks))
        if unknown := [t for t in recipe.eval.lm_eval_tasks if t not in set(manager.all_tasks)]:
            raise InputError(f"eval.lm_eval_tasks: {unknown} are not lm-eval tasks (nor in eval.lm_eval_include_path "
                             f"{include}); `lm_eval ls tasks` lists them")
        check_task_imports(manager, recipe.eval.lm_eval_tasks)  # each task's modules import here


def check_models(c: Checked, command: str, stage: str | None) -> None:
    """Every model the recipe names exists before any work: a local folder with a config.json, or a Hub id that
    is cached or reachable (which may try the network); a reward model is a one-label sequence classifier. (A
    teacher behind endpoints is the name its servers serve: they check it.)"""
    recipe = c.recipe
    for key, section, attr, rev in (("student", recipe.student, "model_name_or_path", "revision"),
                                     ("teacher", None if recipe.teacher.endpoints else recipe.teacher,
                                      "model_name_or_path", "revision"),
                                     ("reward.reward_model", recipe.reward.reward_model, "model_name_or_path",
                                      "revision"),
                                     ("dpo", recipe.dpo, "ref_model_name_or_path", "ref_model_revision")):
        if section and (name := getattr(section, attr)):
            check_model(name, f"{key}.{attr}", getattr(section, rev), f"{key}.{rev}")
    if recipe.reward.reward_model and recipe.reward.reward_model.model_name_or_path:
        check_reward_model(recipe.reward.reward_model.model_name_or_path, recipe.reward.reward_model.revision)


def check_model(name: str, key: str, revision: str | None = None, rev_key: str = "revision") -> None:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{key}: {name} is a folder without config.json; expected a save_pretrained model")
        return
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise InputError(f"{key}: {name} does not exist; expected a model folder (or a Hub id such as org/name)")
    from huggingface_hub import try_to_load_from_cache

    # (without a revision, only under `validate`: the commands that start work pinned one, alignment/pins.py)
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    if offline := hub_offline():
        raise InputError(f"{key}: {name!r} is a Hub id that is not in the local cache, and this machine is offline "
                         f"({offline}); download it first or give a local model folder")


def check_reward_model(path: str, revision: str | None = None) -> None:
    """A reward model must be a sequence classifier with one output; its config says so without loading weights."""
    from transformers import AutoConfig

    key = "reward.reward_model.model_name_or_path"
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise InputError(f"{key}: cannot load a model config from {path!r}: {str(e).splitlines()[0]}") from None
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise InputError(f"{key}: {path} is {archs or 'an unknown architecture'}, not a sequence classifier; a "
                         "reward model is an AutoModelForSequenceClassification with one label")
    if config.num_labels != 1:
        raise InputError(f"{key}: {path} has {config.num_labels} labels; a reward model has exactly one")


def machine_problems(recipe) -> list[str]:
    """What this machine lacks for the recipe's training stages, from the stage table; under SLURM, what the
    training jobs' nodes lack (their GPUs are the recipe's, not the login node's)."""
    sections = [s.trains for s in STAGES.values() if s.trains and getattr(recipe, s.trains) is not None]
    gpus = recipe.launcher.train.gpus_per_node if recipe.launcher.kind == "slurm" else None
    return [p for key in sections for p in trainer_problems(getattr(recipe, key), key, gpus)]


def check_machine(c: Checked, command: str, stage: str | None) -> None:
    """`validate` notes what this machine lacks (a recipe written for a GPU cluster still validates here); `round`
    and `stage` refuse to start a training they cannot run."""
    problems = machine_problems(c.recipe)
    if command == "validate":
        c.notes += [f"note: this machine cannot run it as written: {p}" for p in problems]
    elif problems:
        raise InputError("this machine cannot train as the recipe asks:\n  " + "\n  ".join(problems))


def check_memory(c: Checked, command: str, stage: str | None) -> None:
    """The memory plan of what the command runs (a round: every planned stage; eval; one stage) against the
    launcher's GPUs (alignment/memory_plan.py)."""
    from alignment.memory_plan import PLANNED, check_plan  # (imports torch and transformers' model classes)

    check_plan(c.recipe, {"round": PLANNED, "eval": ("eval",)}.get(command) or
               ((stage,) if stage in PLANNED else ()))


def trainer_problems(cfg: TrainerConfig, key: str, gpus: int | None = None) -> list[str]:
    """What this machine (or nodes of `gpus` GPUs) lacks to train as configured (a recipe written for a GPU
    cluster still validates here; running it is what fails, before any work)."""
    import torch

    gpus, out = torch.cuda.device_count() if gpus is None else gpus, []
    if cfg.distributed in ("fsdp", "zero3") and gpus == 0:
        out.append(f"{key}.distributed: {cfg.distributed} shards weights over GPUs and this machine has none "
                   "(on CPUs accelerate 1.15 would train it as DDP, unsharded); use ddp (gloo) or no distributed")
    if cfg.distributed == "zero3" and find_spec("deepspeed") is None:
        out.append(f"{key}.distributed: zero3 needs DeepSpeed (pip install deepspeed)")
    if gpus and cfg.num_processes > gpus:
        out.append(f"{key}.num_processes: {cfg.num_processes} is more than this machine's {gpus} GPUs")
    if cfg.attn_implementation in ("flex_attention", "flash_attention_2") and gpus == 0:
        out.append(f"{key}.attn_implementation: {cfg.attn_implementation} trains on CUDA GPUs only and this "
                   "machine has none; use sdpa")
    elif cfg.attn_implementation == "flash_attention_2" and find_spec("flash_attn") is None:
        out.append(f"{key}.attn_implementation: flash_attention_2 needs the flash-attn package "
                   "(pip install flash-attn); or use flex_attention")
    if cfg.lora and cfg.lora.quantize_base_4bit:
        if gpus == 0:
            out.append(f"{key}.lora.quantize_base_4bit (QLoRA) needs a CUDA GPU; this machine has none")
        elif find_spec("bitsandbytes") is None:
            out.append(f"{key}.lora.quantize_base_4bit (QLoRA) needs bitsandbytes (pip install bitsandbytes)")
    return out


def check_round_models(recipe: Recipe, round_n: int) -> None:
    """The round's models that render conversations (the student first) each have a pad token and an end of turn,
    render the recipe's prompts alike, and every prompt fits the context of the model that reads it with the tokens
    it may add."""
    specs = {"student": student(recipe, round_n)}
    if not recipe.teacher.endpoints:  # a remote teacher applies its server's template; we cannot load it here
        specs["teacher"] = teacher(recipe, round_n)
    rm = reward_model(recipe, round_n - 1).get("reward_model")
    if rm:  # renders what it scores with its own template (Skywork's has no date header): checked, not compared
        specs["reward model"] = rm
    models, tokenizers = {}, {}
    for role, spec in specs.items():
        found = identity(recipe, spec)
        # a pinned Hub model: that commit's config and tokenizer, as its stages load it (runner.input_value), never
        # `main`, which may have moved on or (offline, only the pinned snapshot cached) not be there at all
        models[role] = (str(pinned_snapshot(found["path"], found["revision"], weights=False)) if "revision" in found
                        else found["path"])
        where = f"{role} ({found['path']}" + (f" at {found['revision']})" if "revision" in found else ")")
        tokenizers[role] = load_tokenizer(models[role], where)
        end_of_turn_id(tokenizers[role], where)
    train, held_out = read_prompts(recipe.prompts.train_sources), read_prompts(recipe.prompts.eval_path)  # read once
    sample = {r["prompt_id"]: r["messages"] for rows in (train, held_out) for r in rows[:4]}
    # the models that write what the student learns from render alike; the reward model only reads conversations
    # as messages (rewards.RewardModel renders them with its own template), so it must render them, not alike
    check_chat_templates({k: v for k, v in tokenizers.items() if k != "reward model"}, sample)
    if "reward model" in tokenizers:
        check_chat_templates({"reward model": tokenizers["reward model"]}, sample)
    if "teacher" in models:  # (behind endpoints, the teacher's server knows its own context)
        check_prompt_lengths(train, models["teacher"], tokenizers["teacher"],
                             recipe.sampling.max_new_tokens, "sampling.max_new_tokens", recipe.teacher.system_prompts,
                             recipe.teacher.engine.max_model_len)
    check_prompt_lengths(held_out, models["student"], tokenizers["student"], recipe.eval.max_new_tokens,
                         "eval.max_new_tokens", {})


RUNS = ("round", "eval", "stage")  # the commands that start work
READS = ("status", "stats", "report")  # read-only: the recipe and its prompts, nothing slow, nothing online
# (name, the commands that run it, the check): one entry per check, in the order they run
CHECKS: list[tuple[str, tuple[str, ...], Callable[[Checked, str, str | None], None]]] = [
    ("prompts", ("validate", *RUNS, *READS), check_prompts),
    ("environment", ("validate", *RUNS), check_environment),
    ("models", ("validate", *RUNS), check_models),
    ("stage inputs", ("validate", *RUNS), check_stage_inputs),
    ("code checks decided outside", ("validate",), check_share),
    ("machine", ("validate", "round", "stage"), check_machine),
    ("memory", RUNS, check_memory),
]
