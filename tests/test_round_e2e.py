"""A whole round on a smaller config, run as a user runs it (the `align` CLI, stages in their own processes),
then resume and staleness: what must be skipped is skipped, what must be redone is redone."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForSequenceClassification

import readme_commands
from alignment.chat import build_tokenizer, render
from alignment.config import BootstrapConfig
from alignment.prompts import read_prompts
from alignment.shards import load_shards
from alignment.stages.generate import draw_round_prompts
from alignment.tasks.arithmetic import followups
from alignment.tiny_models import random_llama, save

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KILLS = 10  # SIGKILL points in the killed-anywhere test: every stage once (more at random when raised)
STAGES = ["bootstrap", "teacher_eval", "generate", "score", "select", "dialogs", "reward_training", "sft", "dpo", "eval",
          "promote"]
ONCE = ("bootstrap", "teacher_eval")  # once per recipe: runs/<recipe>/<stage>/
NUM_PROMPTS, EVAL_PROMPTS = 24, 16


def memorizing_teacher(path: Path) -> Path:
    """A teacher that answers some prompts right, in seconds of training where the bootstrap needs minutes: a
    tiny Llama of the bootstrap's shape taught the reference answers of two of every three prompts the round
    draws, and of every other held-out prompt eval asks, until it repeats them. The rest it gets wrong."""
    r = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    drawn = draw_round_prompts(read_prompts(ROOT / "data/arithmetic/train.jsonl"), NUM_PROMPTS, r["seed"], 1)
    held_out = read_prompts(ROOT / "data/arithmetic/eval.jsonl")[:EVAL_PROMPTS]
    taught = [p for i, p in enumerate(drawn) if i % 3 != 2] + held_out[::2]
    tok = build_tokenizer()
    model = random_llama(tok, seed=0, **BootstrapConfig(**r["bootstrap"]).llama_shape())
    texts = [render(tok, [*p["messages"], {"role": "assistant", "content": p["messages"][0]["content"][
        len("What is "):-1] + f" = {p['answer']}"}]) for p in taught]
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return save(model.eval(), tok, path)


def small_recipe(tmp: Path, runs: Path) -> Path:
    """tiny.yaml shrunk to seconds per stage, with a teacher that answers some prompts right (memorizing_teacher)
    and a (random) sequence-classification reward model, which makes rewards continuous so that every prompt has
    an SFT row and a pair."""
    rm_path = tmp / "rm"
    tok = build_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id))
    rm.save_pretrained(rm_path)
    tok.save_pretrained(rm_path)
    r = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    r["name"] = "e2e"
    r["runs_dir"] = str(runs)
    # the arithmetic prompts, each with two follow-up turns: the round's dialogs go on for two more turns
    rng, train = random.Random(0), tmp / "train.jsonl"
    train.write_text("".join(json.dumps({**row, "followups": followups(rng, int(row["answer"]), 2)}) + "\n"
                             for row in map(json.loads, (ROOT / "data/arithmetic/train.jsonl").open())))
    r["prompts"] = {"train_path": str(train), "eval_path": str(ROOT / "data/arithmetic/eval.jsonl"),
                    "num_prompts": NUM_PROMPTS}
    r["dialogs"] = {"turns": 3}
    # targets of 0: the student is the first checkpoint (step 10); the bootstrap's teacher (step 20) is not used
    r["bootstrap"].update(student_accuracy=0.0, teacher_accuracy=0.0, eval_every=10, dev_size=8, batch_size=16)
    r["teacher"].update(source="path", model_name_or_path=str(memorizing_teacher(tmp / "teacher")))
    r["sampling"]["num_samples"] = 3
    r["reward"]["reward_model"] = {"model_name_or_path": str(rm_path), "batch_size": 16, "weight": 1.0}
    r["select"] = {"sft_min_reward": -100.0, "pair_min_margin": 1e-6}
    for s in ("sft", "dpo"):  # several optimizer steps: the first one runs at warmup's learning rate of 0
        # (a third turn's dialog is ~140 characters: tokens, with the tiny tokenizer)
        r[s].update(num_train_epochs=2, per_device_train_batch_size=2, logging_steps=1, max_length=192)
    r["eval"].update(num_prompts=EVAL_PROMPTS, lm_eval_limit=8)
    # lm-eval reads its task's data file relative to the working directory: the task names it by an absolute
    # path, so the round runs from any folder (the moved round runs from another) with the same configuration
    tasks = tmp / "lm_eval"
    shutil.copytree(ROOT / r["eval"]["lm_eval_include_path"], tasks)
    for f in tasks.glob("*.yaml"):
        f.write_text(f.read_text().replace(" data/arithmetic/", f" {ROOT}/data/arithmetic/"))
    r["eval"]["lm_eval_include_path"] = str(tasks)
    path = tmp / "e2e.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def align(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def ran(proc) -> list[str]:
    """Stages that actually ran, from the orchestrator's progress lines."""
    return [line.split("] ")[1].split(":")[0] for line in proc.stdout.splitlines() if ": running (" in line]


