"""Language-model perplexity over a token stream, with three protocols.

- "token" (default): non-overlapping blocks of `seq_length` tokens; each block predicts its last
  seq_length-1 tokens; PPL = exp(total NLL / number of predicted tokens). A trailing partial block is
  dropped, as MindFormers' data preparation does.
- "mindformers": MindFormers' PerplexityMetric on the same blocks: the mean over batches of each batch's
  mean token loss, PPL = exp of that. It differs from "token" only when batches differ in size (the last
  one), and it is what MindFormers' published numbers (25.55 / 10.49) mean.
- stride S: HF's sliding-window recipe over the stream: windows of `seq_length` tokens start every S
  tokens and each token is scored once, in the first window that holds it with context, so every scored
  token sees at least seq_length - S earlier tokens (all of them near the start). Sums are per token.
"""
from __future__ import annotations

import contextlib
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..kv_cache import eval_mode
from ..lora import unwrap_model
from ..losses import chunked_token_nll
from ..model import GPT2LMHeadModel

PROTOCOLS = ("token", "mindformers")


def perplexity(model, token_ids, seq_length: int, batch_size: int = 8, stride: int | None = None,
               protocol: str = "token", precision: str = "auto", progress=False, stop=None) -> dict:
    """Perplexity of `model` (anything whose forward(input_ids) returns `.logits`) on `token_ids`.

    token_ids: 1-D token stream or 2-D (blocks, seq_length) array / tensor. With `stride`, 2-D blocks
    are read as one stream (packed blocks are consecutive text).
    precision: "auto" (bf16 autocast on GPU / NPU, fp32 on CPU), "fp32", "bf16" or "fp16".
    progress: a bar (True, or the bar's settings as a dict: progress.py). stop: polled after each batch; a signal
    number from it ends the evaluation there (EvaluationStopped).
    Returns dict(loss, ppl, tokens) plus the protocol's settings.
    """
    tokens = _as_long_tensor(token_ids)
    _check_args(model, tokens, seq_length, batch_size, stride, protocol)
    with eval_mode(model), torch.no_grad():
        if stride is not None:
            nll, count = _sliding_window_nll(model, tokens.reshape(-1), seq_length, stride, batch_size,
                                             precision, progress, stop)
            loss = nll / count
            settings = dict(protocol="stride", stride=stride)
        else:
            blocks = _blocks(tokens, seq_length)
            batch_losses, count = _block_losses(model, blocks, batch_size, precision, progress, stop)
            if protocol == "mindformers":
                loss = sum(m for m, _ in batch_losses) / len(batch_losses)
            else:
                loss = sum(s for _, s in batch_losses) / count
            settings = dict(protocol=protocol, blocks=int(blocks.size(0)))
    return dict(loss=float(loss), ppl=_safe_exp(loss), tokens=int(count), seq_length=seq_length, **settings)


# ---------------------------------------------------------------------------------------------
# the protocols
# ---------------------------------------------------------------------------------------------
def _block_losses(model, blocks, batch_size, precision, progress, stop=None):
    """[(mean loss, summed loss)] per batch of blocks, and the number of predicted tokens."""
    out, count, workspace = [], 0, {}
    for start in batches(range(0, blocks.size(0), batch_size), progress, "perplexity", stop):
        batch = blocks[start:start + batch_size]
        nll = token_nll(model, batch, precision, workspace)  # (B, T-1)
        out.append((nll.mean().item(), nll.sum().item()))
        count += nll.numel()
    return out, count


def _sliding_window_nll(model, stream, seq_length, stride, batch_size, precision, progress, stop=None):
    """Total NLL and token count, each token from position 1 on scored exactly once."""
    n = stream.numel()
    windows = []  # (begin, end, first scored position)
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seq_length, n)
        first = max(prev_end, begin + 1)  # the window's own first token has no context inside it
        if end > first:
            windows.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    total, count, workspace = 0.0, 0, {}
    full = [w for w in windows if w[1] - w[0] == seq_length]
    short = [w for w in windows if w[1] - w[0] != seq_length]  # at most one, at the end of the stream
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in short]
    for group in batches(groups, progress, "perplexity", stop):
        batch = torch.stack([stream[b:e] for b, e, _ in group])
        nll = token_nll(model, batch, precision, workspace)  # nll[:, j] scores position begin + j + 1
        for row, (begin, end, first) in enumerate(group):
            scored = nll[row, first - begin - 1:end - begin - 1]
            total += scored.double().sum().item()
            count += scored.numel()
    return total, count


