"""Why DPO undoes SFT from round 3 on: a sweep of DPO settings on one finished round's SFT model and pairs.

Each variant trains DPO from the round's SFT model through the dpo stage's own code, then is evaluated greedily on
the held-out prompts exactly as the eval stage does. Held-out accuracy is compared with the SFT model's on the
same prompts (McNemar's exact test), and the DPO statistics show where probability went: the change of the
chosen and rejected responses' log-probabilities under the policy against the reference (the SFT model).
"own pairs" variants draw the pairs from the SFT model's own samples (the policy_pairs stage, as `dpo.pairs_from:
policy` does) instead of the teacher's.

    make round N=3 ARGS="runs_dir=runs/sweep"      # the rounds to sweep on
    .venv/bin/python bench/dpo_sweep.py --runs runs/sweep --round 3 [--out runs/sweep/dpo-sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.config import load_recipe  # noqa: E402
from alignment.manifest import read_manifest  # noqa: E402
from alignment.prompts import read_prompts  # noqa: E402
from alignment.stage_table import StageConfig, stage_config  # noqa: E402
from alignment.stages import dpo, policy_pairs  # noqa: E402
from alignment.stages.eval import evaluate  # noqa: E402
from alignment.stages.promote import compare  # noqa: E402

VARIANTS = {  # name -> (overrides, pairs: "teacher" or "own")
    "as shipped": ([], "teacher"),
    "beta 0.5": (["dpo.beta=0.5"], "teacher"),
    "beta 0.02": (["dpo.beta=0.02"], "teacher"),
    "lr 5e-5": (["dpo.learning_rate=5.0e-5"], "teacher"),
    "lr 1e-3": (["dpo.learning_rate=1.0e-3"], "teacher"),
    "2 epochs": (["dpo.num_train_epochs=2"], "teacher"),
    "NLL weight 0 (pure DPO)": (["dpo.loss_type=[sigmoid]", "dpo.loss_weights=[1.0]"], "teacher"),
    "NLL weight 0.2 (Llama 3)": (["dpo.loss_weights=[1.0, 0.2]"], "teacher"),
    "NLL weight 5": (["dpo.loss_weights=[1.0, 5.0]"], "teacher"),
    "own pairs": ([], "own"),
    "own pairs, lr 5e-5": (["dpo.learning_rate=5.0e-5"], "own"),
}


def output(run: Path, round_n: int, stage: str, name: str) -> Path:
    m = read_manifest(run / f"round-{round_n}" / stage)
    if m is None:
        sys.exit(f"{run / f'round-{round_n}' / stage} has no manifest: run `make round N={round_n}` there first")
    return (run / f"round-{round_n}" / stage / m["outputs"][name]).resolve()


def cfg(recipe, stage: str) -> StageConfig:
    return StageConfig(stage, stage_config(recipe, stage))


def own_pairs(recipe, sft_model: Path, out: Path, round_n: int) -> Path:
    """Pairs from the SFT model's own samples on the round's prompts: the policy_pairs stage's (dpo.pairs_from:
    policy), sampled, scored and selected as the round selected its pairs."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "done").exists():
        policy_pairs.run(cfg(recipe, "policy_pairs"), {"policy": sft_model, "prompts": recipe.prompts.train_path},
                         out, round_n)
        (out / "done").touch()
    return out / "select/pairs.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny.yaml")
    ap.add_argument("--runs", type=Path, required=True, help="the runs_dir of the finished rounds")
    ap.add_argument("--round", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args, overrides = ap.parse_known_args()
    base = [f"runs_dir={args.runs}", "eval.num_samples=0", *overrides]  # greedy accuracy is what DPO undid
    recipe = load_recipe(args.recipe, base)
    run = args.runs / recipe.name
    out = args.out or run / f"dpo-sweep-round-{args.round}"
    sft_model = output(run, args.round, "sft", "model")
    pairs = {"teacher": output(run, args.round, "select", "pairs")}
    prompts = read_prompts(recipe.prompts.eval_path)[:recipe.eval.num_prompts]
    answers_dir = out / "eval"  # answer shards keyed by request (content and model): any model's may share it
    answers_dir.mkdir(parents=True, exist_ok=True)
    metrics, answers = evaluate(cfg(recipe, "eval"), {"sft": sft_model}, prompts, answers_dir, None)
    sft_metrics, sft_outcomes = metrics["sft"], {a["prompt_id"]: float(a["verified"]) for a in answers["sft"]}
    rows = []
    for name, (variant, source) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        if source not in pairs:
            pairs[source] = own_pairs(recipe, sft_model, out / "own", args.round)
        r = load_recipe(args.recipe, base + variant)
        folder = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        folder.mkdir(parents=True, exist_ok=True)
        start = time.time()
        result = dpo.run(cfg(r, "dpo"), {"model": sft_model, "pairs": pairs[source]}, folder, args.round)
        metrics, answers = evaluate(cfg(r, "eval"), {name: folder / "model"}, prompts, answers_dir, None)
        m = metrics[name]
        c = compare({a["prompt_id"]: float(a["verified"]) for a in answers[name]}, sft_outcomes, "accuracy")
        last = result.stats["log_probs"][-1]
        rows.append({"variant": name, "pairs": result.rows["pairs"], "accuracy": m["accuracy"],
                     "accuracy_ci": m["accuracy_ci"], "vs_sft": c["difference"], "vs_sft_ci": c["ci"], "p": c["p_value"],
                     "chosen_shift": last["policy_chosen"] - last["ref_chosen"],
                     "rejected_shift": last["policy_rejected"] - last["ref_rejected"],
                     "pair_accuracy": result.stats.get("last_rewards/accuracies"), "seconds": round(time.time() - start)})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"DPO from round {args.round}'s SFT model (held-out accuracy {sft_metrics['accuracy']:.3f} "
             f"[{sft_metrics['accuracy_ci'][0]:.3f}, {sft_metrics['accuracy_ci'][1]:.3f}]), {len(prompts)} held-out "
             "prompts, greedy.", "",
             "| variant | pairs | accuracy [95%] | vs SFT [95%], McNemar p | chosen log p - ref (last step) | "
             "rejected log p - ref | train pair acc | s |", "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        acc = "-" if x["pair_accuracy"] is None else f"{x['pair_accuracy']:.2f}"
        lines.append(f"| {x['variant']} | {x['pairs']} | {x['accuracy']:.3f} [{x['accuracy_ci'][0]:.3f}, "
                     f"{x['accuracy_ci'][1]:.3f}] | {x['vs_sft']:+.3f} [{x['vs_sft_ci'][0]:+.3f}, "
                     f"{x['vs_sft_ci'][1]:+.3f}], p={x['p']:.2g} | {x['chosen_shift']:+.2f} | "
                     f"{x['rejected_shift']:+.2f} | {acc} | {x['seconds']} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps({"sft": sft_metrics, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
