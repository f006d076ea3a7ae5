"""The orchestrator: decides which stages of a round are due, in what order, and runs each in its own process.

Which stages exist, what each reads and where its inputs come from is `alignment/stage_table.py`; this module
only walks it. A stage is due when its folder has no manifest, or the manifest's fingerprint differs from the one
computed now from the recipe sections it declares and its inputs' identities. Inputs are exactly the paths named
in upstream manifests (or in the recipe), never "the latest folder".

    align round 1 --recipe recipes/tiny.yaml [key.path=value ...]
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from alignment import prefork
from alignment.config import InputError, Recipe
from alignment.consistency import check_chat_templates, check_prompt_lengths
from alignment.launcher import cancel_recorded, run_stage_job
from alignment.manifest import TORN, hash_json, read_manifest, write_json_atomic
from alignment.metrics import fmt, fmt_ci, fmt_evidence, metric_columns, metrics_table
from alignment.prompts import read_prompts, source_identity
from alignment.seeding import model_identity
from alignment.template import end_of_turn_id, load_tokenizer
from alignment.stage_table import (EVAL_STAGES, MODEL_MAKERS, STAGES, File, Upstream, asks_teacher,
                                   hashed_config, job_kind, reward_model, round_stages, stage_config, student,
                                   teacher, upstreams)


class StageFailed(Exception):
    pass


@contextmanager
def run_lock(recipe: Recipe):
    """One writer per recipe run folder. A second `align round`, `eval` or `stage` on it fails at once, naming the
    holder; read-only commands (status, stats, report) take no lock. flock, so the kernel releases it when the
    holder exits, even by kill -9."""
    folder = recipe.runs_dir / recipe.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(f"{folder} is in use by another run ({f.read().strip() or 'starting'}); wait for it to "
                             "finish, or stop it") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}")
        f.flush()
        yield


def round_dir(recipe: Recipe, round_n: int) -> Path:
    return recipe.runs_dir / recipe.name / f"round-{round_n}"


def stage_dir(recipe: Recipe, round_n: int, stage: str) -> Path:
    if STAGES[stage].once:  # built once per recipe, shared by every round
        return recipe.runs_dir / recipe.name / stage
    return round_dir(recipe, round_n) / stage


# --- input identities: {"path": ..., "hash": ...} ------------------------------------------------------------


def identity(recipe: Recipe, spec) -> dict:
    """Where an input is and what identifies it: an upstream output by its stage's fingerprint, a file by its
    content, a model folder by its files (a hub id by its name)."""
    if isinstance(spec, list):
        return [identity(recipe, s) for s in spec]
    if isinstance(spec, Upstream):
        folder = stage_dir(recipe, spec.round, spec.stage)
        if (m := read_manifest(folder)) is None:
            raise InputError(f"{spec.why}: {folder} has no manifest.json (that stage has not completed)")
        out = m["outputs"][spec.output]
        return {"path": os.path.normpath(folder / out), "hash": f"{m['fingerprint']}:{spec.output}"}
    if isinstance(spec, File):  # a prompt source (a file, a folder, a Hub dataset) or a preference file
        return source_identity(spec.path, spec.key)
    if spec.revision and not Path(spec.name).expanduser().is_dir():  # a pinned hub model: the stage loads that
        # commit's snapshot (runner.input_value); a local folder is what it is, whatever revision it names
        return {"path": spec.name, "revision": spec.revision, "hash": hash_json([spec.name, spec.revision])}
    return {"path": spec.name, "hash": model_identity(spec.name)}


def stage_inputs(recipe: Recipe, round_n: int, stage: str) -> dict:
    return {name: identity(recipe, spec) for name, spec in STAGES[stage].inputs(recipe, round_n).items()}


# --- running -------------------------------------------------------------------------------------------------


def fingerprint(stage: str, config: dict, inputs: dict) -> str:
    """What the stage's outputs are a function of: the recipe sections it reads (less transport settings) and
    its inputs' identities."""
    hashes = {k: [x["hash"] for x in v] if isinstance(v, list) else v["hash"] for k, v in inputs.items()}
    return hash_json({"stage": stage, "config": hashed_config(config), "inputs": hashes})


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def trainer_config(recipe: Recipe, stage: str):
    """The TrainerConfig of a training stage, None for the others."""
    section = STAGES[stage].trains
    return getattr(recipe, section) if section else None


