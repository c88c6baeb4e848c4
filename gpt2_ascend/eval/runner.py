"""The one evaluation entry point: evaluate(model, data) computes the metric the model's head carries (model.py:
`metric`: a language model's perplexity, a classifier's accuracy), bounded, with the one progress bar, and stoppable
between batches. Every evaluation goes through it: evaluate.py (run_evaluation: load, read data, evaluate, usable from
a notebook as well), train.py --run_mode eval (train/run_modes.py) and a training run's evaluations (train/run.py).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from ..data.loader import as_columns, checked_columns
from ..data.tokenizer import check_tokenizer, tokenizer_for
from ..device import resolve_device
from ..hf import resolve_model_path
from ..loading import inspect_model, load_model, mindspore_shape
from ..lora import unwrap_model
from ..model import model_class
from .classification import classification_accuracy
from .perplexity import perplexity


@dataclass(frozen=True)
class Metric:
    """What a head's metric computes and how its result reads."""
    compute: object  # (model, columns, batch_size, precision, protocol, stride, window, progress, stop) -> dict
    logged: tuple  # the result's numbers a training run records (metrics.jsonl's eval_*)
    mindformers: str  # MindFormers' name for it (a recipe's metric.type)
    summary: object  # result -> a readable line or few
    mindformers_keys: dict  # {our key: MindFormers' name} in run_mode eval's result
    mindformers_line: object  # run_mode eval's result -> the line MindFormers' users read


def _perplexity(model, columns, batch_size, precision, protocol, stride, window, progress, stop) -> dict:
    tokens = columns["input_ids"]
    seq_length = tokens.shape[1] if stride is None else window
    return perplexity(model, tokens, seq_length, batch_size=batch_size, stride=stride, protocol=protocol,
                      precision=precision, progress=progress, stop=stop)


def _accuracy(model, columns, batch_size, precision, protocol, stride, window, progress, stop) -> dict:
    return classification_accuracy(model, columns, batch_size=batch_size, precision=precision, progress=progress,
                                   stop=stop)


def _perplexity_summary(result: dict) -> str:
    how = f"stride {result['stride']}" if result["protocol"] == "stride" else f"protocol {result['protocol']}"
    return (f"perplexity {result['ppl']:.4f}  (loss {result['loss']:.6f}, {result['tokens']} tokens, "
            f"seq_length {result['seq_length']}, {how})")


def _accuracy_summary(result: dict) -> str:
    lines = [f"accuracy {result['accuracy']:.4f}  ({result['correct']}/{result['total']}, loss {result['loss']:.6f})"]
    for label, c in result["per_class"].items():
        acc = "n/a" if c["accuracy"] is None else f"{c['accuracy']:.4f}"
        lines.append(f"  label {label}: {c['correct']}/{c['total']} correct ({acc})")
    return "\n".join(lines)


def _perplexity_metric_line(r: dict) -> str:
    return (f"PerplexityMetric: loss {r['loss']:.4f}, PPL {r['PPL']:.4f} ({r['tokens']} tokens in {r['blocks']} blocks "
            f"of {r['seq_length']}, batch {r['batch_size']})")


def _accuracy_metric_line(r: dict) -> str:
    return f"Accuracy: {r['Accuracy']:.4f} ({r['correct']}/{r['total']}, batch {r['batch_size']})"


METRICS = {
    "perplexity": Metric(_perplexity, ("loss", "ppl"), "PerplexityMetric", _perplexity_summary, dict(ppl="PPL"),
                         _perplexity_metric_line),
    "accuracy": Metric(_accuracy, ("loss", "accuracy"), "Accuracy", _accuracy_summary, dict(accuracy="Accuracy"),
                       _accuracy_metric_line),
}


def metric_of(model_or_class) -> Metric:
    """The metric a model (or model class: model.model_class(architecture)) carries."""
    return METRICS[unwrap_model(model_or_class).metric if not isinstance(model_or_class, type)
                   else model_or_class.metric]


def evaluate(model, data, batch_size: int = 8, precision: str = "auto", protocol: str = "token",
             stride: int | None = None, window: int | None = None, max_samples: int | None = None, progress=False,
             stop=None) -> dict:
    """The metric `model`'s head carries on `data` (a head's examples, data/sources.load_examples: token blocks, or
    a 1-D token stream with `stride`, scored in windows of `window` tokens, default the model's context; labelled
    rows), its first max_samples rows (blocks, sentences; with a stride the first max_samples x window tokens), in
    batches of batch_size. precision: "auto" runs bf16 autocast on GPU / NPU
    and fp32 on CPU. progress: the bar (True, or its settings as a dict); stop: polled after each batch, a signal
    number ends the evaluation there (eval.perplexity.EvaluationStopped). The result holds `metric` (its name) and
    `rows` (the rows evaluated), with the metric's own numbers (perplexity: loss, ppl, tokens, ...; accuracy:
    accuracy, correct, total, per_class, loss)."""
    base = unwrap_model(model)
    window = (window or base.config.n_positions) if stride is not None else None
    columns = first_rows(as_columns(data), max_samples, window)
    result = METRICS[base.metric].compute(model, columns, batch_size, precision, protocol, stride, window, progress,
                                          stop)
    rows = {} if stride is not None else dict(rows=len(columns["input_ids"]))
    return dict(metric=base.metric, **result, **rows)


