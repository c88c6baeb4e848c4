"""Load a checkpoint (+ LoRA adapter) and a dataset, then evaluate: the work behind `evaluate.py`,
usable from a notebook as well. `load_model` is shared with `generate.py`."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .classification import classification_accuracy
from .perplexity import perplexity

TOKENIZER_FILES = ("vocab.json", "tokenizer.json")


def load_model(path_or_hub_id: str, kind: str = "lm", adapter: str | None = None, device="auto", dtype=None):
    """(model in eval mode, torch.device): an HF-format directory (ours or written by transformers), a hub id,
    or a training checkpoint (OUTPUT_DIR/checkpoint/step_N), with an optional PEFT adapter merged in.
    kind: 'lm' (GPT2LMHeadModel) or 'cls' (GPT2ForSequenceClassification, which must come with a trained
    `score` head)."""
    from ..device import resolve_device
    from ..hf import load_config, resolve_model_path
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel

    import torch
    device = device if isinstance(device, torch.device) else resolve_device(device)
    path = resolve_model_path(path_or_hub_id)
    overrides = {}
    if kind == "cls":
        head_rows = _adapter_classifier_rows(adapter) if adapter else None
        if head_rows is None:  # the classification head must come from the model itself
            _require_classifier(path, load_config)
        else:
            overrides["num_labels"] = head_rows
    cls = GPT2ForSequenceClassification if kind == "cls" else GPT2LMHeadModel
    model = _from_training_checkpoint(cls, path, dtype, device)
    if model is None:
        model = cls.from_pretrained(path, dtype=dtype, device=device, **overrides)
    if adapter:
        from ..train.lora import load_adapter
        model = load_adapter(model, adapter, merge=True).to(device)
    return model.eval(), device


def _adapter_classifier_rows(adapter: str) -> int | None:
    """Labels of the `score` head a (SEQ_CLS) adapter trained and carries, or None."""
    from ..train.lora import adapter_head_rows, read_adapter_config
    read_adapter_config(adapter)  # one-line error when it is not an adapter directory
    return adapter_head_rows(adapter, "score")


def _from_training_checkpoint(cls, path: str, dtype, device):
    """A trainer checkpoint directory (manifest.json + model.pt + config.json), else None."""
    from ..config import GPT2Config
    from ..hf import model_from_state
    from ..parallel.checkpoint import is_sharded, model_from_sharded
    from ..train import checkpoint as ckpt
    if os.path.isdir(path) and is_sharded(path):  # a torchrun run's checkpoint, gathered into one model here
        return model_from_sharded(cls, path, dtype=dtype, device=device)
    if not (os.path.isdir(path) and ckpt.is_training_checkpoint(path)):
        return None
    manifest = ckpt.verify_checkpoint(path, ckpt.MODEL_FILES)  # the optimizer state is not needed
    if manifest.get("meta", {}).get("lora"):
        raise ValueError(f"{path} is a LoRA training checkpoint (adapters only): evaluate its run's final/ "
                         f"directory, or pass the base model with --adapter final/adapter")
    config = GPT2Config.from_json_file(os.path.join(path, "config.json"))
    state = ckpt.load_checkpoint(path, ["model"], verify=False)["model"]
    return model_from_state(cls, config, state, source=path, dtype=dtype, device=device)


def _require_classifier(path: str, load_config):
    """An LM checkpoint would load with a random score head: refuse instead of reporting chance accuracy."""
    from ..parallel.checkpoint import is_sharded
    if os.path.isdir(path) and is_sharded(path):
        return  # checked when it is loaded (its config.json records the architecture)
    load_config(path)  # one-line error when config.json is missing
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    if architectures and not any("SequenceClassification" in a for a in architectures):
        raise ValueError(f"{path} is a {architectures[0]} checkpoint without a classification head: pass a model "
                         f"finetuned for text_classification (GPT2ForSequenceClassification)")


def tokenizer_for(model_path: str, explicit: str | None = None):
    """The tokenizer to use: the one named, else the model directory's own, else the data dir's GPT-2 one (None)."""
    if explicit:
        return explicit
    if os.path.isdir(model_path) and any(os.path.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES):
        return model_path
    return None


def load_eval_tokens(path: str, seq_length: int, stride: int | None = None, tokenizer=None,
                     mindformers_compat: bool = False, cache_dir: str | None = None) -> np.ndarray:
    """Blocks (n, seq_length) for the block protocols; with a stride, the whole token stream (1-D).
    PATH: a prepared .npy, a raw wiki.*.tokens file, a .txt file / folder, or a datasets source (its validation
    split by default: data/hf_datasets.py)."""
    from ..data import hf_datasets
    from ..data.store import load_blocks, load_token_blocks
    if stride is None:
        return load_token_blocks(path, seq_length, tokenizer=tokenizer, mindformers_compat=mindformers_compat,
                                 cache_dir=cache_dir, split="validation")  # issue 16: a datasets source's split
    if hf_datasets.is_datasets_source(path):  # issue 16 hook: the whole token stream of a datasets source
        return hf_datasets.token_stream(path, tokenizer, mindformers_compat=mindformers_compat, cache_dir=cache_dir,
                                        split="validation")
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.endswith(".npy"):
        return np.asarray(load_blocks(path)).reshape(-1)  # packed blocks are consecutive text
    if path.endswith(".tokens"):
        from ..data.wikitext2 import wikitext2_token_stream
        return wikitext2_token_stream(path, tokenizer, mindformers_compat)
    return load_token_blocks(path, seq_length, tokenizer=tokenizer, cache_dir=cache_dir).reshape(-1)


def run_perplexity(model_path: str, dataset: str, seq_length: int = 1024, stride: int | None = None,
                   batch_size: int = 8, protocol: str = "token", adapter: str | None = None, device="auto",
                   precision: str = "auto", tokenizer: str | None = None, mindformers_compat: bool = False,
                   cache_dir: str | None = None, progress: bool = True) -> dict:
    """Perplexity of a checkpoint on a dataset, with the run's settings in the result."""
    _require_exists(dataset)  # before loading a model that may take minutes
    from ..hf import resolve_model_path
    path = resolve_model_path(model_path)  # a hub id: its snapshot folder (tokenizer files included)
    model, device = load_model(path, "lm", adapter=adapter, device=device)
    if seq_length > model.config.n_positions:  # before preparing any data
        raise ValueError(f"seq_length {seq_length} is longer than the model's context "
                         f"n_positions={model.config.n_positions}; pass --seq_length {model.config.n_positions} or less")
    tokens = load_eval_tokens(dataset, seq_length, stride, tokenizer_for(path, tokenizer),
                              mindformers_compat, cache_dir)
    start = time.perf_counter()
    result = perplexity(model, tokens, seq_length, batch_size=batch_size, stride=stride, protocol=protocol,
                        precision=precision, progress=progress)
    return dict(task="perplexity", model=model_path, adapter=adapter, dataset=dataset, device=str(device),
                **result, seconds=round(time.perf_counter() - start, 3))


