"""The memory plan against measured peaks (the H100 runs in bench/results, a CPU run here), its numbers for the
Llama 3.1 recipes worked out by hand, and the refusal before any work of a stage that cannot fit."""

import json
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from alignment.cli import main as align
from alignment.config import InputError, load_recipe
from alignment.memory_plan import GIB, USABLE, check_plan, plan, shape_of, train_bytes
from hub_configs import CONFIGS, write_hub_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The recipes' models in a Hub cache, read offline as on a login node."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(write_hub_cache(tmp_path / "hub")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def llama_params(c: dict) -> int:
    """Llama's parameters from its published config: embeddings and lm_head, per layer q, k, v, o, the three MLP
    matrices and two norms, and the final norm."""
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * c["vocab_size"] * h + c["num_hidden_layers"] * layer + h


# --- measured peaks ------------------------------------------------------------------------------------------


def h100_cases():
    for path in sorted((ROOT / "bench/results").glob("h100-*.json")):
        saved = json.loads(path.read_text())
        for name, result in saved["results"].items():
            yield pytest.param(saved["settings"], name, result, id=f"{path.stem}:{name}")


@pytest.mark.parametrize("settings,name,result", list(h100_cases()))
def test_estimate_matches_the_h100_peaks(settings, name, result):
    """bench/train_throughput.py --model 1b on an H100: torch's peak allocated memory of each case. Packed SFT rows
    are max_length long; padded batches (SFT, DPO pairs) are as long as their longest row, which sets the peak, so
    the estimate takes that row's length as max_length. 0.96 to 1.08 of the peak (at two decimals) in every case,
    the band alignment/memory_plan.py states: the plan keeps 10% of a GPU spare (USABLE), and it errs on the safe
    side where kernels keep less (flex_attention: +6%). A states term 12% off (17.92 or 14.08 bytes a parameter
    instead of 16) fails 5 or 3 of the 12 cases."""
    from alignment.chat import build_tokenizer, token_ids
    from alignment.tiny_models import llama_config
    from train_throughput import LORA, MODELS, skewed_rows

    spec, stage = MODELS[settings["model"]], name.split()[0]
    tok = build_tokenizer()
    if "packed" in name:
        length, batch = spec["max_length"], spec["packed_batch"]
    else:
        rows = skewed_rows(spec["sft_rows"] if stage == "sft" else spec["dpo_pairs"])
        keys = ("completion",) if stage == "sft" else ("chosen", "rejected")
        length = max(len(token_ids(tok, r["prompt"] + r[k])) for r in rows for k in keys)
        batch = spec["dpo_batch"] if stage == "dpo" else spec["padded_batch"]
    overrides = [f"{stage}.max_length={length}", f"{stage}.per_device_train_batch_size={batch}",
                 f"{stage}.gradient_checkpointing={str(settings['gradient_checkpointing'] == 'on').lower()}"]
    if "lora" in name:
        overrides.append(f"{stage}.lora={LORA}")
    cfg = getattr(load_recipe(ROOT / "recipes/tiny.yaml", overrides), stage)
    shape = shape_of(llama_config(tok, **spec["shape"]))
    estimate = sum(train_bytes(shape, cfg, 1, loss=stage, pairs=stage == "dpo",
                               reference=stage == "dpo" and "every step" in name).values()) / GIB
    ratio = estimate / result["peak_gpu_gib"]
    assert 0.96 <= round(ratio, 2) <= 1.08, (estimate, result["peak_gpu_gib"], ratio)


def test_the_reference_model_costs_four_bytes_per_parameter_on_the_h100():
    """DPO with the reference model at every step against precomputed log-probs: the difference is one fp32 copy
    of the 1B Llama (tied embeddings: V x h once; per layer 4h^2 + 3hi + 2h; the final norm h)."""
    from train_throughput import MODELS

    from alignment.chat import build_tokenizer

    runs = json.loads((ROOT / "bench/results/h100-1b.json").read_text())["results"]
    extra = runs["dpo every step"]["peak_gpu_gib"] - runs["dpo precomputed"]["peak_gpu_gib"]
    shape = MODELS["1b"]["shape"]
    h, i = shape["hidden_size"], shape["intermediate_size"]
    params = len(build_tokenizer()) * h + shape["num_hidden_layers"] * (4 * h * h + 3 * h * i + 2 * h) + h
    assert extra == pytest.approx(4 * params / GIB, rel=0.01)


