"""The memory plan: GPU memory each stage needs per GPU, from the model's config and the recipe, checked against
the GPUs the recipe's `launcher` gives it before any work starts.

    align plan recipes/llama3.1-70b.yaml [key.path=value ...]

Parameters are counted exactly on a meta-device copy of the model with one layer (transformers, no weights read;
the other layers are alike); layers, widths, heads and vocabulary come from its config. Bytes per GPU, by what a
stage holds:

Training (sft, dpo, reward_model). The stages load fp32 weights and train under bf16 autocast with AdamW:
  - model states: 16 bytes per trained parameter (fp32 weights 4, gradients 4, Adam's two moments 8; the ZeRO paper,
    arXiv 1910.02054, counts the same 16 for mixed-precision Adam). LoRA: the frozen base at 4 bytes (QLoRA: NF4
    with double quantization, 4.127 bits per quantized weight, the rest bf16; arXiv 2305.14314) and 16 bytes per
    adapter parameter, r x (in + out) per adapted Linear. DPO's reference model adds 4 bytes per parameter unless
    `precompute_ref_log_probs` (with LoRA the reference is the base with adapters off: nothing extra).
  - fsdp / zero3 divide the states by the world size (nodes x gpus_per_node) and gather one decoder layer at a
    time: 8 bytes per layer parameter (two bf16 copies, the current layer and the prefetched next, and its fp32
    gradient before the reduce-scatter). `cpu_offload` moves the sharded states to host memory. ddp keeps a copy.
  - activations, per token of a micro-batch (per_device_train_batch_size x max_length; DPO and the reward model
    run chosen and rejected together, twice that): Korthikanti et al. (arXiv 2205.05198) count what autograd saves
    per layer; for a Llama layer with a memory-efficient attention kernel (no seq x seq matrix), with r the bytes
    of the residual stream and c of the compute: each RMSNorm keeps an fp32 copy of its input and its normalised
    input, (4 + r)h; q, k and v read the norm's output (under autocast, three bf16 casts of it) ch or 3ch; q, k, v
    (GQA heads expanded) and the attention output 4ch; o_proj's input ch; the MLP's input ch (2ch under autocast);
    SwiGLU's gate, up, SiLU output and product 4ci (h hidden, i MLP width). Single-device and ddp training keep
    fp32 weights under bf16 autocast (r 4, c 2): 36h + 8i; fsdp and zero3 compute with bf16 copies of the weights
    (r = c = 2): 26h + 8i; fp32 on a CPU: 44h + 16i. `eager` attention also keeps the probabilities, c x heads x
    seq per token; LoRA under autocast, one more cast of each adapted Linear's input. Gradient checkpointing
    keeps each layer's input (rh) and recomputes one layer at a time (its full activations on top). SFT's loss
    (transformers' cross-entropy): logits at c bytes, their fp32 copy, log-softmax and its gradient, (c + 12) x
    vocab bytes per token; DPO's (TRL's fused log-prob kernel on GPUs): the logits and their gradient, 2c x vocab.
    The bench's models have a 105-token vocabulary: this term is not measured there.
Every vLLM load (the teacher in generate and as a judge; eval's models on the engine alignment.stages.eval.serving
  gives them, teacher_eval's teacher on the teacher's own; a vllm-backend reward model), by its engine: weights at
  the engine's dtype (fp8: 1 byte per decoder Linear weight; fbgemm_fp8, Meta's row-wise 405B checkpoint: the
  FFN's) divided over tensor_parallel_size GPUs, and data_parallel_size such copies side by side, each holding
  its whole slice (tensor parallelism divides the weights, data parallelism replicates them; tp x dp GPUs). Plus
  the KV cache, 2 x layers x kv_heads x head_dim x 2 bytes per token (the kv heads split over tp), for
  max_model_len tokens per sequence and every sequence asked for at once: max_concurrency (openai) or shard_size
  (vllm) requests of num_samples each, split over the dp copies. vLLM takes gpu_memory_utilization of each GPU
  (with kv_cache_memory_bytes: the weights and a cache of exactly that size, which must fit 0.9 of the GPU);
  it cannot start without room for the weights and one sequence, and queues what its cache cannot hold (slower,
  not fatal: the table says how many fit).
transformers generation and evaluation: bf16 weights spread over the stage's GPUs (device_map auto), the KV cache
  of batch_size x samples sequences of max_new_tokens (prompt tokens uncounted), and the reward model in fp32,
  spread likewise. On vLLM, eval and teacher_eval load the reward model once their engine has stopped: a row of
  its own. Scoring: the reward model in fp32 (after the teacher, when it judges).

Not counted: the CUDA context, allocator fragmentation and kernels' workspaces, so a trainer or generate() counts
on 90% of a GPU (USABLE). Against the peaks of bench/results/h100-*.json: 0.96 to 1.08 of each, at two decimals
(tests/test_memory_plan.py asserts this band).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment.config import InputError, LoraConfig, ModelSource, Recipe
from alignment.stage_table import (STAGES, Model, fixed_teacher, gguf_file, job_kind, reward_model, round_stages,
                                   student)

GIB = 2**30
USABLE = 0.9  # share of a GPU a trainer or transformers' generate can fill; the rest: context and fragmentation
PLANNED = ("sft", "dpo", "reward_training", "generate", "revise", "dialogs", "score", "teacher_eval", "eval")  # stages that use GPUs


@dataclass(frozen=True)
class Shape:
    """What the estimate reads of a model."""

    params: int
    layer_params: int  # one decoder layer: what FSDP gathers at once
    linears: tuple[tuple[str, int, int], ...]  # one decoder layer's Linear modules: (name, in, out)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int  # max_position_embeddings


def shape_of(config) -> Shape:
    """Count parameters on a meta-device copy with one decoder layer (no memory, any architecture transformers
    knows); the other layers are alike."""
    seq_cls = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM).from_config(one)
    layer = model.base_model.layers[0]
    layer_params = sum(p.numel() for p in layer.parameters())
    heads = config.num_attention_heads
    return Shape(params=sum(p.numel() for p in model.parameters()) + (config.num_hidden_layers - 1) * layer_params,
                 layer_params=layer_params, linears=tuple((name, m.in_features, m.out_features) for name, m in
                                                          layer.named_modules() if isinstance(m, torch.nn.Linear)),
                 layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                 heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                 vocab=config.vocab_size, context=config.max_position_embeddings)


@lru_cache(maxsize=16)
def model_shape(name: str, key: str, revision: str | None = None) -> Shape:
    """The shape of a model folder or a Hub id in the local cache (offline: only config.json is read)."""
    try:
        return shape_of(AutoConfig.from_pretrained(name, revision=revision, local_files_only=True))
    except (OSError, ValueError) as e:
        raise InputError(f"{key}: cannot read the config of {name!r} offline for the memory plan "
                         f"({str(e).splitlines()[0]}); download it first (hf download {name} config.json)") from None


@lru_cache(maxsize=4)
def gguf_shape(path: Path) -> Shape:
    """The shape from a GGUF file's metadata: seconds to parse (its whole vocabulary is in there), so once a file."""
    return shape_of(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))