def token_nll(model, input_ids: torch.Tensor, precision: str = "auto", workspace: dict | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T-1) in fp32: logits at t scored against token t+1. Our language
    model scores its final hidden states chunk by chunk (losses.chunked_token_nll: no (B, T, vocab) logits;
    `workspace`, a dict kept across calls, lets every batch reuse its buffers); any other model (transformers',
    a wrapped or sharded one) through its logits."""
    device = _model_device(model)
    input_ids = input_ids.to(device)
    targets = input_ids[:, 1:]
    lm = _chunkable_language_model(model)
    with _autocast(device, precision, _model_dtype(model)):
        if lm is not None:
            hidden = lm.transformer(input_ids=input_ids).last_hidden_state[:, :-1]
            return chunked_token_nll(hidden, lm.lm_head.weight, targets, lm.config.vocab_size, workspace=workspace)
        logits = model(input_ids=input_ids).logits
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)


def _chunkable_language_model(model):
    """Our GPT2LMHeadModel (inside a peft wrapper or not) when its body and plain head can be run directly:
    not a pipeline stage, no adapted head, no hooks that its forward would run, no sharded (DTensor) parameter
    (FSDP and tensor parallel gather them in hooks). None otherwise."""
    lm = unwrap_model(model)
    head = getattr(lm, "lm_head", None)
    if not (isinstance(lm, GPT2LMHeadModel) and type(head) is torch.nn.Linear and lm.pipeline_stage is None):
        return None
    if lm._forward_hooks or lm._forward_pre_hooks or any(_is_dtensor(p) for p in lm.parameters()):
        return None
    return lm


def _is_dtensor(tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")  # never imported: no DTensor exists
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_long_tensor(token_ids) -> torch.Tensor:
    if isinstance(token_ids, np.ndarray):
        token_ids = torch.from_numpy(np.array(token_ids, dtype=np.int64))  # a copy: memory-mapped files are read-only
    elif not isinstance(token_ids, torch.Tensor):
        token_ids = torch.as_tensor(token_ids)
    if token_ids.is_floating_point() or token_ids.is_complex():
        raise ValueError(f"token_ids must hold integer token ids, got dtype {token_ids.dtype}")
    return token_ids.long()


def _check_args(model, tokens, seq_length, batch_size, stride, protocol):
    if tokens.dim() not in (1, 2):
        raise ValueError(f"token_ids must be a 1-D token stream or 2-D (blocks, seq_length), got shape "
                         f"{tuple(tokens.shape)}")
    if not isinstance(seq_length, int) or seq_length < 2:
        raise ValueError(f"seq_length must be an integer >= 2 (a block predicts seq_length-1 tokens), got {seq_length!r}")
    n_positions = getattr(getattr(model, "config", None), "n_positions", None)
    if n_positions is not None and seq_length > n_positions:
        raise ValueError(f"seq_length {seq_length} is longer than the model's context n_positions={n_positions}; "
                         f"pass --seq_length {n_positions} or less")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if stride is not None:
        if protocol != "token":
            raise ValueError("--stride is a per-token protocol of its own; use it with protocol 'token'")
        if not isinstance(stride, int) or not 1 <= stride <= seq_length:
            raise ValueError(f"stride must be an integer in [1, seq_length={seq_length}], got {stride!r}")
        if tokens.numel() < 2:
            raise ValueError("token_ids holds fewer than 2 tokens: nothing to score")
    elif tokens.dim() == 2 and tokens.size(1) != seq_length:
        raise ValueError(f"token blocks are {tokens.size(1)} tokens wide but seq_length is {seq_length}; "
                         f"prepare the data with max_length {seq_length} or pass --seq_length {tokens.size(1)}")
    elif tokens.dim() == 1 and tokens.numel() < seq_length:
        raise ValueError(f"the token stream holds {tokens.numel()} tokens, fewer than one block of "
                         f"seq_length={seq_length}; use a smaller --seq_length or more data")
    elif tokens.dim() == 2 and tokens.size(0) == 0:
        raise ValueError("token_ids holds no blocks: nothing to evaluate")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise ValueError(f"token ids must be in [0, {vocab}) for this model, found {int(tokens.min())}..{int(tokens.max())}; "
                         f"was the data prepared with another tokenizer?")


def _blocks(tokens, seq_length):
    """Non-overlapping blocks; a trailing partial block is dropped."""
    if tokens.dim() == 2:
        return tokens
    n = tokens.numel() // seq_length
    return tokens[: n * seq_length].view(n, seq_length)


def _safe_exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _autocast(device: torch.device, precision: str, param_dtype: torch.dtype):
    """bf16/fp16 autocast on accelerators; CPU runs in the weights' own dtype."""
    if precision == "auto":
        precision = "bf16" if device.type in ("cuda", "npu") and param_dtype == torch.float32 else "fp32"
    from ..device import autocast, autocast_dtype
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return autocast(device, dtype)




class EvaluationStopped(Exception):
    """An evaluation ended early by a signal (SIGINT / SIGTERM) that its `stop` reported: a training run then saves
    its step and stops, as its loop does between steps (train/interrupt.py)."""

    def __init__(self, signum: int, done: int, total: int):
        super().__init__(f"evaluation stopped by signal {signum} after {done} of {total} batches")
        self.signum, self.done, self.total = signum, done, total


def batches(iterable, progress, desc: str, stop=None):
    """The batches of an evaluation, one by one: with the one progress bar (progress True, or the bar's settings as a
    dict: desc, leave, ...), and with stop() polled after each batch (a signal number ends it: EvaluationStopped)."""
    items = list(iterable)
    if progress:
        from ..progress import progress_bar
        settings = {"desc": desc, "unit": "batch", **(progress if isinstance(progress, dict) else {})}  # (its own win)
        shown = progress_bar(items, **settings)
    else:
        shown = items
    try:
        for done, item in enumerate(shown, 1):
            yield item
            signum = stop() if stop is not None and done < len(items) else 0  # (after the last: it is complete)
            if signum:
                raise EvaluationStopped(signum, done, len(items))
    finally:
        if progress:
            shown.close()