def run_classification(model_path: str, dataset: str, max_length: int = 128, batch_size: int = 32,
                       adapter: str | None = None, device="auto", precision: str = "auto",
                       tokenizer: str | None = None, cache_dir: str | None = None, dataset_name: str = "sst_2",
                       progress: bool = True) -> dict:
    """Accuracy (and per-class counts) of a sequence classifier on a .tsv or prepared .npz."""
    _require_exists(dataset)
    from ..data.store import load_txtcls
    from ..hf import resolve_model_path
    path = resolve_model_path(model_path)
    model, device = load_model(path, "cls", adapter=adapter, device=device)
    if max_length > model.config.n_positions:
        raise ValueError(f"max_length {max_length} is longer than the model's context "
                         f"n_positions={model.config.n_positions}; pass --max_length {model.config.n_positions} or less")
    data = load_txtcls(dataset, max_length, tokenizer=tokenizer_for(path, tokenizer), cache_dir=cache_dir,
                       dataset_name=dataset_name, split="validation")  # issue 16: a datasets source's split
    start = time.perf_counter()
    result = classification_accuracy(model, data, batch_size=batch_size, precision=precision, progress=progress)
    return dict(task="text_classification", model=model_path, adapter=adapter, dataset=dataset,
                device=str(device), **result, seconds=round(time.perf_counter() - start, 3))


def _require_exists(dataset: str):
    from ..data.hf_datasets import is_datasets_source
    if not os.path.exists(dataset) and not is_datasets_source(dataset):  # issue 16 hook: hub ids are no files
        raise FileNotFoundError(f"dataset not found: {dataset}")


def nonfinite_problem(result: dict) -> str | None:
    """Why an evaluation result cannot be trusted (a NaN / inf loss, perplexity or accuracy), else None. A model
    with NaN or inf weights, or activations that overflow in the precision used, gives such a result."""
    for key in ("loss", "ppl", "accuracy"):
        value = result.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return (f"the evaluation's {key} is {value}: the model's weights hold NaN/inf values or its activations "
                    f"overflow at this precision; check the checkpoint, or try --precision fp32")
    return None


def summary(result: dict) -> str:
    """A readable few lines of an evaluation result."""
    if result["task"] == "perplexity":
        how = f"stride {result['stride']}" if result["protocol"] == "stride" else f"protocol {result['protocol']}"
        return (f"perplexity {result['ppl']:.4f}  (loss {result['loss']:.6f}, {result['tokens']} tokens, "
                f"seq_length {result['seq_length']}, {how})")
    lines = [f"accuracy {result['accuracy']:.4f}  ({result['correct']}/{result['total']}, loss {result['loss']:.6f})"]
    for label, c in result["per_class"].items():
        acc = "n/a" if c["accuracy"] is None else f"{c['accuracy']:.4f}"
        lines.append(f"  label {label}: {c['correct']}/{c['total']} correct ({acc})")
    return "\n".join(lines)