def input_shape(recipe: Recipe, spec) -> Shape:
    """The shape of a model the stage table names: a folder or Hub id, the GGUF the recipe imports (its config is
    in the file), the bootstrap's (its student and teacher share one architecture), or else one made from round
    1's student (a promoted model, a trained reward model), which has the student's."""
    if isinstance(spec, Model):
        return model_shape(spec.name, spec.key, spec.revision)
    if spec.stage == "import_gguf":
        return gguf_shape(gguf_file(recipe).path)
    if spec.stage == "bootstrap":
        from alignment.chat import build_tokenizer
        from alignment.tiny_models import llama_config

        return shape_of(llama_config(build_tokenizer(), **recipe.bootstrap.llama_shape()))
    return input_shape(recipe, student(recipe, 1))


def teacher_shape(recipe: Recipe) -> Shape:
    """A teacher that changes is a student: `previous`, and `best` without a named model (the bootstrap's teacher
    only until a promoted student beats it, so the student's shape, usually the larger, is what must fit)."""
    t = recipe.teacher
    changes = t.source == ModelSource.best and not t.model_name_or_path
    return input_shape(recipe, student(recipe, 1) if changes else fixed_teacher(recipe) or student(recipe, 1))


# --- bytes ---------------------------------------------------------------------------------------------------