def saved_by_autograd(model, ids) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one training forward (parameters
    aside): the activations, counted exactly rather than read from a noisy process peak."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_activations_match_what_autograd_keeps_on_cpu(attn):
    """A Llama of 4 layers (hidden 256, MLP 1024, 4 heads) in fp32 on this CPU, 2 rows of 128 tokens: per token and
    layer autograd keeps 44h + 16i bytes (less 4h on the CPU, where the attention output is copied before o_proj
    rather than kept by a fused kernel), eager attention also its probabilities (4 heads x 128 x 4 bytes); with
    gradient checkpointing only each layer's fp32 input (4h). Besides the layers: the final norm, the logits and
    log-softmax of a 105-token vocabulary. Within 1% (2% with checkpointing, where the total is small)."""
    import torch

    from alignment.chat import build_tokenizer
    from alignment.tiny_models import random_llama

    torch.set_num_threads(1)
    h, i, layers, heads, rows, seq = 256, 1024, 4, 4, 2, 128
    model = random_llama(build_tokenizer(), seed=0, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                         num_attention_heads=heads)
    model.set_attn_implementation(attn)
    ids = torch.randint(0, 100, (rows, seq))
    cfg = load_recipe(ROOT / "recipes/tiny.yaml", [f"sft.max_length={seq}", f"sft.per_device_train_batch_size={rows}",
                                                   f"sft.attn_implementation={attn}", "sft.gradient_checkpointing=false"]).sft
    s = shape_of(model.config)
    estimate = train_bytes(s, cfg, 1, gpu=False, loss=None)["activations"]
    by_hand = rows * seq * layers * (44 * h + 16 * i + (4 * heads * seq if attn == "eager" else 0))
    assert estimate == by_hand
    rest = rows * seq * (8 * h + 8 * s.vocab)  # the final norm's two fp32 tensors, the logits and log-softmax
    measured = saved_by_autograd(model.train(), ids)
    assert measured == pytest.approx(by_hand - rows * seq * layers * 4 * h + rest, rel=0.01)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    rope = rows * seq * (h // heads) * 4 * 2  # the rotary cos and sin every checkpointed layer is handed
    assert saved_by_autograd(model, ids) == pytest.approx(rows * seq * layers * 4 * h + rest + rope, rel=0.02)


# --- the Llama 3.1 recipes -----------------------------------------------------------------------------------


def test_the_70b_recipe_on_one_node_is_refused_naming_the_key(hub):
    """70B full fine-tuning: 16 bytes x 70.6B parameters = 1.1 TB of weights, gradients and Adam, 141 GB per GPU
    over one node's 8: more than an 80 GB GPU holds."""
    recipe = load_recipe(ROOT / "recipes/llama3.1-70b.yaml", ["launcher.train.nodes=1"])
    params = llama_params(CONFIGS["meta-llama/Llama-3.1-70B"])
    assert params == pytest.approx(70.6e9, rel=0.001)
    sft = next(r for r in plan(recipe) if r.stage == "sft")
    assert sft.holds["weights, gradients, Adam"] == 16 * params / 8
    assert not sft.ok and sft.capacity == USABLE * 80 * GIB
    with pytest.raises(InputError) as e:
        check_plan(recipe)
    msg = str(e.value)
    assert f"sft: needs ~{sft.need / GIB:.1f} GiB per GPU" in msg and f"has {USABLE * 80:.1f} GiB" in msg
    assert "launcher.train.nodes" in msg and "sft.cpu_offload: true" in msg and "sft.lora" in msg


def test_the_shipped_70b_recipe_fits_over_eight_nodes(hub):
    recipe = load_recipe(ROOT / "recipes/llama3.1-70b.yaml")
    check_plan(recipe)  # no stage refused
    c = CONFIGS["meta-llama/Llama-3.1-70B"]
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    rows = {r.stage: r for r in plan(recipe)}
    dpo, tokens = rows["dpo"], 2 * 8192  # a chosen and a rejected row of max_length, one pair per micro-batch
    assert dpo.holds["weights, gradients, Adam"] == 16 * llama_params(c) / 64
    # FSDP computes in bf16 (2-byte residual): each layer's input kept, one layer recomputed (26h + 8i bytes)
    assert dpo.holds["activations"] == tokens * (layers * 2 * h + 26 * h + 8 * i)
    assert dpo.holds["logits and loss"] == tokens * 4 * vocab
    assert dpo.need < dpo.capacity


def test_the_8b_recipe_fits_one_node(hub):
    recipe = load_recipe(ROOT / "recipes/llama3.1-8b.yaml")
    check_plan(recipe)
    rows = {r.stage: r for r in plan(recipe)}
    assert rows["sft"].holds["weights, gradients, Adam"] == 16 * llama_params(CONFIGS["meta-llama/Llama-3.1-8B"]) / 8
    # the 405B teacher in Meta's FP8 (the FFN in one byte, the rest bf16) over tensor_parallel_size 8
    c = CONFIGS["meta-llama/Llama-3.1-405B-Instruct-FP8"]
    ffn = c["num_hidden_layers"] * 3 * c["hidden_size"] * c["intermediate_size"]
    assert rows["generate"].holds["weights /8"] == (2 * llama_params(c) - ffn) / 8
    # and the plan says it cannot hold every sequence asked for: 256 requests x 20 samples at 8192 tokens
    assert "of the 5120 sequences asked for" in rows["generate"].hint


# The published shapes (config.json of meta-llama/Llama-3.1-405B and -8B on the Hub; Table 3 of the Llama 3 paper,
# arXiv 2407.21783): 405B: 126 layers, width 16384, FFN 53248, 128 heads of 128 over 8 KV heads; 8B: 32 layers,
# width 4096, FFN 14336, 32 heads of 128 over 8 KV heads; both a 128256-token vocabulary, untied embeddings.
# Parameters: 2 x vocab x width (embeddings, lm_head) + layers x (2 w^2 + 2 w x 1024 (k, v: 8 heads of 128)
# + 3 w x FFN + 2 w (norms)) + w (final norm):
P405 = 2 * 128256 * 16384 + 126 * (2 * 16384**2 + 2 * 16384 * 1024 + 3 * 16384 * 53248 + 2 * 16384) + 16384
P8 = 2 * 128256 * 4096 + 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
VLLM_ROOM = 0.9 * 80 * GIB  # gpu_memory_utilization 0.9 of an 80 GiB GPU, the recipe's engines and launcher


def rows_of(recipe, stage):
    return [r for r in plan(recipe) if r.stage == stage]


def test_teacher_eval_serves_the_405b_over_tensor_parallel_8(hub):
    """teacher_eval of the 8B recipe on the teacher's engine (tensor parallel 8, data parallel 1, fbgemm_fp8):
    405,853,388,800 parameters (the 405B of the paper's name); the FFN's 126 x 3 x 16384 x 53248 = 329.8B weights in
    one byte, the rest in bf16, a 1/8 slice per GPU: 60.24e9 bytes (56.1 GiB). KV per token per GPU: the 8 KV
    heads split 1 per GPU, K and V of 126 layers x 128 dims x 2 bytes = 64,512 bytes, x 8192 (max_model_len) =
    528,482,304 per sequence. Asked for at once: 256 requests (max_concurrency) x 4 samples (eval.num_samples) =
    1024; the cache holds floor((0.9 x 80 GiB - 60.24e9) / 528,482,304) = 32. On eval's engine (tensor parallel
    1) the whole 481.9e9 bytes would be on one GPU: the OOM this plan used to call a fit."""
    assert P405 == 405_853_388_800 == llama_params(CONFIGS["meta-llama/Llama-3.1-405B-Instruct-FP8"])
    rows = rows_of(load_recipe(ROOT / "recipes/llama3.1-8b.yaml"), "teacher_eval")
    serving, rm = rows[0], rows[-1]
    weights = (2 * P405 - 126 * 3 * 16384 * 53248) / 8
    assert weights == 60_241_727_488
    assert serving.holds == {"weights /8": weights, "KV of one max_model_len sequence": 528_482_304}
    assert serving.capacity == VLLM_ROOM and serving.ok
    assert serving.hint.startswith("teacher.engine: tensor_parallel_size 8 x data_parallel_size 1")
    assert "the cache holds 32 of the 1024 sequences" in serving.hint
    assert len(rows) == 2 and list(rm.holds) == ["reward model fp32 /8"]  # loaded once the engine has stopped
    # the teacher's engine split over 4 GPUs of 80 GiB: 120.5e9 bytes each, refused naming the key
    bad = load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["teacher.engine.tensor_parallel_size=4"])
    row = rows_of(bad, "teacher_eval")[0]
    assert row.holds["weights /4"] == 2 * weights and not row.ok and "teacher.engine" in row.key


