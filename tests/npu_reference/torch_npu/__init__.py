"""A test-only stand-in for Ascend's torch_npu, written from its documented API, on CPU tensors.

It computes what the documentation says the NPU kernels compute, in plain differentiable torch, and
it refuses calls that break the documented contract (wrong layout string, head count that does not
match the layout, a mask of the wrong shape or dtype, a causal sparse mode without the compressed
2048x2048 mask, ...), so a test that passes proves the calls our code makes are well-formed, not
only that the numbers agree. Whatever the documentation leaves undefined, the reference poisons
(NaN) instead of guessing, so nothing may rely on it.

Where releases differ it behaves as the release named by `__version__` (set_version(); the facts are
in versions.py): npu_fast_gelu's backward, the _inductor package, _ShardedGradScaler's signature.
The default is 2.7.1, the torch_npu for CANN 8.3.RC1 and the oldest release this project supports.

Sources (Ascend Extension for PyTorch API reference, and Ascend's op-plugin / pytorch repositories):
  npu_fusion_attention  https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html
  npu_fast_gelu         https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000866.html;
                        op-plugin docs/context/torch_npu-npu_fast_gelu.md (7.2.0)
  fast_gelu             op-plugin docs/context/（beta）torch_npu-fast_gelu.md (7.2.0): float16 and float32
  derivatives           op-plugin op_plugin/config/derivatives.yaml, per release (versions.py)
  optim.NpuFusedAdamW   https://hiascend.com/doc_center/source/zh/Pytorch/600/apiref/apilist/ptaoplist_000983.html
  npu.set_compile_mode  https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000610.html
"""
from __future__ import annotations

import torch
import torch.distributed.fsdp.sharded_grad_scaler as _torch_sharded_grad_scaler

from . import npu, optim, versions  # noqa: F401  (torch_npu.npu and torch_npu.optim, as in the real package)

IS_REFERENCE = True
DEFAULT_VERSION = "2.7.1"
__version__ = DEFAULT_VERSION

calls: list = []  # one dict per kernel call, for tests to inspect the arguments our code passed

LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float32 since torch_npu 6.0 (CANN 8.0)
COMPRESSED = 2048
MAX_INT = 2147483647


def emulate_device():
    """Do what the real package does on import to make torch.device("npu") parse: rename PyTorch's
    PrivateUse1 backend to "npu" and register the device module as torch.npu. Irreversible for the
    process (the rename cannot be undone), so only subprocess tests call it."""
    torch.utils.rename_privateuse1_backend("npu")
    if not hasattr(torch, "npu"):
        torch._register_device_module("npu", npu)


def reset():
    """Forget recorded calls and device state, back to the default release (called when the fixture
    installs the module)."""
    calls.clear()
    npu.reset()
    set_version(DEFAULT_VERSION)


def set_version(version: str):
    """Behave as torch_npu `version` (e.g. '2.7.1.post2') where releases differ."""
    global __version__
    versions.parse(version)  # refuses what is not a release number
    __version__ = version
    _register_ops()
    # what every release's torch_npu/__init__.py does on import
    _torch_sharded_grad_scaler.ShardedGradScaler = npu.amp.sharded_grad_scaler._ShardedGradScaler