def activation_bytes(s: Shape, seq: int, residual: int, compute: int, attn: str) -> int:
    """What autograd keeps per token of one layer (see the module docstring)."""
    h, i, c = s.hidden, s.intermediate, compute
    casts = residual == 4 and c == 2  # autocast casts the fp32 norm output once per Linear reading it
    out = 2 * (4 + residual) * h + (3 if casts else 1) * c * h + 4 * c * h + c * h + (2 if casts else 1) * c * h
    return out + 4 * c * i + (c * s.heads * seq if attn == "eager" else 0)


def targeted(name: str, lora: LoraConfig) -> bool:
    return lora.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in lora.target_modules


def lora_params(s: Shape, lora: LoraConfig) -> int:
    return sum(lora.r * (n_in + n_out) for name, n_in, n_out in s.linears if targeted(name, lora))


def train_bytes(s: Shape, cfg, world: int, *, gpu: bool = True, loss: str | None = "sft", pairs: bool = False,
                reference: bool = False) -> dict[str, float]:
    """Bytes per device of one training process, by what they hold. `pairs`: chosen and rejected in one batch;
    `reference`: DPO's reference model when its log-probs are not precomputed; `gpu` False: fp32 on a CPU;
    `loss`: sft (transformers' cross-entropy), dpo (TRL's log-probs) or None (a scalar head, no logits)."""
    shard = world if cfg.distributed in ("fsdp", "zero3") else 1
    residual, c = (2 if shard > 1 else 4, 2) if gpu else (4, 4)
    linear = s.layers * sum(a * b for _, a, b in s.linears)
    if cfg.lora is None:
        states, what = 16 * s.params, "weights, gradients, Adam"
    else:
        quantized = cfg.lora.quantize_base_4bit
        base = (4.127 / 8 * linear + 2 * (s.params - linear)) if quantized else 4 * s.params
        states, what = base + 16 * lora_params(s, cfg.lora) * s.layers, "frozen base, adapters with Adam"
    if reference and cfg.lora is None:
        states, what = states + 4 * s.params, what + ", reference model"
    out = {what: 0.0 if getattr(cfg, "cpu_offload", False) else states / shard}
    if shard > 1:
        out["gathered layer"] = 8 * s.layer_params
    tokens = cfg.per_device_train_batch_size * cfg.max_length * (2 if pairs else 1)
    per_layer = activation_bytes(s, cfg.max_length, residual, c, cfg.attn_implementation)
    if cfg.lora and residual == 4 and c == 2:  # under autocast each adapter casts its Linear's input once more
        per_layer += c * sum(n_in for name, n_in, _ in s.linears if targeted(name, cfg.lora))
    kept = s.layers * residual * s.hidden + per_layer if cfg.gradient_checkpointing else s.layers * per_layer
    out["activations"] = tokens * kept
    if loss:  # TRL's fused log-prob kernel (triton, on GPUs) keeps no fp32 copy
        out["logits and loss"] = tokens * (2 * c if loss == "dpo" and gpu else c + 12) * s.vocab
    return out


def weight_bytes(s: Shape, quantization: str | None = None, dtype: int = 2) -> float:
    """Weights at `dtype` bytes (bf16: 2); fp8 takes a byte per decoder Linear weight, fbgemm_fp8 (row-wise, the
    FFN only) per MLP one."""
    fp8 = sum(a * b for name, a, b in s.linears
              if quantization == "fp8" or (quantization == "fbgemm_fp8" and name.startswith(("mlp.", "feed_forward."))))
    return dtype * s.params - (dtype - 1) * s.layers * fp8