def stage_command(recipe: Recipe, stage: str, job: Path, launch_args: list[str] = ()) -> list[str]:
    """`python -m alignment.runner job.json`, or the same under `accelerate launch` for a distributed trainer
    (`launch_args`: a SLURM job's processes, machines and rendezvous, in place of the recipe's process count)."""
    cfg = trainer_config(recipe, stage)
    if cfg is None or cfg.distributed is None:
        return [sys.executable, "-m", "alignment.runner", str(job)]
    # cpu_offload overrides the config file's offload settings (flags given on the command line win over it)
    offload = {"fsdp": ["--fsdp_offload_params", "true"], "zero3": ["--offload_param_device", "cpu",
               "--offload_optimizer_device", "cpu"]}.get(cfg.distributed, []) if cfg.cpu_offload else []
    # Under FSDP the recipe's gradient_checkpointing is FSDP's activation checkpointing (the config file leaves it
    # out, so this flag alone decides); training.trainer_fields turns the Trainer's own off, which transformers
    # requires.
    recompute = (["--fsdp_activation_checkpointing", str(cfg.gradient_checkpointing).lower()]
                 if cfg.distributed == "fsdp" else [])
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ACCELERATE_CONFIGS / f"{cfg.distributed}.yaml"),
            *(launch_args or ["--num_processes", str(cfg.num_processes)]), *offload, *recompute,
            "-m", "alignment.runner", str(job)]


def stage_env(recipe: Recipe, stage: str) -> dict:
    """The stage's environment: the teacher's API key only where requests go to the teacher (generate, and score
    with a judge), so no other stage, nor the code it runs, can read it (from its own or its parent's /proc)."""
    env = dict(os.environ)
    if recipe.teacher.api_key_env and not asks_teacher(recipe, stage):
        env.pop(recipe.teacher.api_key_env, None)
    cfg = trainer_config(recipe, stage)
    if cfg is not None and cfg.distributed:
        import torch

        slurm = recipe.launcher.kind == "slurm"  # the job's GPUs are the recipe's, not this (login) machine's
        if not (recipe.launcher.train.gpus_per_node if slurm else torch.cuda.is_available()):
            env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo: accelerate's config alone would run one process
    return env


def stage_server(recipe: Recipe):
    """While inside, stages fork from one process that imported their libraries once (alignment/prefork.py). Its
    environment is that of every stage that does not ask the teacher: without the teacher's API key."""
    env = dict(os.environ)
    if recipe.teacher.api_key_env:
        env.pop(recipe.teacher.api_key_env, None)
    return prefork.serving(env, recipe.launcher.prefork)


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
    resume = False
    with suppress(OSError, ValueError, KeyError):  # no job.json, or not one that a run of ours wrote
        resume = old is None and json.loads((folder / "job.json").read_text())["fingerprint"] == fp
    why = ("forced" if force and old else "recipe or inputs changed" if old
           else "resuming an interrupted run" if resume else "not done yet")
    print(f"[round {round_n}] {stage}: running ({why})", flush=True)
    cancel_recorded(folder)  # SLURM jobs of an earlier run that outlived it must not write into this one
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    elif resume:  # a job of an earlier run that finished while being cancelled: this run's manifest is the one
        (folder / "manifest.json").unlink(missing_ok=True)
        for torn in folder.rglob(TORN):  # a write the kill cut short: never renamed into place, never to be read
            torn.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    job = {"stage": stage, "round": round_n, "recipe_name": recipe.name, "recipe_file": recipe_file,
           "overrides": overrides, "config": config, "inputs": inputs, "fingerprint": fp}
    start, env = time.time(), stage_env(recipe, stage)
    if recipe.launcher.kind == "slurm" and job_kind(recipe, stage):
        code = run_stage_job(recipe, round_n, stage, folder, job, env)
    else:
        write_json_atomic(folder / "job.json", job)
        code = prefork.run(stage_command(recipe, stage, folder / "job.json"), env)
    if code != 0:
        raise StageFailed(f"stage {stage} of round {round_n} failed (exit code {code}); {folder} has "
                          "no manifest, so the next run of this round starts that stage again")
    print(f"[round {round_n}] {stage}: done in {time.time() - start:.0f}s", flush=True)
    return True


