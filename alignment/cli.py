"""`align`: the command behind `make round`, `make validate` and friends.

    align validate recipes/tiny.yaml [key.path=value ...]   # overrides: any key of the recipe
    align round 1 --recipe recipes/tiny.yaml [--force dpo] [key.path=value ...]
    align eval 1 --recipe recipes/tiny.yaml [--force dpo]      # evaluate and gate round 1's checkpoints
    align status --recipe recipes/tiny.yaml                   # done / stale / missing; what each round promoted
    align report --recipe recipes/tiny.yaml                   # runs/<recipe>/report/report.md and plots
    align stats 1 --recipe recipes/tiny.yaml                  # round 1's scoring and selection, filter by filter
    align stage sft --round 1 --recipe recipes/tiny.yaml [key.path=value ...]   # re-run one stage
    align explain [sft | dpo.beta | teacher.engine ...]       # a recipe section's or key's type, default, meaning
    align plan recipes/llama3.1-70b.yaml [key.path=value ...] # GPU memory per stage against the launcher's GPUs
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from alignment.config import Backend, InputError, load_recipe
from alignment.prompts import content_key, draw_mixture, read_prompts
from alignment.verifiers import check_counts, check_examples, check_isolation, check_prompt_fields
from alignment.round import StageFailed, run_lock, run_round, run_stage, status_table
from alignment.stage_table import STAGES
from alignment.template import holds_tool_call_step


def validate(recipe_file: str, overrides: list[str]):
    """The recipe and the prompt files it names, checked without running anything."""
    recipe = load_recipe(recipe_file, overrides)
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
    return recipe, len(train), len(held_out)


def check_share(recipe) -> list[str]:
    """Per code verifier, the share of its prompts' asserts that the parent decides, outside the candidate."""
    if not any(v.kind == "code" for v in recipe.reward.verifiers):
        return []
    rows = [*read_prompts(recipe.prompts.train_sources), *read_prompts(recipe.prompts.eval_path)]
    return [f"code verifier {name!r}: {out} of {out + inside} asserts decided outside the candidate's process "
            f"({out / (out + inside):.1%}); {inside} inside" + (" (allow_inside_checks)" if inside else "")
            for name, (out, inside) in check_counts(recipe.reward.verifiers, rows).items() if out + inside]


def check_stage_inputs(recipe) -> None:
    """What only a later stage would read, checked before any work: the reward model's extra preference files and
    the lm-eval tasks, by name and by the modules they import (indexing lm-eval's bundled tasks takes ~15 s, so only
    when the recipe's folder lacks one),
    and every model key (which may try the network): so `status`, `stats` and `report` stay offline and quick."""
    check_models(recipe)
    if recipe.reward.reward_model and recipe.reward.reward_model.model_name_or_path:
        check_reward_model(recipe.reward.reward_model.model_name_or_path, recipe.reward.reward_model.revision)
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


def check_models(recipe) -> None:
    """Every model the recipe names exists before any work: a local folder with a config.json, or a Hub id that
    is cached or reachable. (A teacher behind endpoints is the name its servers serve: they check it.)"""
    for key, section, field, rev in (("student", recipe.student, "model_name_or_path", "revision"),
                                     ("teacher", None if recipe.teacher.endpoints else recipe.teacher,
                                      "model_name_or_path", "revision"),
                                     ("reward.reward_model", recipe.reward.reward_model, "model_name_or_path",
                                      "revision"),
                                     ("dpo", recipe.dpo, "ref_model_name_or_path", "ref_model_revision")):
        if section and (name := getattr(section, field)):
            check_model(name, f"{key}.{field}", getattr(section, rev), f"{key}.{rev}")


def check_model(name: str, key: str, revision: str | None = None, rev_key: str = "revision") -> None:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{key}: {name} is a folder without config.json; expected a save_pretrained model")
        return
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise InputError(f"{key}: {name} does not exist; expected a model folder (or a Hub id such as org/name)")
    if not revision:  # a Hub repo moves: without a pinned commit, a rerun may train on other weights
        raise InputError(f"{key}: {name!r} is a Hub id without a pinned revision; set {rev_key} to its commit hash "
                         "(the Hub page's 'Files' tab shows it)")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    if offline := hub_offline():
        raise InputError(f"{key}: {name!r} is a Hub id that is not in the local cache, and this machine is offline "
                         f"({offline}); download it first or give a local model folder")