def kv_bytes_per_token(s: Shape, gpus: int = 1) -> int:
    """K and V of every layer in bf16, the kv heads split over `gpus` (replicated when fewer heads than GPUs)."""
    return 2 * s.layers * math.ceil(s.kv_heads / gpus) * s.head_dim * 2


# --- the plan ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    stage: str
    holds: dict[str, float]  # bytes per GPU by what
    capacity: float  # bytes one GPU offers to it
    key: str  # the recipe key(s) to change when it does not fit
    hint: str = ""  # what would fit, or how much of the cache fits
    fits: bool | None = None  # None: decided from holds and capacity

    @property
    def need(self) -> float:
        return sum(self.holds.values())

    @property
    def ok(self) -> bool:
        return self.need <= self.capacity if self.fits is None else self.fits


def visible_gpus() -> tuple[int, float | None]:
    if not torch.cuda.is_available():
        return 0, None
    return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GIB


def plan(recipe: Recipe, stages: tuple[str, ...] = PLANNED) -> list[Row] | None:
    """A row per stage of `stages` the recipe has; None when it runs without GPUs (none declared, none visible)."""
    launcher = recipe.launcher
    seen, seen_gib = visible_gpus()
    if not any(getattr(launcher, k).gpus_per_node for k in ("generate", "train", "eval")) and not seen:
        return None
    gib = launcher.gpu_memory_gib or seen_gib
    if gib is None:
        raise InputError("launcher.gpu_memory_gib: the launcher gives stages GPUs but none is visible here to read "
                         "their memory from; set it (e.g. 80 for an H100 80GB) for the memory plan")
    rows, present = [], {s.name for s in round_stages(recipe, 1)}
    for stage in stages:
        kind = job_kind(recipe, stage)
        res = getattr(launcher, kind)
        gpus = res.gpus_per_node or seen
        if not gpus or stage not in present:
            continue
        if stage in ("sft", "dpo", "reward_training"):
            rows.append(train_row(recipe, stage, res.nodes, gpus, gib * GIB))
        elif stage in ("generate", "dialogs"):  # dialogs: a later turn's K samples, on generate's engine
            # (over several nodes, one server per node: each must fit its node's GPUs)
            rows.append(teacher_row(recipe, stage, recipe.sampling.num_samples, gpus, kind, gib * GIB))
        elif stage == "revise":  # one revision per request, on generate's engine
            rows.append(teacher_row(recipe, stage, 1, gpus, kind, gib * GIB))
        elif stage == "score":
            if recipe.reward.judge:  # the teacher judges first, and is stopped before the reward model loads
                rows.append(teacher_row(recipe, stage, 1, gpus, kind, gib * GIB))
            if recipe.reward.reward_model:  # (alignment/stages/score.py: a vLLM one with the teacher's engine)
                rows.append(reward_row(recipe, stage, recipe.teacher.engine, "teacher.engine", gpus, kind, gib * GIB))
        elif stage in ("eval", "teacher_eval"):
            rows += eval_rows(recipe, stage, kind, gpus, gib * GIB)
            if stage == "eval" and recipe.eval.judge:  # the teacher's verdicts, after the reward model's scores
                rows.append(teacher_row(recipe, stage, 1, gpus, kind, gib * GIB))
    return rows


def reward_shape(recipe: Recipe) -> Shape:
    return input_shape(recipe, reward_model(recipe, 1)["reward_model"])


