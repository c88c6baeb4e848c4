"""What runs on Ascend NPU through torch_npu: the fused flash-attention kernel, fast_gelu, AdamW.

`torch_npu.npu_fusion_attention` (Atlas A2 training series) is called the way Ascend documents it:

- layout "BNSD": our q/k/v are (batch, heads, seq, head_dim) already, so nothing is transposed;
- `head_num` and `scale` are always passed (the kernel's scale defaults to 1, not 1/sqrt(d));
- `keep_prob = 1 - dropout_p` (the kernel's dropout keeps a fraction keep_prob of the weights);
- `atten_mask` is boolean with True = masked OUT, the opposite of SDPA's convention (True = attend);
- causal attention without padding uses the kernel's sparse modes, which need the compressed
  2048x2048 upper-triangular mask: sparse_mode=2 (leftUpCausal) when query and key lengths match,
  sparse_mode=3 (rightDownCausal, queries are the last Sq positions) when a KV cache makes the key
  side longer. Without a mask the kernel ignores sparse_mode and attends to everything;
- with a padding mask: an explicit (B|1, 1|N, Sq, Skv) mask with sparse_mode=0 and the default
  pre/next token window (which covers every position, so it agrees with any mask);
- the kernel returns a 7-tuple (attention_out, softmax_max, softmax_sum, softmax_in, seed, offset,
  numels); the attention output is element 0.

Fully masked query rows: the kernel's result for a row with no visible key is only defined with
inner_precise=2 ("invalid row" computation, slower). We never hand it such a row: rows that see
nothing (queries sitting on left padding) are opened to every key, exactly as the model's own
mask builder and HF's eager path do, so the output is finite and inner_precise stays 0.

Decoding uses this same kernel: one query row against the cached keys is rightDownCausal / no mask.
"""
from __future__ import annotations

import math

import torch

from . import device as dev

COMPRESSED_MASK_SIZE = 2048  # the kernel's sparse modes 2/3/4 take this fixed-size mask
SPARSE_DEFAULT, SPARSE_LEFT_UP_CAUSAL, SPARSE_RIGHT_DOWN_CAUSAL = 0, 2, 3
LAYOUT = "BNSD"

_compressed_masks: dict = {}


def compressed_causal_mask(device) -> torch.Tensor:
    """The 2048x2048 upper-triangular boolean mask (True above the diagonal = masked) that the
    causal sparse modes expect; built once per device."""
    key = str(device)
    if key not in _compressed_masks:
        ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device)
        _compressed_masks[key] = torch.triu(ones, diagonal=1)
    return _compressed_masks[key]


def kernel_mask(mask: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Turn our boolean attend-mask (True = may attend) into the kernel's (True = masked out), with
    fully masked rows opened to every key and a shape the kernel accepts (SS, 11SS, B1SS, BNSS)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"npu attention takes a boolean mask (True = may attend), got {mask.dtype}; "
                         f"convert an additive float mask with `mask == 0`")
    if mask.dim() == 4:
        if (mask.size(0), mask.size(1)) not in ((batch, heads), (batch, 1), (1, 1)):
            mask = mask.expand(batch, mask.size(1), mask.size(2), mask.size(3))
    elif mask.dim() != 2:
        raise ValueError(f"npu attention mask must be (Sq, Skv) or (B|1, 1|N, Sq, Skv), got shape {tuple(mask.shape)}")
    sees_something = mask.any(dim=-1, keepdim=True)
    return (~mask & sees_something).contiguous()


def npu_attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0, scale=None):
    """Scaled dot-product attention over (B, N, S, D) tensors with npu_fusion_attention.

    mask: optional boolean (B|1, 1|N, Sq, Skv), True = may attend (causality already folded in).
    is_causal: used when mask is None; causal with the queries aligned to the END of the keys
    (the usual KV-cache alignment; the same as top-left alignment when Sq == Skv).
    """
    torch_npu = dev.torch_npu()
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.size(2)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    # The kernel requires one dtype for q, k and v (a cache may hold another precision).
    k, v = k.to(q.dtype), v.to(q.dtype)

    atten_mask, sparse_mode = None, SPARSE_DEFAULT
    if mask is not None:
        atten_mask = kernel_mask(mask, batch, heads)
    elif is_causal and q_len > 1:
        if q_len > kv_len:
            raise ValueError(f"causal attention with {q_len} queries but only {kv_len} keys: every query "
                             f"needs at least its own key")
        atten_mask = compressed_causal_mask(q.device)
        sparse_mode = SPARSE_LEFT_UP_CAUSAL if q_len == kv_len else SPARSE_RIGHT_DOWN_CAUSAL
    # (a single query row, causal or not, sees every cached key: no mask at all)

    out = torch_npu.npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), head_num=heads, input_layout=LAYOUT,
        atten_mask=atten_mask, scale=scale, keep_prob=1.0 - dropout_p, sparse_mode=sparse_mode)
    return out[0]