def first_rows(columns: dict, n: int | None, window: int | None = None) -> dict:
    """The first n rows of each column (n None: all); a 1-D token stream (stride), its first n windows' tokens."""
    if n is None:
        return columns
    if window:
        return {k: v[: n * window] if getattr(v, "ndim", 2) == 1 else v[:n] for k, v in columns.items()}
    return {k: v[:n] for k, v in columns.items()}


def max_rows(limit, total: int) -> int | None:
    """--max_samples / lm-eval's --limit: a count of rows, or a fraction of them when below 1 (None: all)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0 or math.isinf(limit):
        raise ValueError(f"--max_samples must be a count of rows >= 1, or a fraction in (0, 1), got {limit!r}")
    if limit < 1:
        return max(1, int(total * limit))
    if limit != int(limit):
        raise ValueError(f"--max_samples must be a whole number of rows, or a fraction below 1, got {limit!r}")
    return int(limit)


# ---------------------------------------------------------------------------------------------
# evaluate.py's work: load, read data, evaluate
# ---------------------------------------------------------------------------------------------
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


def load_eval_data(examples: str, dataset: str, length: int, stride: int | None = None, tokenizer=None,
                   mindformers_compat: bool = False, cache_dir: str | None = None, dataset_name: str = "sst_2"):
    """A head's evaluation data from any source (its validation split, for a datasets source): token blocks of
    `length` (a whole token stream with a stride), or labelled rows of `length` tokens."""
    if examples == "token_blocks":
        return load_eval_tokens(dataset, length, stride, tokenizer, mindformers_compat, cache_dir)
    from ..data.sources import load_examples
    return load_examples(examples, dataset, length, tokenizer=tokenizer, cache_dir=cache_dir,
                         dataset_name=dataset_name, mindformers_compat=mindformers_compat, split="validation")


def run_evaluation(model_path: str, dataset: str, architecture: str | None = None, length: int | None = None,
                   stride: int | None = None, batch_size: int = 8, protocol: str = "token",
                   adapter: str | None = None, device="auto", precision: str = "auto", tokenizer: str | None = None,
                   mindformers_compat: bool = False, cache_dir: str | None = None, dataset_name: str = "sst_2",
                   progress: bool = True, strategy: str | None = None, n_head: int | None = None,
                   activation: str | None = None, max_samples=None, log=None) -> dict:
    """Evaluate a checkpoint (any source loading.load_model takes, as `architecture`: the head whose metric is
    computed) on a dataset, with the run's settings in the result. length: the rows' tokens (perplexity blocks /
    windows, classification rows), default the model's context (said through log). max_samples: the first rows (a
    fraction below 1: that share of them). strategy, n_head, activation: for MindSpore weights (a distributed
    checkpoint's strategy; what a .ckpt does not store). Every input is checked before the model is loaded."""
    _require_exists(dataset)  # before loading a model that may take minutes
    examples = model_class(architecture).examples
    bad = length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1)
    if length is not None and examples == "token_blocks" and (bad or length < 2):
        raise ValueError(f"seq_length must be an integer >= 2 (a block predicts its last seq_length - 1 tokens), got "
                         f"{length!r}")
    if bad:
        raise ValueError(f"the row length (--seq_length / --max_length) must be a positive integer, got {length!r}")
    path = resolve_model_path(model_path)  # a hub id: its snapshot folder (tokenizer files included)
    shape = mindspore_shape(path, strategy, n_head, activation)
    tokenizer = tokenizer_for(path, tokenizer)
    if not dataset.endswith((".npy", ".npz")):  # raw data is tokenized: its tokenizer is checked now
        check_tokenizer(tokenizer)
    inspect_model(path, architecture, strategy=strategy, shape=shape, adapter=adapter)  # its files, not weights
    device = resolve_device(device)
    model = load_model(path, architecture, device=device, adapter=adapter, strategy=strategy, shape=shape)
    context, defaulted = model.config.n_positions, length is None
    length = context if defaulted else length
    if length > context:  # before preparing any data
        raise ValueError(f"the row length {length} is longer than the model's context n_positions={context}; pass "
                         f"--seq_length (--max_length) {context} or less")
    data = load_eval_data(model.examples, dataset, length, stride, tokenizer, mindformers_compat, cache_dir,
                          dataset_name)
    columns = checked_columns(data, model.config.vocab_size, getattr(model, "num_labels", None),
                              f"evaluation data {dataset}")
    ids = columns["input_ids"]
    rows = max_rows(max_samples, len(ids) if ids.ndim == 2 else len(ids) // length)  # (a stream: its windows)
    if defaulted and log is not None:
        log(f"rows of {length} tokens: the model's context (n_positions); --seq_length / --max_length to change")
    start = time.perf_counter()
    result = evaluate(model, columns, batch_size, precision, protocol, stride, window=length, max_samples=rows,
                      progress=progress)
    return dict(model=model_path, adapter=adapter, dataset=dataset, device=str(device), **result,
                seconds=round(time.perf_counter() - start, 3))


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
    """A readable few lines of an evaluation result (its metric's)."""
    return METRICS[result["metric"]].summary(result)