def train_row(recipe: Recipe, stage: str, nodes: int, gpus: int, capacity: float) -> Row:
    section = STAGES[stage].trains
    cfg, s = getattr(recipe, section), input_shape(recipe, student(recipe, 1))
    extra = dict(loss={"sft": "sft", "dpo": "dpo"}.get(stage), pairs=stage != "sft",
                 reference=stage == "dpo" and not cfg.precompute_ref_log_probs)

    def need(c, n) -> float:
        return sum(train_bytes(s, c, n * gpus if c.distributed else 1, **extra).values())

    usable = USABLE * capacity
    row = Row(stage, train_bytes(s, cfg, nodes * gpus if cfg.distributed else 1, **extra), usable,
              f"{section}.distributed, {section}.lora, launcher.train.nodes")
    if row.ok:
        return row
    ways, shards = [], cfg.distributed in ("fsdp", "zero3")
    sharded = cfg if shards else cfg.model_copy(update={"distributed": "fsdp"})
    also = "" if shards else f" with {section}.distributed: fsdp"
    more = next((n for n in range(nodes + 1, 257) if need(sharded, n) <= usable), None)
    if more:
        ways.append(f"launcher.train.nodes: {more} (kind: slurm){also}")
    if cfg.lora is None and need(cfg.model_copy(update={"lora": LoraConfig()}), nodes) <= usable:
        ways.append(f"{section}.lora: {{r: 16}} on {nodes} node(s)")
    if need(sharded.model_copy(update={"cpu_offload": True}), nodes) <= usable:
        ways.append(f"{section}.cpu_offload: true{also}")
    row.hint = "would fit: " + "; or ".join(ways) if ways else "nothing tried fits: shorten max_length or the batch"
    return row


def teacher_row(recipe: Recipe, stage: str, samples: int, gpus: int, kind: str, capacity: float) -> Row:
    """The teacher as its backend serves it: to generate (`samples` per request), or as a judge (one verdict)."""
    t = recipe.teacher
    if t.backend.value == "openai" and not t.serve:
        return Row(stage, {}, capacity, "teacher.endpoints", "remote servers: not planned here", True)
    s = teacher_shape(recipe)
    if t.backend.value == "transformers":
        tokens = t.batch_size * samples * recipe.sampling.max_new_tokens
        holds = {"weights bf16": weight_bytes(s) / gpus, "KV cache": tokens * kv_bytes_per_token(s) / gpus}
        return Row(stage, holds, USABLE * capacity, "teacher.batch_size")
    return vllm_row(stage, s, t.engine, "teacher.engine", in_flight(t) * samples, gpus, kind, capacity)


def in_flight(t) -> int:
    """Requests a backend has in the engine at once: max_concurrency (openai) or a shard (vllm)."""
    return t.max_concurrency if t.backend.value == "openai" else t.shard_size


