"""LoRA export: fold a PEFT adapter into its base model and write a plain HF GPT-2 directory."""
from __future__ import annotations

import json
import os
import shutil

from ..hf import atomic_directory, resolve_model_path, save_pretrained

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def model_class_for(path: str):
    """GPT2ForSequenceClassification if config.json names it, else GPT2LMHeadModel."""
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel
    config_path = os.path.join(path, "config.json")
    architectures = []
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            try:
                architectures = json.load(f).get("architectures") or []
            except ValueError as e:
                raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    return GPT2ForSequenceClassification if "GPT2ForSequenceClassification" in architectures else GPT2LMHeadModel


def merge_lora(base: str, adapter: str, output_dir: str, dtype=None) -> dict:
    """base (HF dir or hub id) + adapter (a PEFT adapter dir) -> output_dir with the merged weights, plus the
    base's tokenizer files. The merged model's logits equal the adapted model's."""
    from ..train.lora import load_adapter
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory not found: {adapter}")
    path = resolve_model_path(base)
    cls = model_class_for(path)
    model = cls.from_pretrained(path)
    merged = load_adapter(model, adapter, merge=True)
    copied = []
    with atomic_directory(output_dir) as tmp:
        save_pretrained(merged, tmp, dtype=dtype)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(path, name)):
                shutil.copyfile(os.path.join(path, name), os.path.join(tmp, name))
                copied.append(name)
    return {"output_dir": output_dir, "architecture": cls.hf_architecture, "tokenizer_files": copied,
            "parameters": merged.num_parameters()}
