"""The config.json of the models the Llama 3.1 recipes name (the published values), written into a Hugging Face
cache folder so that the memory plan reads them offline as it would on a cluster's login node."""

import json
from pathlib import Path

LLAMA = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
             rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16",
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192})
SIZES = {  # hidden, MLP width, layers, heads (8 kv heads each)
    "8B": (4096, 14336, 32, 32), "70B": (8192, 28672, 80, 64), "405B": (16384, 53248, 126, 128)}


def llama(size: str, **extra) -> dict:
    h, i, layers, heads = SIZES[size]
    return {**LLAMA, "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8, **extra}


CONFIGS = {
    "meta-llama/Llama-3.1-8B": llama("8B"),
    "meta-llama/Llama-3.1-70B": llama("70B"),
    "meta-llama/Llama-3.1-405B-Instruct-FP8": llama("405B", quantization_config={
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}),
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": llama("8B", architectures=["LlamaForSequenceClassification"],
                                                      num_labels=1),
}


def write_hub_cache(cache: Path) -> Path:
    """`cache` laid out as huggingface_hub's: models--org--name/{refs/main, snapshots/<commit>/config.json}."""
    for name, config in CONFIGS.items():
        folder = cache / f"models--{name.replace('/', '--')}"
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(config))
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text("0" * 40)
    return cache


def write_snapshot(cache: Path, repo_type: str, repo_id: str, commit: str, files: dict[str, bytes | str],
                   main: bool = True) -> Path:
    """One commit of a repo in a Hub cache laid out as huggingface_hub writes it ({models,datasets}--org--name/
    snapshots/<commit>/..., refs/main naming the commit when `main`); returns the snapshot folder."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for name, content in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snap