def hub_offline() -> str | None:
    """Why the Hub cannot be used (HF_HUB_OFFLINE, or no connection), or None: one quick connection instead of
    a minute of retries inside transformers or datasets later."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError as e:
        return f"{endpoint.hostname} cannot be reached: {e}"
    return None


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
    return [p for key in sections for p in getattr(recipe, key).machine_problems(key, gpus)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check a recipe and its prompt files")
    v.add_argument("recipe")
    pl = sub.add_parser("plan", help="GPU memory each stage needs per GPU, against what the launcher gives it")
    pl.add_argument("recipe")
    r = sub.add_parser("round", help="run (or resume) round N")
    e = sub.add_parser("eval", help="evaluate round N's checkpoints and decide which one is promoted")
    st = sub.add_parser("status", help="which stages of which rounds are done, stale or missing, and what each "
                        "round promoted (primary metric, its interval, the gate's evidence)")
    rep = sub.add_parser("report", help="Markdown report and plots across rounds")
    sts = sub.add_parser("stats", help="round N's scoring and selection: scorers, filters, pairs, reward model")
    for p in (r, e, sts):
        p.add_argument("n", type=int)
    for p in (r, e):
        p.add_argument("--force", choices=("dpo", "sft"), help="promote this checkpoint whatever the gate says")
    s = sub.add_parser("stage", help="re-run one stage of a round, even if it is up to date")
    s.add_argument("stage", choices=list(STAGES))
    s.add_argument("--round", type=int, default=1)
    x = sub.add_parser("explain", help="what a recipe key means: type, default and description")
    x.add_argument("key", nargs="?", default="", help="a section (sft), a dotted path (teacher.engine) or a field "
                   "(dpo.beta); none: the top-level keys")
    for p in (r, e, st, rep, sts, s):
        p.add_argument("--recipe", default="recipes/tiny.yaml")
    # Overrides are the leftover key.path=value words, so they may stand before or after the options.
    args, args.overrides = ap.parse_known_args(argv)
    if stray := [a for a in args.overrides if "=" not in a or a.startswith("-")]:
        ap.error(f"unrecognized arguments: {' '.join(stray)} (overrides are written key.path=value)")
    try:
        if args.cmd == "explain":
            from alignment.explain import explain

            print(explain(args.key))
        elif args.cmd == "plan":
            from alignment.memory_plan import format_plan

            print(format_plan(load_recipe(args.recipe, args.overrides)))
        elif args.cmd == "validate":
            recipe, n_train, n_eval = validate(args.recipe, args.overrides)
            check_stage_inputs(recipe)
            print(f"{args.recipe}: ok (recipe {recipe.name!r}; {n_train} training prompts, {n_eval} held out)")
            for line in check_share(recipe):
                print(line)
            for problem in machine_problems(recipe):
                print(f"note: this machine cannot run it as written: {problem}")
        else:
            if getattr(args, "force", None):
                args.overrides.append(f"gate.force={args.force}")  # recorded with the other overrides
            recipe, _, _ = validate(args.recipe, args.overrides)
            if args.cmd in ("round", "eval", "stage"):  # later stages' inputs; what it runs must fit the GPUs
                from alignment.memory_plan import PLANNED, check_plan

                check_stage_inputs(recipe)
                if args.cmd != "eval" and (problems := machine_problems(recipe)):
                    raise InputError("this machine cannot train as the recipe asks:\n  " + "\n  ".join(problems))
                check_plan(recipe, {"round": PLANNED, "eval": ("eval",)}.get(args.cmd) or
                           ((args.stage,) if getattr(args, "stage", None) in PLANNED else ()))
            if args.cmd in ("round", "eval"):
                run_round(recipe, args.n, recipe_file=args.recipe, overrides=args.overrides,
                          eval_only=args.cmd == "eval")
            elif args.cmd == "status":
                print(status_table(recipe))
            elif args.cmd == "stats":
                from alignment.summary import round_summary

                print(round_summary(recipe, args.n))
            elif args.cmd == "report":
                from alignment.report import write_report  # matplotlib loads only when asked for

                print(f"wrote {write_report(recipe)}")
            else:
                with run_lock(recipe):
                    run_stage(recipe, args.round, args.stage, recipe_file=args.recipe, overrides=args.overrides,
                              force=True)
    except (InputError, StageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