def check_round_models(recipe: Recipe, round_n: int) -> None:
    """The round's models that render conversations (the student first) each have a pad token and an end of turn,
    render the recipe's prompts alike, and every prompt fits the context of the model that reads it with the tokens
    it may add."""
    from alignment.runner import pinned_snapshot  # (the runner's fetch; imported here, where it is used)

    specs = {"student": student(recipe, round_n)}
    if not recipe.teacher.endpoints:  # a remote teacher applies its server's template; we cannot load it here
        specs["teacher"] = teacher(recipe, round_n)
    rm = reward_model(recipe, round_n - 1).get("reward_model")
    if rm:  # a trained one was made from the student: its template is the student's by construction
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
    check_chat_templates(tokenizers, {r["prompt_id"]: r["messages"] for rows in (train, held_out) for r in rows[:4]})
    if "teacher" in models:  # (behind endpoints, the teacher's server knows its own context)
        check_prompt_lengths(train, models["teacher"], tokenizers["teacher"],
                             recipe.sampling.max_new_tokens, "sampling.max_new_tokens", recipe.teacher.system_prompts,
                             recipe.teacher.engine.max_model_len)
    check_prompt_lengths(held_out, models["student"], tokenizers["student"], recipe.eval.max_new_tokens,
                         "eval.max_new_tokens", {})


def run_round(recipe: Recipe, round_n: int, *, recipe_file: str, overrides: list[str], eval_only: bool = False
              ) -> dict:
    """Run whichever stages of round n are due (from eval on, with `eval_only`), then print its evaluation and
    promotion."""
    if round_n < 1:
        raise InputError(f"round must be 1 or more, got {round_n}")
    if recipe.rounds is not None and round_n > recipe.rounds:
        raise InputError(f"round {round_n}: the recipe plans {recipe.rounds} rounds (key `rounds`); raise it to go on")
    if eval_only and not round_dir(recipe, round_n).exists():
        raise InputError(f"round {round_n} does not exist: no folder {round_dir(recipe, round_n)}; "
                         f"run `make round N={round_n}` first")
    if round_n > 1:
        identity(recipe, student(recipe, round_n))  # fail now, before any work, if round n-1 is missing
    checked = False
    with run_lock(recipe), stage_server(recipe):
        for stage in round_stages(recipe, round_n, EVAL_STAGES if eval_only else tuple(STAGES)):
            if stage.name not in MODEL_MAKERS and not eval_only and not checked:  # models exist now: check them
                check_round_models(recipe, round_n)  # before any stage spends time on them
                checked = True
            run_stage(recipe, round_n, stage.name, recipe_file=recipe_file, overrides=overrides)
    metrics, decision, best = (json.loads((stage_dir(recipe, round_n, s) / f"{f}.json").read_text())
                               for s, f in (("eval", "metrics"), ("promote", "decision"), ("promote", "best")))
    print(format_metrics(round_n, {**metrics, **reference_metrics(recipe)}))
    print(promotion(decision, metrics), *(f"  {reason}" for reason in decision["reasons"]), sep="\n")
    print(f"best so far: {best['name']} (held-out accuracy {fmt(best['accuracy'])})")
    return metrics


def reference_metrics(recipe: Recipe) -> dict:
    """{"teacher": metrics} of the fixed teacher, when the recipe evaluated it; else {}."""
    folder = stage_dir(recipe, 0, "teacher_eval")
    return json.loads((folder / "metrics.json").read_text()) if read_manifest(folder) else {}


