"""The one place that knows devices: cpu / cuda / npu selection, the torch_npu import guard,
distributed backend, autocast settings, RNG state, synchronisation and memory stats.

torch_npu (Ascend's PyTorch extension, `pip install '.[npu]'`) is imported here and nowhere else,
lazily and only when present: without it `auto` never picks npu and `--device npu` fails with one
line that says how to install it. The NPU namespace is taken from the module (`torch_npu.npu`, which
the real package also installs as `torch.npu`) so a test-only reference module can stand in for it.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import torch

NPU_INSTALL_HINT = "install Ascend's torch_npu matching your CANN and PyTorch (pip install '.[npu]')"
_npu_module = None
_npu_initialised_for = None  # the torch_npu module init_npu() last configured


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
    try:
        return bool(mod.npu.is_available())
    except Exception:  # a broken driver/CANN install reads as "no NPU", never as a crash in `auto`
        return False


def npu_reference_installed() -> bool:
    """True when the installed torch_npu is the test-only reference of its documented semantics,
    whose kernels run on CPU tensors (tests/npu_reference)."""
    mod = torch_npu(required=False)
    return mod is not None and bool(getattr(mod, "IS_REFERENCE", False))


def npu_op_has_backward(op: str) -> bool:
    """Whether the installed torch_npu registers a backward for `torch.ops.npu.<op>`. op-plugin turns each
    entry of its derivatives.yaml into a kernel at the AutogradPrivateUse1 dispatch key; an op without one
    reaches torch_npu's autograd fallback (torch_npu/csrc/aten/VariableFallbackKernel.cpp), which warns
    once at backward and passes no gradient. Asked of the dispatcher, so it holds for any release or build."""
    torch_npu()  # loads the npu:: operators
    try:
        return any(torch._C._dispatch_has_kernel_for_dispatch_key(f"npu::{op}", key)
                   for key in ("AutogradPrivateUse1", "Autograd", "CompositeImplicitAutograd"))
    except RuntimeError:  # this release has no such operator at all
        return False


def require_compile_backend(device_type: str):
    """torch.compile (inductor) on NPU needs the code generator torch_npu registers when its `_inductor`
    package is imported (torch_npu >= 2.6.0, experimental, Triton kernels through triton-ascend). Without
    it, fail here in one line instead of deep inside the first compiled step."""
    if device_type != "npu":
        return
    mod = torch_npu()
    try:
        importlib.import_module("torch_npu._inductor")
    except ImportError as e:
        raise RuntimeError(f"runner_config.compile needs torch_npu's inductor backend on NPU (torch_npu._inductor: "
                           f"torch_npu >= 2.6.0 with triton-ascend), which torch_npu "
                           f"{getattr(mod, '__version__', '?')} cannot load ({e}): set runner_config.compile: "
                           f"false") from None
    # a fact about the installation: compiled code takes it as a constant instead of breaking the graph on it
    torch.compiler.assume_constant_result(npu_op_has_backward)


def grad_scaler(device_type: str, sharded: bool = False, **settings):
    """Dynamic fp16 loss scaling; `sharded`: the distributed one, whose inf/nan check is all-reduced so every
    rank skips the same steps. On NPU torch_npu's own classes (torch_npu/npu/amp): its sharded scaler
    also replaces torch's `ShardedGradScaler` name on import, and its constructor takes no device argument
    before 26.1.0 and `device` first from 26.1.0 on, so it is called with keywords only."""
    if device_type == "npu":
        amp = torch_npu().npu.amp
        if not sharded:
            return amp.GradScaler(**settings)
        return amp.sharded_grad_scaler._ShardedGradScaler(**settings)
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device=device_type, **settings)
    return torch.amp.GradScaler(device_type, **settings)


def is_npu_tensor(x: torch.Tensor) -> bool:
    """Whether `x` lives on an NPU, i.e. whether the NPU kernels apply (tests patch this to run the
    NPU code path on CPU tensors with the reference torch_npu)."""
    return x.device.type == "npu"


def _npu_namespace():
    return torch_npu().npu


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks npu > cuda > cpu; explicit names are checked and fail with one line (a torch.device is taken
    as it is)."""
    if isinstance(name, torch.device):
        return name
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
    """One-time NPU setup per process: binary (prebuilt) operator kernels instead of compiling one
    per input shape. Atlas A2 already defaults to jit_compile=False; the older training series does
    not, and per-shape compilation makes every new sequence length or batch size stall."""
    global _npu_initialised_for
    mod = torch_npu()
    if _npu_initialised_for is mod:
        return
    set_compile_mode = getattr(mod.npu, "set_compile_mode", None)
    if set_compile_mode is not None:
        set_compile_mode(jit_compile=False)
    _npu_initialised_for = mod


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
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


# ---------------------------------------------------------------------------------------------
# free memory (budget.py compares what is about to be built with it)
# ---------------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes this process may still allocate on `device`, where that number comes from), or None when it cannot
    be read (the budget check then passes). Accelerators: the driver's free bytes (mem_get_info) plus what this
    process's caching allocator holds unused; CPU: cpu_available_memory()."""
    if device.type in ("cuda", "npu"):
        space = torch.cuda if device.type == "cuda" else _npu_namespace()
        try:
            free, _ = space.mem_get_info(device)
            cached = space.memory_reserved(device) - space.memory_allocated(device)
        except (RuntimeError, AttributeError, AssertionError):
            return None
        return int(free + cached), f"free on {device_name(device)}, by mem_get_info"
    if device.type == "cpu":
        return cpu_available_memory()
    return None  # meta, mps: nothing to compare with


def cpu_available_memory() -> tuple[int, str] | None:
    """The smaller of the kernel's MemAvailable and this process's cgroup limit minus its usage (what a container
    may still take before the kernel stops it), with where it comes from."""
    found = []
    meminfo = _read_meminfo()
    if meminfo is not None:
        found.append((meminfo, "MemAvailable in /proc/meminfo"))
    cgroup = _cgroup_room()
    if cgroup is not None:
        found.append(cgroup)
    return min(found) if found else None


def _read_meminfo() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> tuple[int, str] | None:
    """cgroup v2 memory.max - memory.current, or v1 memory.limit_in_bytes - memory.usage_in_bytes, of this
    process's own cgroup; None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        for folder in _cgroup_folders():
            try:
                with open(f"{folder}/{limit_file}", encoding="ascii") as f:
                    limit = f.read().strip()
                with open(f"{folder}/{usage_file}", encoding="ascii") as f:
                    usage = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 "no limit" is a huge number
                continue
            return max(0, int(limit) - usage), f"the cgroup limit {folder}/{limit_file} minus its usage"
    return None


def _cgroup_folders() -> list[str]:
    """This process's cgroup folders (v2 unified, v1 memory controller), then the mount root (inside a container
    the process's own cgroup is usually mounted there)."""
    folders = []
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    folders.append("/sys/fs/cgroup" + path)
                elif "memory" in controllers.split(","):
                    folders.append("/sys/fs/cgroup/memory" + path)
    except (OSError, ValueError):
        pass
    return folders + ["/sys/fs/cgroup", "/sys/fs/cgroup/memory"]


@contextlib.contextmanager
def on_meta_device():
    """Build modules on the meta device (shapes, no memory) for weights that are adopted or sharded next, without
    torch's layers drawing their own init there: a random init on meta tensors goes through torch's Python
    reference kernels, whose first use imports torch._dynamo (1-3 s before a loaded model's first result)."""
    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
    saved = [layer.reset_parameters for layer in layers]
    for layer in layers:
        layer.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        for layer, reset in zip(layers, saved):
            layer.reset_parameters = reset
