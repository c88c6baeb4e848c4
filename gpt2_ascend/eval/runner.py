"""Load a checkpoint (+ LoRA adapter, loading.load_model) and a dataset, then evaluate: the work behind
`evaluate.py`, usable from a notebook as well."""
from __future__ import annotations

import math
import os
import time

import numpy as np

from ..data.loader import checked_columns
from ..data.tokenizer import tokenizer_for
from ..device import resolve_device
from ..hf import resolve_model_path
from ..loading import load_model, mindspore_overrides
from ..model import CLASSIFIER, LANGUAGE_MODEL
from .classification import classification_accuracy
from .perplexity import perplexity


def load_eval_tokens(path: str, seq_length: int, stride: int | None = None, tokenizer=None,
                     mindformers_compat: bool = False, cache_dir: str | None = None) -> np.ndarray:
    """Blocks (n, seq_length) for the block protocols; with a stride, the whole token stream (1-D).
    PATH: a prepared .npy, a raw wiki.*.tokens file, a .txt file / folder, or a datasets source (its validation
    split by default: data/hf_datasets.py)."""
    from ..data import hf_datasets
    from ..data.sources import load_token_blocks
    from ..data.store import load_blocks
    if stride is None:
        return load_token_blocks(path, seq_length, tokenizer=tokenizer, mindformers_compat=mindformers_compat,
                                 cache_dir=cache_dir, split="validation")  # (a datasets source's split)
    if hf_datasets.is_datasets_source(path):  # its whole token stream, read by Dataset.map
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
                   cache_dir: str | None = None, progress: bool = True, strategy: str | None = None,
                   n_head: int | None = None, activation: str | None = None) -> dict:
    """Perplexity of a checkpoint on a dataset, with the run's settings in the result. strategy, n_head, activation:
    for MindSpore weights (a distributed checkpoint's strategy; what a .ckpt does not store)."""
    _require_exists(dataset)  # before loading a model that may take minutes
    if not isinstance(seq_length, int) or seq_length < 2:
        raise ValueError(f"seq_length must be an integer >= 2 (a block predicts its last seq_length - 1 tokens), got "
                         f"{seq_length!r}")
    path = resolve_model_path(model_path)  # a hub id: its snapshot folder (tokenizer files included)
    device = resolve_device(device)
    model = load_model(path, LANGUAGE_MODEL, device=device, adapter=adapter, strategy=strategy,
                       overrides=mindspore_overrides(path, strategy, n_head, activation))
    if seq_length > model.config.n_positions:  # before preparing any data
        raise ValueError(f"seq_length {seq_length} is longer than the model's context "
                         f"n_positions={model.config.n_positions}; pass --seq_length {model.config.n_positions} or less")
    tokens = load_eval_tokens(dataset, seq_length, stride, tokenizer_for(path, tokenizer),
                              mindformers_compat, cache_dir)
    tokens = checked_columns(tokens, model.config.vocab_size, what=f"evaluation data {dataset}")["input_ids"]
    start = time.perf_counter()
    result = perplexity(model, tokens, seq_length, batch_size=batch_size, stride=stride, protocol=protocol,
                        precision=precision, progress=progress)
    return dict(task="perplexity", model=model_path, adapter=adapter, dataset=dataset, device=str(device),
                **result, seconds=round(time.perf_counter() - start, 3))


def run_classification(model_path: str, dataset: str, max_length: int = 128, batch_size: int = 32,
                       adapter: str | None = None, device="auto", precision: str = "auto",
                       tokenizer: str | None = None, cache_dir: str | None = None, dataset_name: str = "sst_2",
                       progress: bool = True, strategy: str | None = None, n_head: int | None = None,
                       activation: str | None = None) -> dict:
    """Accuracy (and per-class counts) of a sequence classifier on a .tsv or prepared .npz (strategy, n_head,
    activation: as run_perplexity)."""
    _require_exists(dataset)
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    from ..data.sources import load_txtcls
    path = resolve_model_path(model_path)
    device = resolve_device(device)
    model = load_model(path, CLASSIFIER, device=device, adapter=adapter, strategy=strategy,
                       overrides=mindspore_overrides(path, strategy, n_head, activation))
    if max_length > model.config.n_positions:
        raise ValueError(f"max_length {max_length} is longer than the model's context "
                         f"n_positions={model.config.n_positions}; pass --max_length {model.config.n_positions} or less")
    data = load_txtcls(dataset, max_length, tokenizer=tokenizer_for(path, tokenizer), cache_dir=cache_dir,
                       dataset_name=dataset_name, split="validation")  # (a datasets source's split)
    data = checked_columns(data, model.config.vocab_size, model.config.num_labels, f"evaluation data {dataset}")
    start = time.perf_counter()
    result = classification_accuracy(model, data, batch_size=batch_size, precision=precision, progress=progress)
    return dict(task="text_classification", model=model_path, adapter=adapter, dataset=dataset,
                device=str(device), **result, seconds=round(time.perf_counter() - start, 3))


def _require_exists(dataset: str):
    from ..data.hf_datasets import is_datasets_source
    if not os.path.exists(dataset) and not is_datasets_source(dataset):  # a hub id is no file
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