@pytest.fixture(scope="module")
def round1(tmp_path_factory):
    """Round 1 run as the README tells a newcomer to: its own `make round N=1` line, on the shrunken recipe."""
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = small_recipe(tmp, tmp / "runs")
    proc = readme_commands.run(readme_commands.ROUND1, recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, tmp / "runs" / "e2e", proc


def folder_of(run: Path, stage: str) -> Path:
    return run / stage if stage in ONCE else run / "round-1" / stage


def manifest(run: Path, stage: str) -> dict:
    return json.loads((folder_of(run, stage) / "manifest.json").read_text())


def test_round_writes_every_artifact_with_a_manifest(round1):
    recipe, run, proc = round1
    assert ran(proc) == STAGES
    for stage in STAGES:
        m = manifest(run, stage)
        assert m["stage"] == stage and m["wall_time_s"] >= 0 and m["versions"]["trl"] == "1.16.0"
        for out in m["outputs"].values():
            folder = run / stage if stage in ONCE else run / "round-1" / stage
            assert (folder / out).exists()
    # a completed training stage keeps its final model only: no checkpoints with optimizer states
    for stage in ("sft", "dpo", "reward_training"):
        folder = run / "round-1" / stage
        assert (folder / "model" / "model.safetensors").is_file() and not (folder / "trainer").exists()
        assert manifest(run, stage)["stats"]["checkpoints_kept"] is False
    status = align("status", "--recipe", str(recipe)).stdout
    size = sum(f.stat().st_size for f in (run / "round-1").rglob("*") if f.is_file())
    assert status.splitlines()[1].endswith("disk") and status.splitlines()[2].endswith(f"{size / 2**30:.2f} GiB")
    # one request per prompt asks for all K samples (n=K)
    assert manifest(run, "generate")["rows"] == {"prompts": 24, "requests": 24, "samples": 72}
    samples = [json.loads(x) for x in (run / "round-1/generate/samples.jsonl").read_text().splitlines()]
    assert {(s["prompt_id"], s["sample_index"]) for s in samples} == {
        (s["prompt_id"], k) for s in samples for k in range(3)}
    assert all(s["sampling"]["temperature"] == 1.0 and s["finish_reason"] in ("stop", "length") for s in samples)
    scores = [json.loads(x) for x in (run / "round-1/score/scores.jsonl").read_text().splitlines()]
    assert all(set(s["scores"]) == {"arithmetic", "reward_model"} for s in scores)
    sel = manifest(run, "select")
    # every prompt is accounted for: an SFT row, or one counted reason for having none (an untrained teacher often
    # hits the token limit, and its rows repeat each other)
    prompt_drops = {k: v for k, v in sel["stats"]["dropped"].items() if k.startswith(("prompt_", "sft_"))}
    assert sel["rows"]["sft"] + sum(prompt_drops.values()) == 24, prompt_drops
    assert sel["rows"]["sft"] > 0 and 0 < sel["rows"]["pairs"] <= 24
    # `align stats` reads the same manifests back to the user
    stats = align("stats", "1", "--recipe", str(recipe)).stdout
    assert f"{sel['rows']['sft']} SFT rows and {sel['rows']['pairs']} pairs (best_vs_worst) from 24 prompts" in stats
    for reason, n in sel["stats"]["dropped"].items():
        assert f"dropped {reason}" in stats and stats.split(f"dropped {reason}")[1].split()[0] == str(n)
    # the dialogs: every SFT row of select goes on to turn 2, every turn-2 row to turn 3 (each prompt has two
    # follow-ups); a turn whose samples the filters drop ends its dialog. SFT trains the later turns too
    d = manifest(run, "dialogs")
    turns = d["stats"]["per_turn"]
    assert d["rows"]["dialogs"] == sel["rows"]["sft"] == turns["2"]["dialogs"] and set(turns) == {"2", "3"}
    assert turns["3"]["dialogs"] == turns["2"]["sft"] and d["rows"]["sft"] == turns["2"]["sft"] + turns["3"]["sft"] > 0
    later = [json.loads(x) for x in (run / "round-1/dialogs/sft.jsonl").read_text().splitlines()]
    assert all(len(r["prompt"]) == 2 * r["turn"] - 1 and r["prompt_id"].endswith(f"#turn-{r['turn']}") for r in later)
    assert manifest(run, "sft")["stats"]["sources"]["round 1 dialogs"]["rows"] == d["rows"]["sft"]
    rm = manifest(run, "reward_training")
    rm_line = stats.split("\nreward_training: ")[1].split("\n")[0]
    assert f"train_pairs {rm['rows']['train_pairs']}" in rm_line and f"held_out_pairs {rm['rows']['held_out_pairs']}" \
        in rm_line
    for stage in STAGES[2:]:  # every stage of the round, from the table, with its rows
        assert f"\n{stage}: " in stats
    assert sel["stats"]["dropped"].get("sample_hit_token_limit", 0) == manifest(run, "generate")["stats"][
        "hit_token_limit"]
    # DPO's log-probabilities per step: at the first step the policy is still the reference (the SFT model)
    first = manifest(run, "dpo")["stats"]["log_probs"][0]
    assert first["step"] == 1 and first["policy_chosen"] == pytest.approx(first["ref_chosen"], abs=1e-3)
    # upstream paths come from upstream manifests, and identities chain through fingerprints
    assert manifest(run, "dpo")["inputs"]["model"]["hash"] == manifest(run, "sft")["fingerprint"] + ":model"
    metrics = json.loads((run / "round-1/eval/metrics.json").read_text())
    assert set(metrics) == {"input", "sft", "dpo"}
    for m in metrics.values():
        assert 0.0 <= m["accuracy"] <= 1.0 and isinstance(m["mean_reward"], float) and m["num_prompts"] == 16
        assert 0.0 <= m["pass@1"] <= m["pass@4"] <= 1.0 and 0.0 <= m["win_rate_vs_input"] <= 1.0
        assert 0.0 <= m["lm_eval/arithmetic_local/exact_match,final_answer"] <= 1.0
        assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]  # Wilson holds its point estimate
        assert all(len(m[f"{k}_ci"]) == 2 for k in ("mean_reward", "pass@1", "pass@4", "win_rate_vs_input"))
    assert metrics["input"]["win_rate_vs_input"] == 0.5 and metrics["input"]["length_drift_vs_input"] == 0.0
    assert metrics["input"]["win_rate_vs_input_ci"] == [0.5, 0.5]  # against itself every prompt ties
    answers = [json.loads(line) for line in (run / "round-1/eval/answers.jsonl").read_text().splitlines()]
    assert all(r["num_samples"] == 8 and 0 <= r["num_correct"] <= 8 for r in answers)  # for pass@k in the gate


