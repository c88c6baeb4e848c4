"""The losses the heads compute: next-token cross-entropy (HF's shifted labels, or targets already shifted), and
the chunked head + cross-entropy that never materialises the (tokens x vocab) logits, in training (with its
gradients) and in evaluation (per-token losses)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weight[:vocab].T, targets), chunk by chunk over the tokens.

    The forward pass also computes the gradients (softmax - one_hot is the logits' gradient), so no chunk's
    logits outlive the chunk: the (tokens x vocab) fp32 logits of the plain path never exist. The matmuls
    run in the input dtype (bf16 under autocast), the softmax in fp32. They use every row of the weight,
    the internal vocab padding included (50304 = 64 x 786, not 50257): aligned widths keep the GPU's fast
    GEMM kernels; the padding columns get -inf logits, so they take no probability and no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_size, weight_grad):
        n = hidden.size(0)
        w = weight.to(hidden.dtype)
        valid = targets != -100
        count = valid.sum().clamp(min=1)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        # a frozen head (LoRA) needs no weight gradient: skip its matmul and its fp32 buffer
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if weight_grad else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            keep = valid[start:start + chunk_size]
            logits = (h @ w.t()).float()
            if weight.size(0) > vocab_size:
                logits[:, vocab_size:] = -math.inf  # padding rows are never a prediction
            logp = torch.log_softmax(logits, dim=-1)
            safe_t = t.clamp(min=0)
            loss -= logp.gather(1, safe_t[:, None]).squeeze(1).masked_fill(~keep, 0.0).sum()
            grad = logp.exp_()  # softmax
            grad[torch.arange(grad.size(0), device=grad.device), safe_t] -= 1.0
            grad.mul_(keep[:, None].float())
            grad = grad.to(h.dtype)
            grad_hidden[start:start + chunk_size] = grad @ w
            if weight_grad and grad.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), h)  # in place: no (vocab x C) temporary per chunk
            elif weight_grad:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        # in place (one backward per forward: a second one would find the saved tensor modified, and say so)
        grad_w = grad_weight.mul_(scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_hidden * scale.to(grad_hidden.dtype), grad_w, None, None, None, None


def chunked_linear_cross_entropy(hidden, weight, targets, vocab_size: int, chunk_size: int):
    """Mean next-token loss from the final hidden states, without materialising all logits."""
    h = hidden.reshape(-1, hidden.size(-1))
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets.reshape(-1).to(h.device), vocab_size, chunk_size,
                                            weight.requires_grad)


# Tokens per block of evaluation's logits: its rows keep the head's matmul efficient (32 rows ran 1.9x slower
# than a whole batch's on 2 CPU cores) while the (rows x vocab) block stays small.
EVAL_CHUNK_TOKENS = 256


def chunked_token_nll(hidden, weight, targets, vocab_size: int, chunk_size: int = EVAL_CHUNK_TOKENS,
                      workspace: dict | None = None) -> torch.Tensor:
    """Per-token next-token losses (targets' shape, fp32) of `hidden` (..., C) under the head weight[:vocab_size],
    without the (tokens x vocab) logits: chunk_size tokens at a time, through the plain path's kernels (matmul,
    log-softmax, the target's entry), so the same numbers. For evaluation (no gradient); the matmul runs in the
    autocast dtype if any, the softmax in fp32.
    workspace: a dict the caller keeps across calls, holding the two (chunk x vocab) fp32 buffers, so that batch
    after batch writes into the same memory (the plain path's fresh 100 MB temporaries spent a third of their
    time in page faults on CPU)."""
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1, 1).to(h.device)
    w = weight[:vocab_size]  # the internal padding rows are never a prediction
    logits, log_probs = _logits_buffers(workspace if workspace is not None else {}, chunk_size, vocab_size, h.device)
    nll = torch.empty(t.size(0), dtype=torch.float32, device=h.device)
    for start in range(0, h.size(0), chunk_size):
        h_rows = h[start:start + chunk_size]
        n = h_rows.size(0)
        _head_logits(h_rows, w, out=logits[:n])
        torch.log_softmax(logits[:n], dim=1, out=log_probs[:n])
        torch.neg(log_probs[:n].gather(1, t[start:start + n]).squeeze(1), out=nll[start:start + n])
    return nll.view(targets.shape)


def _logits_buffers(workspace: dict, rows: int, vocab_size: int, device):
    key = (rows, vocab_size, device)
    if workspace.get("key") != key:
        workspace.update(key=key, buffers=[torch.empty(rows, vocab_size, device=device) for _ in range(2)])
    return workspace["buffers"]


def _head_logits(h, w, out):
    """h @ w.T written into the fp32 buffer `out` (computed in the autocast / weight dtype first if not fp32)."""
    if h.dtype == w.dtype == out.dtype and not torch.is_autocast_enabled(h.device.type):
        return torch.mm(h, w.t(), out=out)
    return out.copy_(h @ w.t())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at t predict labels at t+1; -100 is ignored. num_items_in_batch: as
    transformers' Trainer passes it (next_token_loss)."""
    return next_token_loss(logits[:, :-1], labels[:, 1:], num_items_in_batch)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) that are already the next token of each
    position (nanoGPT's form, the trainer's); -100 is ignored.

    num_items_in_batch: the number of predicted tokens in the whole batch of a gradient-accumulation step, as
    transformers' Trainer counts and passes it; the loss is then this micro-batch's sum over that number
    (transformers' fixed_cross_entropy), so the accumulated gradients are those of the whole batch's mean."""
    return cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), num_items_in_batch, ignore=-100)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy of a classifier's logits (B, num_labels) against labels (B,); num_items_in_batch: the
    number of labelled rows of the accumulated batch (next_token_loss)."""
    return cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), num_items_in_batch)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None, ignore: int = -100):
    """fp32 cross-entropy: the mean over the targets, or their sum over num_items_in_batch."""
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets.to(logits.device), ignore_index=ignore)
    total = F.cross_entropy(logits.float(), targets.to(logits.device), ignore_index=ignore, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)
