"""The one place that knows devices: cpu / cuda / npu selection, the torch_npu import guard,
distributed backend, autocast settings, RNG state, synchronisation and memory stats."""
from __future__ import annotations

import importlib
import sys

import torch

NPU_INSTALL_HINT = "install Ascend's torch_npu matching your CANN and PyTorch (pip install '.[npu]')"
_npu_module = None
_npu_initialised = False


def torch_npu(required: bool = True):
    """Import torch_npu once, lazily. Returns None when absent unless `required`."""
    global _npu_module
    if _npu_module is not None and sys.modules.get("torch_npu") is _npu_module:
        return _npu_module
    try:
        _npu_module = importlib.import_module("torch_npu")
    except ImportError:
        _npu_module = None
        if required:
            raise RuntimeError(f"device 'npu' requested but torch_npu is not installed: {NPU_INSTALL_HINT}") from None
    return _npu_module


def npu_available() -> bool:
    """True when torch_npu is importable and reports a usable NPU."""
    mod = torch_npu(required=False)
    if mod is None:
        return False
    npu = getattr(torch, "npu", None) or getattr(mod, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:
        return False


def npu_reference_installed() -> bool:
    """True when a torch_npu module is importable (the real one, or a test reference of its semantics)."""
    return torch_npu(required=False) is not None


def _npu_namespace():
    mod = torch_npu()
    return getattr(torch, "npu", None) or mod.npu


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' picks npu > cuda > cpu; explicit names are checked and fail with one line."""
    name = (name or "auto").lower()
    if name == "auto":
        if npu_available():
            name = "npu"
        elif torch.cuda.is_available():
            name = "cuda"
        else:
            name = "cpu"
    kind = name.split(":")[0]
    if kind == "npu":
        if not npu_available():
            torch_npu()  # raises the install hint when the module is missing
            raise RuntimeError("device 'npu' requested but torch_npu finds no NPU: check the driver, CANN "
                               "and ASCEND_RT_VISIBLE_DEVICES")
        init_npu()
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible: use --device cpu")
    elif kind not in ("cpu", "mps", "meta"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda[:N] or npu[:N]")
    return torch.device(name)


def init_npu():
    """One-time NPU setup: prebuilt (binary) kernels instead of per-shape JIT compilation on A2."""
    global _npu_initialised
    if _npu_initialised:
        return
    mod = torch_npu()
    try:
        mod.npu.set_compile_mode(jit_compile=False)
    except AttributeError:
        pass
    _npu_initialised = True


def set_device(device: torch.device):
    """Bind this process to its local accelerator (torchrun gives each rank its own)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    elif device.type == "npu" and device.index is not None:
        _npu_namespace().set_device(device)


def dist_backend(device: torch.device | str) -> str:
    kind = torch.device(device).type
    return {"cuda": "nccl", "npu": "hccl"}.get(kind, "gloo")


def autocast_dtype(device: torch.device | str, precision: str) -> torch.dtype | None:
    """Mixed precision dtype for 'bf16'/'fp16', None for 'fp32'. CPU runs fp32 (autocast there is slow)."""
    if precision in ("fp32", "float32", None):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "float16"):
        return torch.float16
    raise ValueError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for the device (a no-op context when dtype is None)."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "npu":
        state["npu"] = _npu_namespace().get_rng_state(device)
    return state


def set_rng_state(device: torch.device, state: dict):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "npu" and "npu" in state:
        _npu_namespace().set_rng_state(state["npu"], device)


def manual_seed(seed: int, device: torch.device):
    torch.manual_seed(seed)  # also seeds cuda; npu has its own
    if device.type == "npu":
        _npu_namespace().manual_seed(seed)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        _npu_namespace().synchronize(device)


def max_memory_allocated(device: torch.device) -> int:
    """Peak bytes allocated on the accelerator (0 on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "npu":
        return _npu_namespace().max_memory_allocated(device)
    return 0


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "npu":
        _npu_namespace().reset_peak_memory_stats(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return _npu_namespace().get_device_name(device)
    return "cpu"