def test_eval_replicates_the_8b_over_data_parallel_8(hub):
    """eval of the 8B recipe: tensor parallel 1, data parallel 8, bf16. Each of the 8 copies holds all
    8,030,261,248 parameters in 2 bytes: 16,060,522,496 bytes per GPU (data parallelism never divides weights).
    KV per token: 8 KV heads x 128 x 2 (K, V) x 32 layers x 2 bytes = 131,072, x 8192 = 1 GiB per sequence. Asked
    per copy: 256 x 4 / 8 = 128; the cache holds floor((0.9 x 80 GiB - 16.06e9) / 1 GiB) = 57."""
    assert P8 == 8_030_261_248 == llama_params(CONFIGS["meta-llama/Llama-3.1-8B"])
    serving = rows_of(load_recipe(ROOT / "recipes/llama3.1-8b.yaml"), "eval")[0]
    assert serving.holds == {"weights /1": 16_060_522_496, "KV of one max_model_len sequence": 2**30}
    assert serving.capacity == VLLM_ROOM and serving.ok
    assert "data_parallel_size 8; the cache holds 57 of the 128 sequences" in serving.hint
    # 8 copies need 8 GPUs: launcher.eval gives 4, refused before any work
    with pytest.raises(InputError, match="eval: .*tensor_parallel_size x data_parallel_size = 8 GPUs; "
                                         "launcher.eval gives 4"):
        check_plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["launcher.eval.gpus_per_node=4"]))
    check_plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["launcher.eval.gpus_per_node=4",
                                                               "eval.engine.data_parallel_size=4"]))


