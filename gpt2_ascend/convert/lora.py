"""LoRA export: fold a PEFT adapter into its base model and write a plain HF GPT-2 directory."""
from __future__ import annotations

import json
import os
import shutil

from ..hf import atomic_directory, resolve_model_path, save_pretrained

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")


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


def base_for_adapter(base_path: str, adapter: str):
    """The base model an adapter goes on, built as its task type says: a SEQ_CLS adapter brings its trained
    `score` head, so a language-model base becomes a classifier with that many labels (as peft's
    AutoPeftModelForSequenceClassification does); CAUSAL_LM a language model; none follows the base."""
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel
    from ..train.lora import adapter_head_rows, read_adapter_config
    task = read_adapter_config(adapter).get("task_type")
    if task == "SEQ_CLS":
        labels = adapter_head_rows(adapter, "score")
        overrides = {"num_labels": labels} if labels else {}
        return GPT2ForSequenceClassification.from_pretrained(base_path, **overrides)
    cls = GPT2LMHeadModel if task == "CAUSAL_LM" else model_class_for(base_path)
    return cls.from_pretrained(base_path)


def merge_lora(base: str | None, adapter: str, output_dir: str, dtype=None) -> dict:
    """base (HF dir or hub id; None: the adapter's base_model_name_or_path) + adapter (a PEFT adapter dir, ours
    or trained on transformers' GPT-2) -> output_dir with the merged weights, plus the base's tokenizer files.
    The merged model's logits equal the adapted model's."""
    from ..train.lora import adapter_base, load_adapter
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory not found: {adapter}")
    path = resolve_model_path(base or adapter_base(adapter))
    merged = load_adapter(base_for_adapter(path, adapter), adapter, merge=True)
    copied = []
    with atomic_directory(output_dir) as tmp:
        save_pretrained(merged, tmp, dtype=dtype)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(path, name)):
                shutil.copyfile(os.path.join(path, name), os.path.join(tmp, name))
                copied.append(name)
    return {"output_dir": output_dir, "architecture": merged.hf_architecture, "tokenizer_files": copied,
            "parameters": merged.num_parameters()}