@pytest.mark.parametrize("stage,start", [("sft", "bootstrap/student"), ("dpo", "round-1/sft/model")])
def test_training_changes_every_trainable_parameter(round1, stage, start):
    _, run, _ = round1
    before = load_file(run / start / "model.safetensors")
    after = load_file(run / "round-1" / stage / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


def test_rerunning_a_complete_round_rewrites_nothing(round1):
    recipe, run, _ = round1
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = align("round", "1", "--recipe", str(recipe))
    assert ran(proc) == [] and proc.stdout.count("up to date") == len(STAGES)
    # (the run folder's lock file names its latest holder: the one file a run always writes)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: t for p, t in before.items() if p.name != ".lock"}


def copy_run(round1, tmp_path) -> tuple[Path, Path]:
    recipe, run, _ = round1
    shutil.copytree(run, tmp_path / "runs" / "e2e")
    r = yaml.safe_load(recipe.read_text())
    r["runs_dir"] = str(tmp_path / "runs")
    copy = tmp_path / "e2e.yaml"
    copy.write_text(yaml.safe_dump(r))
    return copy, tmp_path / "runs" / "e2e"


def test_a_changed_section_reruns_that_stage_and_what_depends_on_it(round1, tmp_path):
    recipe, run = copy_run(round1, tmp_path)
    gen_before = manifest(run, "generate")
    # (which keys make which stages stale, key by key: tests/test_stage_table.py, without running anything)
    # (and DPO on the SFT model's own samples: the policy_pairs stage joins the round, between sft and dpo)
    changes = ["dpo.beta=0.2", "sft.learning_rate=5e-4", "dpo.pairs_from=policy"]
    proc = align("round", "1", "--recipe", str(recipe), *changes)
    assert ran(proc) == ["sft", "policy_pairs", "dpo", "eval", "promote"]
    assert manifest(run, "dpo")["overrides"] == changes
    assert manifest(run, "generate") == gen_before
    policy = manifest(run, "policy_pairs")
    assert manifest(run, "dpo")["inputs"]["pairs"]["path"] == str(run / "round-1/policy_pairs/select/pairs.jsonl")
    assert policy["rows"]["samples"] == NUM_PROMPTS * 3 and policy["rows"]["pairs"] > 0


def test_a_resumed_stage_drops_the_writes_its_kill_cut_short(round1, tmp_path):
    """A kill between write_json_atomic's write and its rename leaves a temporary file; the run that resumes the
    stage (same fingerprint: its folder is kept) removes it, so the folder holds only what a complete run writes."""
    recipe, run = copy_run(round1, tmp_path)
    promote = run / "round-1/promote"
    (promote / "manifest.json").unlink()
    (promote / ".decision.json.tmp-12345").write_text('{"promoted": "sf')
    proc = align("round", "1", "--recipe", str(recipe))
    assert ran(proc) == ["promote"] and "promote: running (resuming an interrupted run)" in proc.stdout
    assert sorted(p.name for p in promote.iterdir()) == sorted(p.name for p in (round1[1] / "round-1/promote").iterdir())


def test_round_two_before_round_one_is_a_clear_error(round1, tmp_path):
    recipe, _, _ = round1
    proc = align("round", "2", "--recipe", str(recipe), f"runs_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "round 2 starts from the model round 1 promoted" in proc.stderr and "make round N=1" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_promotion_decides_the_next_rounds_start_and_force_is_recorded(round1, tmp_path):
    recipe, run = copy_run(round1, tmp_path)
    decision = json.loads((run / "round-1/promote/decision.json").read_text())
    metrics = json.loads((run / "round-1/eval/metrics.json").read_text())
    # tolerance 0: a candidate not below the input passes (and cannot be significantly worse); the better of two
    # is promoted unless they are within noise of each other, when the recipe's order (dpo first) decides
    passed = [n for n in ("dpo", "sft") if metrics[n]["accuracy"] >= metrics["input"]["accuracy"]]
    assert decision["eligible"] == passed and not decision["forced"]
    best = max(passed, key=lambda n: metrics[n]["accuracy"]) if passed else "input"
    head_to_head = [c for c in decision["comparisons"] if c["against"] != "input"]
    assert decision["promoted"] == (passed[0] if head_to_head and head_to_head[0]["p_value"] >= 0.05 else best)
    assert all(len(c["ci"]) == 2 and 0 <= c["p_value"] <= 1 for c in decision["comparisons"])
    proc = align("eval", "1", "--recipe", str(recipe), "--force", "sft")
    assert ran(proc) == ["promote"] and "promoted: sft (forced)" in proc.stdout
    m = manifest(run, "promote")
    assert m["overrides"] == ["gate.force=sft"] and m["stats"]["promoted"] == "sft" and m["stats"]["forced"]
    # the best model so far (gate.best_so_far: not_worse): the promoted sft, unless McNemar's exact test finds it
    # significantly worse than the teacher (evaluated once) on the same prompts; worked out here from the answers
    right = lambda path, model: {a["prompt_id"]: a["verified"] for a in map(json.loads, path.read_text().splitlines())  # noqa
                                 if a["model"] == model}
    teacher, sft = right(run / "teacher_eval/answers.jsonl", "teacher"), right(run / "round-1/eval/answers.jsonl", "sft")
    only_t, only_s = sum(teacher[i] and not sft[i] for i in sft), sum(sft[i] and not teacher[i] for i in sft)
    n, k = only_t + only_s, min(only_t, only_s)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    worse = only_t > only_s and p < 0.05
    assert m["stats"]["best_so_far"]["name"] == ("teacher" if worse else "round 1 sft")
    assert f"best so far: {m['stats']['best_so_far']['name']}" in proc.stdout and "\n| teacher |" in proc.stdout
    assert Path(m["outputs"]["model"]) == Path("../sft/model")


def test_eval_of_a_missing_round_or_checkpoint_names_what_is_missing(round1, tmp_path):
    recipe, run = copy_run(round1, tmp_path)
    proc = align("eval", "3", "--recipe", str(recipe), check=False)
    assert proc.returncode == 2 and "round 3 does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (run / "round-1/dpo/manifest.json").unlink()  # a checkpoint folder without its manifest is incomplete
    proc = align("eval", "1", "--recipe", str(recipe), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{run / 'round-1' / 'dpo'} has no manifest.json" in proc.stderr


def test_every_command_of_the_readme_and_docs_runs(round1, tmp_path):
    """Each command of a ```bash block, in page order, against a copy of the round (round 1 itself was the
    fixture's README line); only `make test` is skipped, so a new documented command cannot go untested."""
    recipe, _ = copy_run(round1, tmp_path)
    documented = [c for _, c in readme_commands.commands()]
    done, times = {readme_commands.ROUND1}, []
    for where, command in readme_commands.commands():
        if command in done or command in readme_commands.SKIPPED:
            continue
        start = time.time()
        proc = readme_commands.run(command, recipe)
        times.append(f"{time.time() - start:6.1f} s  {command}")
        assert proc.returncode == 0, f"{where}: `{command}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{where}: {command}"
        done.add(command)
    print("\n".join(times))
    assert set(documented) - done == readme_commands.SKIPPED


# What the moved-and-killed round may write differently, and why; everything else of every stage folder must be
# the same bytes. A manifest is compared less these keys (the rest: config, fingerprint, inputs' hashes, rows,
# statistics), and a trainer's log history less its timings.
NOT_COMPARED = {
    "job.json": "names the run folder and the recipe file by their absolute paths",
    "training_args.bin": "the Trainer's pickled arguments name the absolute output folder",
    "events.out.tfevents.*": "TensorBoard's name and records carry the wall-clock time and the process id",
    "*shards/part-*.jsonl": "a stage killed and run again writes a new part (dialogs: per turn, in turn-<t>/generate/"
                            "): compared as records by request_id",
}
# and within files: promote's decision names the promoted model by its absolute path (compared less it), and a
# manifest's output outside the run folder (promote's best model so far: the recipe's teacher) by a path relative
# to the stage folder (compared as the folder it names)
MANIFEST_VOLATILE = {"wall_time_s": "wall time", "finished_at": "wall-clock time", "recipe_file": "absolute path"}
STATS_VOLATILE = {  # stage statistics that measure this run, not its data
    "backend_start_seconds", "backend_stop_seconds", "generate_seconds", "output_tokens_per_second",
    "requests_sent", "requests_resumed_from_shards",  # a resumed stage sends only what its shards lack
    "resumed_from_step",  # a resumed trainer's checkpoint
}
LOG_VOLATILE = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


def comparable(path: Path, run: Path):
    """A file as the comparison sees it: bytes, or JSON less what measures the run rather than its data."""
    if path.name == "manifest.json":
        m = json.loads(path.read_text())
        for k in MANIFEST_VOLATILE:
            m.pop(k)
        m["inputs"] = {k: [{**x, "path": None} for x in v] if isinstance(v, list) else {**v, "path": None}
                       for k, v in m["inputs"].items()}  # the path differs; its hash must not
        m["stats"] = {k: v for k, v in m["stats"].items() if k not in STATS_VOLATILE}
        outside = lambda out: not Path(os.path.normpath(path.parent / out)).is_relative_to(run)  # noqa: E731
        m["outputs"] = {k: os.path.normpath(path.parent / out) if outside(out) else out
                        for k, out in m["outputs"].items()}
        return m
    if path.name == "decision.json":
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "model_path"}
    if path.name == "log_history.json":
        return [{k: v for k, v in row.items() if k not in LOG_VOLATILE} for row in json.loads(path.read_text())]
    return path.read_bytes()


def stage_files(run: Path) -> dict[str, object]:
    """Every file of every stage folder of round 1 and of teacher_eval, by its path within the run, comparable
    (less NOT_COMPARED); the shards of each folder as one record per request: the sampled answers themselves."""
    out = {}
    for stage in [run / "teacher_eval", *sorted((run / "round-1").iterdir())]:
        for f in sorted(stage.rglob("*")):
            rel = f.relative_to(stage).as_posix()
            if f.is_dir() and f.name == "shards":
                out[f"{stage.name}/{rel}"] = load_shards(f)
            elif f.is_file() and not any(fnmatch(rel, pat) or fnmatch(f.name, pat) for pat in NOT_COMPARED):
                out[f"{stage.name}/{rel}"] = comparable(f, run)
    return out


def test_a_round_moved_elsewhere_and_killed_anywhere_makes_the_same_data(round1, tmp_path):
    """Seeds come from requests' content and models' identities, never from paths, and a stage killed anywhere
    leaves nothing that a later run takes for complete. The same round, from a copy of its inputs (the bootstrap)
    in another runs folder and working directory, killed with SIGKILL at KILLS random points across its stages
    (every stage at least once, inside it) and run again each time, writes the same bytes as the uninterrupted
    run: every file of every stage, less NOT_COMPARED, and the sampled answers themselves; three of the runs start
    their stages fresh, the others fork them (alignment/prefork.py). The points are kept in kills.json."""
    recipe, run, _ = round1
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(run / "bootstrap", moved / "e2e" / "bootstrap")
    r = yaml.safe_load(recipe.read_text())
    r["runs_dir"] = str(moved)  # all else is the same configuration: every path in it is absolute
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(r))
    # some runs start their stages as fresh processes, the others fork them from the stage server, as the
    # uninterrupted run did: both must write the same bytes (a recipe file, not an override: the manifests record
    # overrides, and launcher settings are no stage's configuration)
    (tmp_path / "moved-fresh.yaml").write_text(yaml.safe_dump({**r, "launcher": {**r.get("launcher", {}),
                                                                                "prefork": False}}))
    (tmp_path / "cwd").mkdir()
    args = lambda fresh: [sys.executable, "-m", "alignment.cli", "round", "1", "--recipe",  # noqa: E731
                          str(tmp_path / ("moved-fresh.yaml" if fresh else "moved.yaml"))]
    folder = lambda s: moved / "e2e" / (s if s in ONCE else f"round-1/{s}")  # noqa: E731
    finished = lambda: {s for s in STAGES if (folder(s) / "manifest.json").exists()}  # noqa: E731
    running = lambda: [s for s in STAGES if (folder(s) / "job.json").exists()  # noqa: E731
                       and not (folder(s) / "manifest.json").exists()]
    # how long each stage took in the uninterrupted run, from its job file to its manifest (start-up included)
    reference = {s: (folder_of(run, s) / "manifest.json").stat().st_mtime - (folder_of(run, s) / "job.json").stat(
        ).st_mtime for s in STAGES[1:]}
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    points = []

    def kill_in(target: str, share: float) -> None:
        """Run the round until `target` is running (or done), wait up to `share` of its usual time, and SIGKILL the
        whole process group; record which stage the kill left incomplete."""
        fresh = len(points) % 4 == 1  # runs 1, 5 and 9: a fresh start-up costs seconds a stage
        before = finished()
        proc = subprocess.Popen(args(fresh), cwd=tmp_path / "cwd", stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while (target not in running() and not (folder(target) / "manifest.json").exists() and proc.poll() is None
               and time.time() < deadline):
            time.sleep(0.02)
        delay = rng.uniform(0.0, share) * reference[target]
        time.sleep(delay)
        with suppress(ProcessLookupError):  # the round may have ended in the meantime: "(finished)"
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # what the kill cut short: the stage with a job but no manifest (one that ended first has its manifest)
        killed_in = running() or (["(finished)"] if proc.returncode == 0 else ["(between stages)"])
        points.append({"target": target, "after_s": round(delay, 2), "killed_in": killed_in,
                       "stages": "fresh" if fresh else "forked", "completed": sorted(finished() - before)})

    # every stage of the round once, early enough to land inside it even if it runs three times faster than it
    # did (a stage that ended first is done, and cannot be killed again: a load that drops between the two runs
    # made 0.6 of its time miss one); the rest at random, up to a little past the stage's usual end (a kill while
    # it writes its manifest, or between stages)
    extra = rng.choices(STAGES[1:], k=KILLS - len(STAGES[1:]))
    for target in STAGES[1:]:
        kill_in(target, 0.3)
        for _ in range(extra.count(target)):
            kill_in(target, 1.2)
    (moved / "kills.json").write_text(json.dumps(points, indent=1))
    proc = subprocess.run(args(False), cwd=tmp_path / "cwd", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hit = {p["killed_in"][0] for p in points}
    assert len(points) == KILLS and set(STAGES[1:]) <= hit, (sorted(set(STAGES[1:]) - hit), points)
    assert {p["stages"] for p in points if p["completed"]} == {"fresh", "forked"}, points  # both kinds wrote some

    ours, theirs = stage_files(moved / "e2e"), stage_files(run)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], (name, points)
    # what the comparison saw: sampled answers, some of them right, that change with the seed
    generated = [json.loads(line) for line in (run / "round-1/score/scores.jsonl").read_text().splitlines()]
    assert 0 < sum(s["scores"]["arithmetic"] == 1.0 for s in generated) < len(generated)
    teacher = json.loads((run / "teacher_eval/metrics.json").read_text())["teacher"]
    assert 0 < teacher["accuracy"] < 1 and teacher["pass@4"] > 0
    eval_samples = theirs["eval/shards"]
    assert any(len({c[0] for c in rec["completions"]}) > 1 for rec in eval_samples.values())
    for model in ("sft", "dpo", "reward_training"):  # training is deterministic on CPU (and so are the bytes above)
        a, b = (load_file(r / f"round-1/{model}/model/model.safetensors") for r in (run, moved / "e2e"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
