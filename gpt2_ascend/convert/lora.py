"""LoRA export: fold an adapter into its base model and write a plain HF GPT-2 directory. The adapter is a PEFT
directory (ours, or peft's), or MindFormers' unmerged LoRA .ckpt (mindpet's lora_a / lora_b tensors beside the
base weights), which also loads as one of our LoRA models."""
from __future__ import annotations

import os
import shutil

from ..data.tokenizer import TOKENIZER_FILES
from ..hf import atomic_model_dir, resolve_model_path, save_pretrained
from ..loading import load_model
from ..lora import TASK_TYPES, adapter_base, merge_adapter, read_adapter_config
from ..mindspore_io.lora import load_mindformers_lora  # noqa: F401 (gpt2_ascend.convert exports it)


def merge_lora(base: str | None, adapter: str, output_dir: str, dtype=None) -> dict:
    """base (HF dir or hub id; None: the adapter's base_model_name_or_path) + adapter (a PEFT adapter dir, ours
    or trained on transformers' GPT-2) -> output_dir with the merged weights, plus the base's tokenizer files.
    The merged model's logits equal the adapted model's."""
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory not found: {adapter}")
    path = resolve_model_path(base or adapter_base(adapter))
    # the head the adapter's task type names (a SEQ_CLS adapter brings its trained score head); none: the base's
    architecture = {task: arch for arch, task in TASK_TYPES.items()}.get(read_adapter_config(adapter).get("task_type"))
    merged = load_model(path, architecture, adapter=adapter, new_head=True)
    copied = []
    with atomic_model_dir(output_dir) as tmp:
        save_pretrained(merged, tmp, dtype=dtype)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(path, name)):
                shutil.copyfile(os.path.join(path, name), os.path.join(tmp, name))
                copied.append(name)
    return {"output_dir": output_dir, "architecture": merged.hf_architecture, "tokenizer_files": copied,
            "parameters": merged.num_parameters()}


def merge_mindformers_lora(path: str, output_dir: str, lora_alpha: float, n_head: int | None = None,
                           activation: str | None = None, dtype=None) -> dict:
    """A MindFormers LoRA .ckpt -> output_dir: the adapters folded into the base weights, an HF GPT-2 directory."""
    model = load_mindformers_lora(path, lora_alpha, n_head, activation)
    rank, targets = model.lora_layout
    merged = merge_adapter(model)
    save_pretrained(merged, output_dir, dtype=dtype)  # atomic itself, and sized for a full disk's one line
    return {"output_dir": output_dir, "architecture": merged.hf_architecture, "tokenizer_files": [],
            "parameters": merged.num_parameters(), "lora_rank": rank, "lora_targets": targets}
