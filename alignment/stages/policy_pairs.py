"""On-policy preference pairs (`dpo.pairs_from: policy`): the round's SFT model answers the round's prompts.

Llama 3 chose its DPO data to match the policy being trained: pairs from the latest model's own samples, while the
teacher's best answers made the SFT data. This stage samples the SFT model K times on the same prompts generate drew
(same draw, same retried prompts), then scores and pairs those samples exactly as score and select do the teacher's;
DPO reads these pairs instead of select's.

The policy is served as eval serves the round's checkpoints (eval's backend and engine, else the teacher's), with
the recipe's sampling settings, and without the teacher's system prompts: the SFT model was trained, and will be
used, without them. The three steps write into sub-folders (generate/, score/, select/); generate's shards resume
after a kill. A judge, if the recipe has one, is still the teacher.
"""

from __future__ import annotations

from pathlib import Path

from alignment.stage_table import StageConfig, view
from alignment.stages import generate, score, select
from alignment.stages.eval import serving
from alignment.stages.result import StageResult


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    # the SFT model sampled by generate's code as its teacher, served as eval serves the round's checkpoints
    policy = config.teacher.model_copy(update={**serving(config).settings(), "system_prompts": {}})
    folders = {name: out_dir / name for name in ("generate", "score", "select")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    drawn = {"teacher": inputs["policy"], "prompts": inputs["prompts"],
             **({"failed_prompts": inputs["failed_prompts"]} if "failed_prompts" in inputs else {})}
    sampled = generate.run(view(config, "generate", teacher=policy), drawn, folders["generate"], round_n)
    samples = folders["generate"] / sampled.outputs["samples"]
    scored = score.run(view(config, "score"), {"samples": samples, "prompts": inputs["prompts"],
                                               **{k: inputs[k] for k in ("reward_model", "teacher") if k in inputs}},
                       folders["score"], round_n)
    scores = folders["score"] / scored.outputs["scores"]
    paired = select.run(view(config, "select"), {"samples": samples, "scores": scores, "prompts": inputs["prompts"]},
                        folders["select"], round_n)
    return StageResult(
        outputs={"pairs": f"select/{paired.outputs['pairs']}", "samples": f"generate/{sampled.outputs['samples']}",
                 "scores": f"score/{scored.outputs['scores']}"},
        rows={"prompts": sampled.rows["prompts"], "samples": sampled.rows["samples"], "pairs": paired.rows["pairs"]},
        stats={"policy": str(inputs["policy"]), "generate": sampled.stats, "score": scored.stats,
               "select": {**paired.stats, "rows": paired.rows}},
    )
