"""The losses the heads compute: next-token cross-entropy (HF's shifted labels, or targets already shifted), and
the chunked head + cross-entropy that never materialises the (tokens x vocab) logits in training."""
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
            if weight_grad:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        grad_w = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_hidden * scale.to(grad_hidden.dtype), grad_w, None, None, None, None


def chunked_linear_cross_entropy(hidden, weight, targets, vocab_size: int, chunk_size: int):
    """Mean next-token loss from the final hidden states, without materialising all logits."""
    h = hidden.reshape(-1, hidden.size(-1))
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets.reshape(-1).to(h.device), vocab_size, chunk_size,
                                            weight.requires_grad)


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