def uninstall():
    """Undo what importing the module did to torch (the fixture calls this when it removes the module)."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None
    _torch_sharded_grad_scaler.ShardedGradScaler = _TORCH_SHARDED_GRAD_SCALER


# ---------------------------------------------------------------------------------------------
# npu_fusion_attention
# ---------------------------------------------------------------------------------------------
def npu_fusion_attention(query, key, value, head_num, input_layout, *, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=MAX_INT, next_tockens=MAX_INT,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                         sparse_mode=0, gen_mask_parallel=True, sync=False):
    """softmax(Mask(scale * Q K^T, atten_mask)) with Dropout(keep_prob), times V; atten_mask True =
    masked out. Returns (attention_out, softmax_max, softmax_sum, softmax_in, seed, offset, numels).

    Everything after input_layout is keyword-only here: the documented prototype names them, and
    passing them by keyword is what keeps a call correct across torch_npu versions.
    """
    _check_tensors(query, key, value)
    _check_scalars(head_num, input_layout, scale, keep_prob, inner_precise, sparse_mode)
    if padding_mask is not None:
        raise ValueError("padding_mask is not supported by npu_fusion_attention (documented: 暂不支持); "
                         "express padding through atten_mask")
    for name, arg in (("pse", pse), ("prefix", prefix), ("actual_seq_qlen", actual_seq_qlen),
                      ("actual_seq_kvlen", actual_seq_kvlen)):
        if arg is not None:
            raise NotImplementedError(f"the reference does not model {name}")

    head_dim = _head_dim(query, input_layout, head_num)
    q, k, v = (_to_bnsd(t, input_layout, head_dim, name) for t, name in ((query, "query"), (key, "key"), (value, "value")))
    if q.size(1) != head_num:
        raise ValueError(f"head_num={head_num} but the {input_layout} query holds {q.size(1)} heads")
    B, N, Sq, D = q.shape
    Nkv, Skv = k.size(1), k.size(2)
    if k.size(0) != B or N % Nkv != 0 or not 1 <= N <= 256:
        raise ValueError(f"query has {B} batches/{N} heads, key {k.size(0)}/{Nkv}: batches must match, "
                         f"query heads (1..256) must be a multiple of key heads")
    if k.size(3) != D or not 1 <= D <= 768:
        raise ValueError(f"head dim: query {D}, key {k.size(3)}; they must match and lie in 1..768")
    masked = _masked_positions(atten_mask, sparse_mode, pre_tockens, next_tockens, B, N, Sq, Skv, q.device)

    k = k.repeat_interleave(N // Nkv, dim=1)  # GQA: each key/value head serves N/Nkv query heads
    v = v.repeat_interleave(N // Nkv, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if masked is not None:
        scores = scores.masked_fill(masked, torch.finfo(torch.float32).min)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_sum = torch.exp(scores - row_max).sum(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    numels = 0
    if keep_prob < 1.0:
        # the kernel draws its dropout mask from the generator of the tensors' device
        keep = torch.rand(probs.shape, device=probs.device) < keep_prob
        probs = probs * keep / keep_prob
        numels = probs.numel()
    out = torch.matmul(probs, v.float())
    if masked is not None:
        invalid = masked.all(dim=-1, keepdim=True)
        if bool(invalid.any()):
            # Only "invalid row" computation defines such rows (zeros): inner_precise=2, or switched on by
            # the kernel itself for sparse_mode=3 with Sq > Skv. Otherwise: precision loss, i.e. undefined.
            defined = inner_precise == 2 or (sparse_mode == 3 and Sq > Skv)
            out = torch.where(invalid, torch.zeros((), dtype=out.dtype) if defined else torch.tensor(float("nan")), out)
    out = _from_bnsd(out.to(query.dtype), input_layout)

    calls.append(dict(op="npu_fusion_attention", input_layout=input_layout, head_num=head_num, scale=scale,
                      keep_prob=keep_prob, sparse_mode=sparse_mode, inner_precise=inner_precise,
                      mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
                      q_shape=tuple(query.shape), kv_shape=tuple(key.shape)))
    seed, offset = (int(torch.randint(0, 2**31 - 1, ())), 0) if keep_prob < 1.0 else (0, 0)
    softmax_max = row_max.expand(B, N, Sq, 8).contiguous()  # (B, N, Sq, 8) float32, as the kernel stores them
    softmax_sum = row_sum.expand(B, N, Sq, 8).contiguous()
    softmax_in = torch.empty(0, dtype=query.dtype, device=query.device)  # reserved, unused
    return out, softmax_max, softmax_sum, softmax_in, seed, offset, numels


def _check_tensors(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} not supported: use float16, bfloat16 or float32")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes must match, got {tuple(key.shape)} and {tuple(value.shape)}")
    if not query.device == key.device == value.device:
        raise ValueError("query, key and value must be on one device")


def _check_scalars(head_num, input_layout, scale, keep_prob, inner_precise, sparse_mode):
    if not isinstance(head_num, int) or isinstance(head_num, bool) or head_num < 1:
        raise TypeError(f"head_num must be a positive int, got {head_num!r}")
    if input_layout not in LAYOUTS:
        raise ValueError(f"input_layout {input_layout!r} not supported: use one of {', '.join(LAYOUTS)}")
    if input_layout == "TND":
        raise NotImplementedError("the reference does not model the varlen TND layout")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {scale!r}")
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must lie in (0, 1], got {keep_prob}")
    if inner_precise not in (0, 1, 2):
        raise ValueError(f"inner_precise must be 0, 1 or 2, got {inner_precise}")
    if sparse_mode not in range(9):
        raise ValueError(f"sparse_mode must be 0..8, got {sparse_mode}")
    if sparse_mode > 3:
        raise NotImplementedError(f"the reference models sparse_mode 0-3, got {sparse_mode}")


def _head_dim(query, layout, head_num):
    expected_dims = 3 if layout in ("BSH", "SBH") else 4
    if query.dim() != expected_dims:
        raise ValueError(f"query has {query.dim()} dims but layout {layout} needs {expected_dims}")
    if expected_dims == 4:
        return query.size(-1)
    if query.size(-1) % head_num:
        raise ValueError(f"query hidden size {query.size(-1)} is not divisible by head_num={head_num}")
    return query.size(-1) // head_num


def _to_bnsd(t, layout, head_dim, name):
    expected_dims = 3 if layout in ("BSH", "SBH") else 4
    if t.dim() != expected_dims:
        raise ValueError(f"{name} has {t.dim()} dims but layout {layout} needs {expected_dims}")
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    bsh = t if layout == "BSH" else t.transpose(0, 1)
    B, S, H = bsh.shape
    if H % head_dim:
        raise ValueError(f"{name} hidden size {H} is not a multiple of the head dim {head_dim}")
    return bsh.reshape(B, S, H // head_dim, head_dim).transpose(1, 2)


def _from_bnsd(t, layout):
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2).contiguous()
    B, N, S, D = t.shape
    bsh = t.transpose(1, 2).reshape(B, S, N * D)
    return bsh if layout == "BSH" else bsh.transpose(0, 1).contiguous()


def _masked_positions(atten_mask, sparse_mode, pre_tockens, next_tockens, B, N, Sq, Skv, device):
    """Boolean positions to mask, broadcastable to (B, N, Sq, Skv); None = attend everywhere."""
    if atten_mask is None:
        if sparse_mode != 0:
            # documented: without atten_mask the kernel ignores sparse_mode and computes everything,
            # which silently drops causality; a call like this is always a bug
            raise ValueError(f"sparse_mode={sparse_mode} needs its atten_mask (the 2048x2048 compressed "
                             f"mask for modes 2/3); without one the kernel attends to every key")
        return None
    if atten_mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"atten_mask must be bool or uint8 (True/1 = masked out), got {atten_mask.dtype}")
    rows = torch.arange(Sq, device=device)[:, None]
    cols = torch.arange(Skv, device=device)[None, :]
    if sparse_mode in (2, 3):
        expected = torch.ones(COMPRESSED, COMPRESSED, dtype=torch.bool, device=atten_mask.device).triu(1)
        if tuple(atten_mask.shape) != (COMPRESSED, COMPRESSED) or not torch.equal(atten_mask.bool(), expected):
            raise ValueError(f"sparse_mode={sparse_mode} takes the compressed mask triu(ones(2048, 2048), 1), "
                             f"got shape {tuple(atten_mask.shape)}")
        offset = 0 if sparse_mode == 2 else Skv - Sq  # 2: leftUpCausal, 3: rightDownCausal
        return (cols > rows + offset)[None, None]
    allowed = {(Sq, Skv), (1, 1, Sq, Skv), (B, 1, Sq, Skv), (B, N, Sq, Skv)}
    if tuple(atten_mask.shape) not in allowed:
        raise ValueError(f"atten_mask shape {tuple(atten_mask.shape)} is none of SS, 11SS, B1SS, BNSS for "
                         f"B={B}, N={N}, Sq={Sq}, Skv={Skv}")
    masked = atten_mask.bool()
    masked = masked[None, None] if masked.dim() == 2 else masked
    if sparse_mode == 0:  # the pre/next token window (top-left origin) applies on top of the mask
        masked = masked | ((cols > rows + next_tockens) | (rows > cols + pre_tockens))[None, None]
    return masked


# ---------------------------------------------------------------------------------------------
# activations: real dispatcher ops in the `npu` namespace, registered as op-plugin registers them, so
# autograd behaves as on the device. op-plugin turns each derivatives.yaml entry into a kernel at the
# AutogradPrivateUse1 key (torch_npu's codegen: TORCH_LIBRARY_IMPL(npu, AutogradPrivateUse1, m)); an op
# without one reaches torch_npu's autograd fallback (VariableFallbackKernel.cpp), which warns once at
# backward and passes no gradient. The reference registers the same kernel at AutogradCPU too, because
# its tensors are CPU tensors; torch's own CPU fallback warns and passes nothing, as torch_npu's does.
# ---------------------------------------------------------------------------------------------
_library = None
_TORCH_SHARDED_GRAD_SCALER = _torch_sharded_grad_scaler.ShardedGradScaler


def _fast_gelu_formula(x):
    """x / (1 + exp(-1.702 x)) (the A2 formula), written with sigmoid so large negative x do not overflow."""
    return x * torch.sigmoid(1.702 * x)


def _fast_gelu_kernel(x):
    with torch.no_grad():  # a device kernel records nothing for autograd
        return _fast_gelu_formula(x)


class _FastGeluWithBackward(torch.autograd.Function):
    """The autograd kernel derivatives.yaml generates: backward is npu_fast_gelu_backward(grad, self)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _fast_gelu_formula(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))


