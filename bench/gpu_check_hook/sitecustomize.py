"""Put on PYTHONPATH by bench/gpu_check.py for the SFT stage's processes only: at each process's exit, the most
GPU memory PyTorch allocated in it (torch.cuda.max_memory_allocated), so the stage's peak is read from the
processes that `align stage sft` and `accelerate launch` start, without changing the stage. Does nothing unless
GPU_CHECK_PEAK_FILE is set, and nothing in a process that never used CUDA."""

import atexit
import json
import os
import sys


def _write_peak() -> None:
    torch = sys.modules.get("torch")
    path = os.environ.get("GPU_CHECK_PEAK_FILE")
    if not path or torch is None or not torch.cuda.is_initialized():
        return
    with open(f"{path}.{os.getpid()}", "w") as f:
        json.dump({"pid": os.getpid(), "argv": sys.argv, "device": torch.cuda.get_device_name(),
                   "max_memory_allocated": torch.cuda.max_memory_allocated(),
                   "max_memory_reserved": torch.cuda.max_memory_reserved()}, f)


atexit.register(_write_peak)