def test_a_cache_sized_in_bytes_is_planned_as_that_size(hub):
    """eval.engine.kv_cache_memory_bytes replaces the share: vLLM then holds the weights (16,060,522,496 bytes, as
    above) and a cache of exactly that size. 20 GiB holds floor(20 GiB / 1 GiB) = 20 sequences of 8192 tokens;
    half a GiB holds none, which vLLM refuses at start-up."""
    eight = ROOT / "recipes/llama3.1-8b.yaml"
    row = rows_of(load_recipe(eight, [f"eval.engine.kv_cache_memory_bytes={20 * 2**30}"]), "eval")[0]
    assert row.holds == {"weights /1": 16_060_522_496, "KV cache (kv_cache_memory_bytes)": 20 * 2**30}
    assert row.ok and "the cache holds 20 of the 128 sequences" in row.hint
    small = rows_of(load_recipe(eight, [f"eval.engine.kv_cache_memory_bytes={2**29}"]), "eval")[0]
    assert not small.ok and "holds no whole max_model_len sequence" in small.hint
    # weights and cache over 0.9 of the GPU: 16.06e9 + 60 GiB > 0.9 x 80 GiB
    big = rows_of(load_recipe(eight, [f"eval.engine.kv_cache_memory_bytes={60 * 2**30}"]), "eval")[0]
    assert big.need == 16_060_522_496 + 60 * 2**30 and not big.ok