def _register_ops():
    global _library
    if _library is not None:
        _library._destroy()
    lib = torch.library.Library("npu", "DEF")
    with_backward = ["fast_gelu"]  # since op-plugin 5.0
    if versions.npu_fast_gelu_has_backward(__version__):
        with_backward.append("npu_fast_gelu")
    for name in ("npu_fast_gelu", "fast_gelu"):
        lib.define(f"{name}(Tensor self) -> Tensor")
        lib.impl(name, _fast_gelu_kernel, "CPU")
        if name in with_backward:
            for key in ("AutogradPrivateUse1", "AutogradCPU"):
                lib.impl(name, _FastGeluWithBackward.apply, key)
    _library = lib


def _check_activation_input(op, input, dtypes):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op} takes a Tensor")
    if input.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op} dtype {input.dtype} not supported: documented {names}")
    calls.append(dict(op=op, shape=tuple(input.shape), dtype=input.dtype, requires_grad=input.requires_grad))


def npu_fast_gelu(input):
    """fast_gelu on Atlas A2: x / (1 + exp(-1.702 x)); float16, float32, bfloat16 on A2. A backward only
    from op-plugin 7.3.0 (versions.py); before that a training step gets no gradient through it."""
    _check_activation_input("npu_fast_gelu", input, DTYPES)
    return torch.ops.npu.npu_fast_gelu(input)


def fast_gelu(self):
    """(beta) The same FastGelu kernel with a registered backward in every release; documented for
    float16 and float32 only."""
    _check_activation_input("fast_gelu", self, (torch.float16, torch.float32))
    return torch.ops.npu.fast_gelu(self)


set_version(DEFAULT_VERSION)  # registers the ops and patches torch as the real import does
