"""Classification accuracy of a GPT2ForSequenceClassification (SST-2 and other text_classification sets).

The model pools the last real token of each row (from the attention mask, as MindFormers' GPT-2
classifier does), so right-padded data from `gpt2_ascend.data.txtcls` evaluates as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.loader import integer_column
from ..kv_cache import eval_mode
from .perplexity import _autocast, _model_device, _model_dtype, batches

REQUIRED_KEYS = ("input_ids", "attention_mask", "labels")


def classification_accuracy(model, data: dict, batch_size: int = 32, device=None, precision: str = "auto",
                            progress=False, stop=None) -> dict:
    """Accuracy of `model` on data = dict(input_ids (N, T), attention_mask (N, T), labels (N,)).

    Returns dict(accuracy, correct, total, per_class, loss): per_class maps each label id to
    {"total", "correct", "accuracy"}; loss is the mean cross-entropy over examples.
    device: where to run (default: where the model's weights are; the model is moved if they differ).
    progress, stop: as perplexity's (a bar; a signal after a batch ends it: EvaluationStopped).
    """
    input_ids, attention_mask, labels = _arrays(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if device is not None:
        model.to(device)
    device = _model_device(model)
    config = getattr(model, "config", None)
    n_positions = getattr(config, "n_positions", None)
    if n_positions is not None and input_ids.size(1) > n_positions:
        raise ValueError(f"rows of {input_ids.size(1)} tokens are longer than the model's context "
                         f"n_positions={n_positions}; prepare the data with --max_length {n_positions} or less")
    num_labels = getattr(config, "num_labels", None)
    if num_labels is not None and labels.numel() and int(labels.max()) >= num_labels:
        raise ValueError(f"label {int(labels.max())} is out of range for a classifier with num_labels={num_labels}")

    predictions, loss_sum = [], 0.0
    with eval_mode(model), torch.no_grad():
        for start in batches(range(0, labels.numel(), batch_size), progress, "accuracy", stop):
            ids = input_ids[start:start + batch_size].to(device)
            mask = attention_mask[start:start + batch_size].to(device)
            target = labels[start:start + batch_size].to(device)
            with _autocast(device, precision, _model_dtype(model)):
                logits = model(input_ids=ids, attention_mask=mask).logits
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            predictions.append(logits.argmax(-1).cpu())
    predicted = torch.cat(predictions)
    return summarize(predicted, labels, num_labels, loss_sum)


def summarize(predicted: torch.Tensor, labels: torch.Tensor, num_labels: int | None = None,
              loss_sum: float | None = None) -> dict:
    """Accuracy and per-class counts of predictions against labels."""
    hits = predicted == labels
    classes = set(labels.tolist()) | set(range(num_labels or 0))
    per_class = {}
    for c in sorted(classes):
        rows = labels == c
        total, correct = int(rows.sum()), int(hits[rows].sum())
        per_class[c] = dict(total=total, correct=correct, accuracy=correct / total if total else None)
    total = labels.numel()
    correct = int(hits.sum())
    out = dict(accuracy=correct / total, correct=correct, total=total, per_class=per_class)
    if loss_sum is not None:
        out["loss"] = loss_sum / total
    return out


def _arrays(data: dict):
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        present = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"classification data must be a dict with {', '.join(REQUIRED_KEYS)}; got {present}")
    input_ids, attention_mask, labels = (torch.as_tensor(integer_column(data[k], k, "classification data")).long()
                                         for k in REQUIRED_KEYS)  # fractional values refused, not truncated
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         f"must both be (examples, seq_length)")
    if labels.dim() != 1 or labels.numel() != input_ids.size(0):
        raise ValueError(f"labels must be one per example: got {tuple(labels.shape)} for {input_ids.size(0)} examples")
    if labels.numel() == 0:
        raise ValueError("the classification data holds no examples")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class ids >= 0, found {int(labels.min())}")
    return input_ids, attention_mask, labels