def test_scoring_is_planned_on_the_gpus_it_is_launched_with(hub):
    """Score without a judge runs the reward model on launcher.eval's GPUs (the launcher's kind), so that is what
    its row divides by; with a judge it asks the teacher and runs as generate does."""
    gpus = ["launcher.generate.gpus_per_node=8", "launcher.eval.gpus_per_node=2"]
    c = CONFIGS["meta-llama/Llama-3.1-8B"]  # the reward model: no lm_head, a one-label head instead; fp32
    rm = 4 * (llama_params(c) - c["vocab_size"] * c["hidden_size"] + c["hidden_size"])
    row = next(r for r in plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", gpus)) if r.stage == "score")
    assert row.holds == {"reward model fp32 /2": rm / 2}
    judged = load_recipe(ROOT / "recipes/llama3.1-8b.yaml", [*gpus, "reward.judge={template: '{prompt} {response}'}"])
    rows = rows_of(judged, "score")  # the teacher's verdicts, then the reward model
    judge, rm = rows[0], rows[-1]
    assert list(judge.holds) == ["weights /8", "KV of one max_model_len sequence"]
    assert list(rm.holds) == ["reward model fp32 /8"]


def test_a_gguf_student_is_planned_from_the_config_inside_the_file():
    """recipes/smollm2-135m.yaml imports its student from a GGUF file, so there is no config.json to read before
    the import: the plan reads the file's own metadata. SmolLM2-135M (vocabulary 49152, width 576, 30 layers, MLP
    1536, 9 heads over 3 kv heads, tied embeddings) has 134,515,008 parameters by its published config."""
    pytest.importorskip("gguf")
    h, kv, i = 576, 576 // 9 * 3, 1536
    params = 49152 * h + 30 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert params == 134_515_008
    recipe = load_recipe(ROOT / "recipes/smollm2-135m.yaml", ["launcher.train.gpus_per_node=1",
                                                               "launcher.gpu_memory_gib=80"])
    rows = {r.stage: r for r in plan(recipe)}
    assert rows["sft"].holds["weights, gradients, Adam"] == 16 * params


TINY_BOOTSTRAP = ("bootstrap={task: arithmetic, hidden_size: 64, intermediate_size: 256, num_hidden_layers: 2, "
                  "num_attention_heads: 2, max_position_embeddings: 256, batch_size: 128, learning_rate: 0.003, "
                  "student_accuracy: 0.08, teacher_accuracy: 0.85, max_steps: 3000}")


def test_a_best_teacher_without_a_named_model_is_planned_as_the_student(hub):
    """teacher.source best without model_name_or_path starts as the bootstrap's (tiny) teacher, but from round 2 it
    is the best model so far, which may be a promoted student: the plan sizes the teacher's rows by the student (an
    8B here), not by the tiny bootstrap teacher (which would say 0.0 GiB and let an 8B OOM)."""
    base = ["teacher.model_name_or_path=null", "teacher.engine.quantization=null", TINY_BOOTSTRAP]
    best = {r.stage: r for r in plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["teacher.source=best", *base]))}
    previous = {r.stage: r for r in plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml",
                                                     ["teacher.source=previous", *base]))}
    assert best["generate"].holds == previous["generate"].holds  # the 8B student's weights
    assert best["generate"].holds["weights /8"] > 1 * 2**30


