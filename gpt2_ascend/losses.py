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


# Evaluation's head works on blocks of (EVAL_CHUNK_TOKENS tokens x EVAL_VOCAB_BLOCK words): 4 MiB of fp32 logits,
# read back while still in cache. Measured on 2 CPU cores (1,024 tokens, GPT-2's vocabulary): 512 x 2,048 scored
# 3.4x as many tokens per second as full logits + cross-entropy at n_embd 64, 1.4x at 768; fewer rows made the
# matmul less efficient, wider blocks left the cache.
EVAL_CHUNK_TOKENS = 512
EVAL_VOCAB_BLOCK = 2048


def chunked_token_nll(hidden, weight, targets, vocab_size: int, chunk_size: int = EVAL_CHUNK_TOKENS,
                      workspace: dict | None = None, vocab_block: int = EVAL_VOCAB_BLOCK) -> torch.Tensor:
    """Per-token next-token losses (targets' shape, fp32) of `hidden` (..., C) under the head weight[:vocab_size],
    never writing out the (tokens x vocab) logits: chunk_size tokens at a time, each against the vocabulary one
    block of vocab_block words at a time (an online log-sum-exp: a running max and sum of exponentials), so a
    block's logits are read back while they are in cache. The same quantity as log-softmax + the target's entry,
    summed in another order: within fp32 rounding of the plain path (1.9e-6 at losses of 10.8 measured). For
    evaluation (no gradient); the matmul runs in the autocast dtype if any, the softmax in fp32.
    workspace: a dict the caller keeps across calls, holding the (chunk x block) fp32 buffer, so that batch after
    batch writes into the same memory."""
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1).to(h.device)
    w = weight[:vocab_size]  # the internal padding rows are never a prediction
    block = _logits_buffer(workspace if workspace is not None else {}, chunk_size, min(vocab_block, vocab_size),
                           h.device)
    nll = torch.empty(t.size(0), dtype=torch.float32, device=h.device)
    for start in range(0, h.size(0), chunk_size):
        rows = h[start:start + chunk_size]
        nll[start:start + rows.size(0)] = _rows_nll(rows, w, t[start:start + chunk_size], block[:rows.size(0)])
    return nll.view(targets.shape)


def _rows_nll(h, w, targets, block):
    """-log softmax(h @ w.T)[target] of each row, over the vocabulary one block at a time."""
    n, width = block.shape
    run_max = torch.full((n,), -math.inf, device=h.device)
    run_sum = torch.zeros(n, device=h.device)
    picked = torch.zeros(n, device=h.device)
    for begin in range(0, w.size(0), width):
        logits = _head_logits(h, w[begin:begin + width], out=block[:, :min(width, w.size(0) - begin)])
        here = targets - begin  # the target's column in this block, if it falls in it
        inside = (here >= 0) & (here < logits.size(1))
        picked = torch.where(inside, logits.gather(1, here.clamp(0, logits.size(1) - 1)[:, None]).squeeze(1), picked)
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        run_sum.mul_(torch.exp(run_max - new_max)).add_(logits.sub_(new_max[:, None]).exp_().sum(dim=1))
        run_max = new_max
    return run_max + run_sum.log() - picked


def _logits_buffer(workspace: dict, rows: int, width: int, device):
    key = (rows, width, device)
    if workspace.get("key") != key:
        workspace.update(key=key, buffer=torch.empty(rows, width, device=device))
    return workspace["buffer"]


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