def status(recipe: Recipe, round_n: int, stage: str) -> str:
    """'done' (manifest matches the recipe and inputs now), 'stale' (it does not), or 'missing'."""
    if (m := read_manifest(stage_dir(recipe, round_n, stage))) is None:
        return "missing"
    try:
        fp = fingerprint(stage, stage_config(recipe, stage), stage_inputs(recipe, round_n, stage))
    except InputError:
        return "stale"  # an input it was built from is gone
    return "done" if m["fingerprint"] == fp else "stale"


def round_status(recipe: Recipe, rounds: list[int]) -> dict[tuple[int, str], str]:
    """{(round, stage): status} for the given rounds, where a done stage that builds on a stage that is not done
    (in its own round or an earlier one, as the table's inputs say) counts as stale: it will be run again."""
    memo: dict[tuple[int, str], str] = {}

    def st(n: int, name: str) -> str:
        key = (0 if STAGES[name].once else n, name)
        if key not in memo:
            c = status(recipe, n, name)
            if c == "done" and any(st(u.round, u.stage) != "done" for u in upstreams(STAGES[name].inputs(recipe, n))):
                c = "stale"
            memo[key] = c
        return memo[key]

    return {(n, s.name): st(n, s.name) for n in rounds for s in round_stages(recipe, n)}


def status_table(recipe: Recipe) -> str:
    rounds = sorted(int(p.name.split("-")[1]) for p in (recipe.runs_dir / recipe.name).glob("round-*")
                    if p.name.split("-")[1].isdigit()) or [1]
    names = [s for s in STAGES if any(STAGES[s].when(recipe, n) for n in rounds)]
    table = round_status(recipe, rounds)
    lines = [f"{recipe.runs_dir / recipe.name}", "round  " + "".join(f"{s:>13}" for s in names) + "       disk"]
    for n in rounds:
        cells = [table.get((n, s), "-") for s in names]
        lines.append(f"{n:<7}" + "".join(f"{c:>13}" for c in cells) + f"{gib(round_dir(recipe, n)):>11}")
    once = [stage_dir(recipe, 0, s) for s in STAGES if STAGES[s].once]
    lines.append(f"once-per-recipe stages ({', '.join(p.name for p in once if p.exists()) or 'none yet'}): "
                 f"{gib(*once).strip()}")
    for n in rounds:  # what each finished round promoted, and on what evidence
        promote, evaluation = stage_dir(recipe, n, "promote"), stage_dir(recipe, n, "eval")
        if read_manifest(promote) and read_manifest(evaluation):
            lines.append(f"round {n} " + promotion(json.loads((promote / "decision.json").read_text()),
                                                   json.loads((evaluation / "metrics.json").read_text())))
    if teacher := reference_metrics(recipe).get("teacher"):
        lines.append(f"fixed teacher: accuracy {fmt_ci(teacher.get('accuracy'), teacher.get('accuracy_ci'))}")
    return "\n".join(lines)


def gib(*folders: Path) -> str:
    """Bytes on disk under the folders, in GiB: checkpoints are what fills a cluster's quota."""
    size = sum(f.stat().st_size for folder in folders if folder.exists() for f in folder.rglob("*") if f.is_file())
    return f"{size / 2**30:.2f} GiB"


def promotion(decision: dict, metrics: dict) -> str:
    """`promoted: sft, accuracy 0.467 [0.41, 0.52]; accuracy +0.033 [-0.010, +0.077] vs input, McNemar exact
    p=0.16`: the promoted model's primary metric with its interval, and the gate's evidence against the input."""
    name, metric = decision["promoted"], decision.get("primary_metric", "accuracy")  # older decisions lack it
    m = metrics[name]
    evidence = fmt_evidence(decision.get("evidence"))
    return (f"promoted: {name}{' (forced)' if decision['forced'] else ''}, {metric} "
            f"{fmt_ci(m.get(metric), m.get(f'{metric}_ci'))}" + (f"; {evidence}" if evidence else ""))


def format_metrics(round_n: int, metrics: dict) -> str:
    """The round's models, and the fixed teacher as a reference row when it was evaluated."""
    rows = [(name, metrics[name]) for name in ("input", "sft", "dpo", "teacher") if name in metrics]
    return "\n".join([f"round {round_n} held-out evaluation"] + metrics_table(rows, metric_columns([metrics])))