# ---------------------------------------------------------------------------------------------
# fast_gelu
# ---------------------------------------------------------------------------------------------
FAST_GELU_DTYPES = (torch.float16, torch.float32)  # torch_npu.fast_gelu's documented dtypes (no bfloat16)


def fast_gelu_kernel(x: torch.Tensor):
    """The torch_npu op that computes fast_gelu (x * sigmoid(1.702 x), one fused FastGelu kernel) for `x`,
    or None where only the formula written out in torch ops gives a correct result.

    `npu_fast_gelu` (float16/float32/bfloat16 on A2) has a backward only from op-plugin 7.3.0 (torch_npu
    2.6.0.post5, 2.7.1.post2, 2.8.0.post2, 2.9.0); on earlier releases autograd's fallback passes no
    gradient through it, so a training step would leave c_fc and ln_2 without their MLP gradient. It serves
    whenever no gradient is needed, and in training where its backward is registered. Otherwise
    `torch_npu.fast_gelu`, the same kernel with a backward in every release, documented for float16 and
    float32 only; bfloat16 (bf16 autocast) then takes the formula, whose autograd runs through torch's
    sigmoid and mul.
    """
    torch_npu = dev.torch_npu()
    if not (torch.is_grad_enabled() and x.requires_grad) or dev.npu_op_has_backward("npu_fast_gelu"):
        return torch_npu.npu_fast_gelu
    if x.dtype in FAST_GELU_DTYPES and dev.npu_op_has_backward("fast_gelu"):
        return torch_npu.fast_gelu
    return None


# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------
_fused_adamw_classes: dict = {}


def fused_adamw_supported(param_groups) -> bool:
    """NpuFusedAdamW flattens every parameter and gradient into one buffer per dtype at its first step,
    so it takes plain fp32/fp16 tensors only (bf16 raises TypeError; FSDP2's DTensor shards are not
    plain tensors)."""
    params = [p for g in param_groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(type(p.data) is torch.Tensor and p.dtype in (torch.float32, torch.float16) for p in params)


def adamw(param_groups, lr: float, betas, eps: float):
    """torch_npu's NpuFusedAdamW with the given groups, or torch's fused AdamW where its rules exclude it.

    NpuFusedAdamW's documented rule: parameters must not be reallocated while it is in use (build it after
    the model is moved and wrapped; no .cpu()/.to() afterwards). Its fused gradient buffer also means
    gradients must never be set to None: zero_grad(set_to_none=True) raises in torch_npu, so the
    optimizer returned here zeroes in place whatever set_to_none says, and generic training loops
    work unchanged (model.zero_grad(), which sets None, must still not be used on NPU).

    bfloat16 parameters and FSDP2's DTensor shards, which it refuses, get `torch.optim.AdamW(fused=True)`:
    op-plugin registers aten::_fused_adamw_ for the NPU in every release this project supports
    (op_plugin_functions.yaml: `op_api: all_version` from op-plugin 6.0.0, i.e. torch_npu 2.4.0.post2), and
    DTensor dispatches it shard by shard (torch/distributed/tensor/_ops/_pointwise_ops.py).
    """
    param_groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in param_groups]
    if not fused_adamw_supported(param_groups):
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=True)
    return _fused_adamw_class(dev.torch_npu())(param_groups, lr=lr, betas=betas, eps=eps)


def _fused_adamw_class(torch_npu):
    base = torch_npu.optim.NpuFusedAdamW
    if base not in _fused_adamw_classes:
        class FusedAdamW(base):
            def zero_grad(self, set_to_none: bool = False):
                super().zero_grad(set_to_none=False)  # the fused buffers must stay: zero them in place

        FusedAdamW.__name__ = FusedAdamW.__qualname__ = "NpuFusedAdamW"
        _fused_adamw_classes[base] = FusedAdamW
    return _fused_adamw_classes[base]