def test_align_plan_prints_the_table(hub, capsys):
    align(["plan", str(ROOT / "recipes/llama3.1-70b.yaml"), "launcher.train.nodes=1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["stage", "GiB/GPU", "of", "fits"]
    fits = {line.split()[0]: line.split()[3] for line in out[1:]}
    assert fits == {"sft": "NO", "dpo": "NO", "generate": "yes", "score": "yes", "teacher_eval": "yes", "eval": "yes"}


def test_without_gpus_there_is_no_plan(capsys):
    align(["plan", str(ROOT / "recipes/tiny.yaml")])
    assert "no GPU declared" in capsys.readouterr().out


@pytest.mark.parametrize("command,stage", [(["round", "1"], "sft"), (["stage", "dpo"], "dpo"), (["eval", "1"], "eval")])
def test_round_is_refused_before_any_work(tmp_path, capsys, command, stage):
    """The tiny recipe told its GPUs hold 1 MiB: nothing fits, and nothing runs; with 80 GB it passes the plan."""
    gpus = ["launcher.train.gpus_per_node=1", "launcher.generate.gpus_per_node=1", "launcher.eval.gpus_per_node=1"]
    with pytest.raises(SystemExit):
        align([*command, "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path}",
               "launcher.gpu_memory_gib=0.001", *gpus])
    err = capsys.readouterr().err
    assert "the memory plan says these stages cannot fit" in err and f"{stage}: needs ~" in err
    assert list(tmp_path.iterdir()) == []
    check_plan(load_recipe(ROOT / "recipes/tiny.yaml", ["launcher.gpu_memory_gib=80", *gpus]))


def test_cpu_offload_reaches_accelerate():
    """The trainer's cpu_offload as accelerate reads `stage_command`'s flags: FSDP's offload, DeepSpeed's devices."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from alignment.launcher import stage_command

    def launched(*overrides):
        cmd = stage_command(load_recipe(ROOT / "recipes/tiny.yaml", overrides), "sft", Path("job.json"))
        return _validate_launch_command(launch_command_parser().parse_args(cmd[cmd.index("--config_file"):]))[0]

    assert prepare_multi_gpu_env(launched("sft.distributed=fsdp"))["FSDP_OFFLOAD_PARAMS"] == "false"
    assert prepare_multi_gpu_env(launched("sft.distributed=fsdp", "sft.cpu_offload=true"))["FSDP_OFFLOAD_PARAMS"] == "true"
    assert launched("sft.distributed=zero3").offload_param_device == "none"
    zero3 = launched("sft.distributed=zero3", "sft.cpu_offload=true")
    assert (zero3.offload_param_device, zero3.offload_optimizer_device) == ("cpu", "cpu")
    with pytest.raises(InputError, match="cpu_offload moves sharded states"):
        load_recipe(ROOT / "recipes/tiny.yaml", ["sft.distributed=ddp", "sft.cpu_offload=true"])


def test_what_would_fit_does_fit(hub):
    """The nodes the refusal suggests are the fewest that fit: with one node less the stage is refused again."""
    import re

    one_node = load_recipe(ROOT / "recipes/llama3.1-70b.yaml", ["launcher.train.nodes=1"])
    hints = {r.stage: r.hint for r in plan(one_node) if not r.ok}
    for stage in ("sft", "dpo"):
        n = int(re.search(r"launcher.train.nodes: (\d+)", hints[stage]).group(1))
        ok = {r.stage: r.ok for r in plan(load_recipe(ROOT / "recipes/llama3.1-70b.yaml", [f"launcher.train.nodes={n}"]))}
        fewer = {r.stage: r.ok for r in plan(load_recipe(ROOT / "recipes/llama3.1-70b.yaml",
                                                         [f"launcher.train.nodes={n - 1}"]))}
        assert ok[stage] and not fewer[stage], (stage, n)
    offload = load_recipe(ROOT / "recipes/llama3.1-70b.yaml", ["launcher.train.nodes=1", "sft.cpu_offload=true"])
    assert next(r for r in plan(offload) if r.stage == "sft").ok


def test_the_teacher_needs_the_gpus_its_engine_asks_for(hub):
    bad = load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["launcher.generate.gpus_per_node=4"])
    with pytest.raises(InputError, match="generate: .*tensor_parallel_size x data_parallel_size = 8 GPUs; "
                                         "launcher.generate gives 4"):
        check_plan(bad)
    # 405B in FP8 on 4 GPUs: the engine's split fits the launcher, the weights (112 GiB each) do not
    with pytest.raises(InputError, match=r"generate: needs ~\d+\.\d GiB per GPU \(weights /4 "):
        check_plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["launcher.generate.gpus_per_node=4",
                                                                   "teacher.engine.tensor_parallel_size=4"]))
    check_plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["launcher.generate.gpus_per_node=16",
                                                               "teacher.engine.data_parallel_size=2"]))


def test_gpus_without_their_memory_or_a_model_config_are_named(hub):
    with pytest.raises(InputError, match="launcher.gpu_memory_gib: the launcher gives stages GPUs but none is visible"):
        plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["launcher.gpu_memory_gib=null"]))
    with pytest.raises(InputError, match="student.model_name_or_path: cannot read the config of 'org/absent' offline"):
        plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["student.model_name_or_path=org/absent"]))
    assert plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml"))  # both given: a plan