def vllm_row(stage: str, s: Shape, e, key: str, sequences: int, gpus: int, kind: str, capacity: float) -> Row:
    """One vLLM load with engine `e` (the recipe's `key`): weights at the engine's dtype and quantization split
    over tensor_parallel_size GPUs, and data_parallel_size such copies side by side, each with the whole of its
    own weights (data parallelism replicates: it multiplies the GPUs, never divides the weights), each asked for
    its share of the `sequences` in flight."""
    tp, dp = e.tensor_parallel_size, e.data_parallel_size
    weights = weight_bytes(s, e.quantization, 4 if e.dtype == "float32" else 2) / tp
    per_seq = (e.max_model_len or s.context) * kv_bytes_per_token(s, tp)
    asked = math.ceil(sequences / dp)
    if e.kv_cache_memory_bytes:  # a cache of that size beside the weights, whatever share of the GPU that is
        row = Row(stage, {f"weights /{tp}": weights, "KV cache (kv_cache_memory_bytes)": e.kv_cache_memory_bytes},
                  USABLE * capacity, key)
        room = weights + e.kv_cache_memory_bytes
        if e.kv_cache_memory_bytes < per_seq:
            row.fits = False
            row.hint = (f"{key}.kv_cache_memory_bytes = {e.kv_cache_memory_bytes} holds no whole max_model_len "
                        f"sequence ({per_seq:.0f} bytes)")
            return row
    else:
        room = e.gpu_memory_utilization * capacity
        row = Row(stage, {f"weights /{tp}": weights, "KV of one max_model_len sequence": per_seq}, room, key)
    engine = f"{key}: tensor_parallel_size {tp} x data_parallel_size {dp}"
    if tp * dp > gpus:
        row.fits = False
        row.hint = f"tensor_parallel_size x data_parallel_size = {tp * dp} GPUs; launcher.{kind} gives {gpus}"
    elif row.ok:
        at_once = int((room - weights) // per_seq)
        row.hint = (f"{engine}; the cache holds {min(at_once, asked)} of the {asked} sequences asked for at "
                    f"max_model_len{' per copy' if dp > 1 else ''}" + ("; vLLM queues the rest" if at_once < asked
                                                                          else ""))
    else:
        row.hint = f"{engine}: raise tensor_parallel_size, quantize (fp8) or lower max_model_len"
    return row


def eval_rows(recipe: Recipe, stage: str, kind: str, gpus: int, capacity: float) -> list[Row]:
    """eval and teacher_eval, on the engine each serves with (alignment.stages.eval.serving: teacher_eval the
    teacher's, eval its own or else the teacher's); then the reward model, loaded once that engine has stopped
    (a row of its own: the two never share the GPUs)."""
    from alignment.stages.eval import serving

    teacher = stage == "teacher_eval"
    served, e = serving(recipe, teacher=teacher), recipe.eval
    s = teacher_shape(recipe) if teacher else input_shape(recipe, student(recipe, 1))
    if served.backend.value == "transformers":  # device_map auto: bf16 weights over the stage's GPUs
        tokens = e.batch_size * max(e.num_samples, 1) * e.max_new_tokens
        holds = {f"weights /{gpus}": weight_bytes(s, served.engine.quantization if teacher else None) / gpus,
                 "KV cache": tokens * kv_bytes_per_token(s) / gpus}
        rows = [Row(stage, holds, USABLE * capacity, f"eval.batch_size, launcher.{kind}.gpus_per_node")]
    else:
        key = "teacher.engine" if teacher or recipe.eval.engine is None else "eval.engine"
        rows = [vllm_row(stage, s, served.engine, key, in_flight(served) * max(e.num_samples, 1), gpus, kind,
                         capacity)]
    if recipe.reward.reward_model and served.backend.value != "transformers":
        rows.append(reward_row(recipe, stage, serving(recipe).engine, "eval.engine" if e.engine else "teacher.engine",
                               gpus, kind, capacity))
        rows[-1].hint = rows[-1].hint or "loaded once the engine above has stopped"
    elif recipe.reward.reward_model:
        rows[0].holds[f"reward model fp32 /{gpus}"] = 4 * reward_shape(recipe).params / gpus
    return rows


def reward_row(recipe: Recipe, stage: str, engine, key: str, gpus: int, kind: str, capacity: float) -> Row:
    """The reward model: in fp32 spread over the stage's GPUs, or (backend vllm) a vLLM load with `engine`."""
    rm = recipe.reward.reward_model
    if rm.backend == "vllm":
        return vllm_row(stage, reward_shape(recipe), engine, key, rm.batch_size, gpus, kind, capacity)
    return Row(stage, {f"reward model fp32 /{gpus}": 4 * reward_shape(recipe).params / gpus}, USABLE * capacity,
               "reward.reward_model")


def check_plan(recipe: Recipe, stages: tuple[str, ...] = PLANNED) -> None:
    """Refuse, before any work, a stage whose estimate exceeds the GPU memory it will have."""
    if bad := [r for r in plan(recipe, stages) or [] if not r.ok]:
        raise InputError("the memory plan says these stages cannot fit (align plan shows the table):\n  " + "\n  ".join(
            f"{r.stage}: needs ~{r.need / GIB:.1f} GiB per GPU ({held(r)}), has {r.capacity / GIB:.1f} GiB; change "
            f"{r.key}. {r.hint}".rstrip(". ") for r in bad))


def held(row: Row) -> str:
    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in row.holds.items())


def format_plan(recipe: Recipe) -> str:
    rows = plan(recipe)
    if rows is None:
        return ("no GPU declared (launcher.*.gpus_per_node: 0) and none visible: stages run on the CPU and there is "
                "no GPU memory to plan")
    return "\n".join([f"{'stage':<13}{'GiB/GPU':>9}{'of':>8}  fits  holds"] + [
        f"{r.stage:<13}{r.need / GIB:>9.1f}{r.capacity / GIB:>8.1f}  {'yes' if r.ok else 'NO':<4}  {held(r)}"
        + (f"  [{r.hint}]" if r.hint else "") for r in rows])
