"""What differs per device: attention kernels and gelu variants.

Every function takes plain tensors and picks its kernel from the tensor's device, so the model code
stays the same on CPU, CUDA and NPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import device as dev

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_1_OVER_2 = math.sqrt(0.5)


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def gelu_new_explicit(x: torch.Tensor) -> torch.Tensor:
    """HF's NewGELUActivation written out (tanh approximation). Used where F.gelu's `approximate`
    argument is not honoured (Ascend's F.gelu ignores it)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def fast_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """MindSpore's fast_gelu = x * sigmoid(1.702 x) (HF's quick_gelu)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_explicit(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU written out, for NPU where F.gelu computes the tanh form whatever `approximate` says."""
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT_1_OVER_2))


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    npu = dev.is_npu_tensor(x)
    if name == "gelu_new":
        return gelu_new_explicit(x) if npu else F.gelu(x, approximate="tanh")
    if name == "fast_gelu":
        return fast_gelu(x)
    if name == "gelu":
        return gelu_explicit(x) if npu else F.gelu(x)
    raise ValueError(f"unknown activation {name!r}")


def fast_gelu(x: torch.Tensor) -> torch.Tensor:
    if dev.is_npu_tensor(x):
        from .npu_ops import fast_gelu_kernel
        kernel = fast_gelu_kernel(x)  # torch_npu's fused FastGelu, where it gives the gradient training needs
        if kernel is not None:
            return kernel(x)
    return fast_gelu_reference(x)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def resolve_attn_implementation(impl: str, device_type: str) -> str:
    """'auto' -> the fast kernel of the device: npu_fusion_attention on NPU, SDPA elsewhere."""
    if impl == "auto":
        return "npu" if device_type == "npu" else "sdpa"
    if impl == "npu" and device_type != "npu":
        # The NPU kernel takes NPU tensors only; tests swap in a reference torch_npu that runs on CPU.
        if not dev.npu_reference_installed():
            raise RuntimeError("attn_implementation='npu' needs tensors on an NPU device: "
                               "move the model with .to('npu') or use attn_implementation='auto'")
    return impl


def attention(q, k, v, *, mask=None, is_causal=False, dropout_p=0.0, scale=None, impl="sdpa"):
    """Scaled dot-product attention over (B, H, T, D) tensors.

    mask: optional boolean (B, 1|H, Tq, Tk), True = may attend (causality already folded in).
    is_causal: only used when mask is None; means square causal attention.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    if impl == "sdpa" and _decode_step_in_a_cpu_graph(q):
        impl = "eager"
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal and mask is None, scale=scale)
    if impl == "eager":
        return eager_attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale)
    if impl == "npu":
        from .npu_ops import npu_attention
        return npu_attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale)
    raise ValueError(f"unknown attention implementation {impl!r}")


def _decode_step_in_a_cpu_graph(q) -> bool:
    """One query per row (a decoding step) in a graph torch.compile builds for the CPU: there the explicit form's
    two small products and softmax become part of the graph's fused kernels, while SDPA's CPU kernel stays a call
    of its own per layer (measured: 9% of a compiled GPT-2 small decoding step's CPU time, 85 us per layer)."""
    return q.size(-2) == 1 and q.device.type == "cpu" and torch.compiler.is_compiling()


def eager_attention(q, k, v, *, mask=None, is_causal=False, dropout_p=0.0, scale=None, return_weights=False):
    """Explicit softmax attention, as in HF's eager path (masked scores set to the dtype's minimum,
    so a fully masked row gives a uniform distribution instead of NaN). return_weights: also return the
    (B, H, Tq, Tk) attention weights, after dropout as HF returns them (output_attentions)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None and is_causal:
        tq, tk = q.size(-2), k.size(-2)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v)
    return (out, probs) if return_weights else out


# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------
def adamw(param_groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, device_type: str = "cpu"):
    """The fastest AdamW the device has, with the same groups and hyper-parameters everywhere:
    torch_npu's NpuFusedAdamW on NPU (torch's fused AdamW where its rules exclude it: npu_ops.adamw), torch's
    fused kernel on GPU and on CPU (one pass over each tensor instead of the foreach path's dozen: 2.3-4.3x
    faster on GPT-2 small on CPU, docs/performance.md)."""
    if device_type == "npu":
        from .npu_ops import adamw as npu_adamw
        return npu_adamw(param_groups, lr=lr, betas=betas, eps=eps)
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=True)
    if device_type == "cpu":
        # Under an fp16 GradScaler a fused optimizer takes the overflow check into its kernel and runs step()
        # even for a skipped update, so its step hooks (the trainer's update count, MindSpore's step count)
        # would count it. On CPU the check costs no device sync: let the scaler skip step() itself.
        optimizer._step_supports_amp_scaling = False
    return optimizer
