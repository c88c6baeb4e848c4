"""The memory budget: what a model, an adapter or a buffer will take, computed from its config before anything is
allocated, and compared with what the target device has free. One check for every builder:

    require_memory(nbytes, what, device, fix)     MemoryBudgetError (one line) when nbytes cannot fit
    model_bytes(config, bytes_per_parameter)      a model's parameters x bytes (parameter_count: exact)
    require_model_memory(config, device, ...)     the loaders (hf.load_pretrained, loading.checkpoint_state)

Its callers: the loaders (before a state dict is read or a module built), the trainer's model build (weights,
gradients and AdamW states: parallel/memory.py's estimate per device), lora.apply_lora / load_adapter (the adapter's
matrices) and KVCache.static (generation's cache). What is compared is a lower bound (parameters and buffers, no
activations or allocator slack), so a refusal is certain and a run that fits is never refused; a model that passes
may still run out of memory in its activations.

Free memory (device.available_memory): on the CPU the smaller of /proc/meminfo's MemAvailable and the cgroup's
limit minus its usage (a container's limit is what the kernel enforces); CUDA / NPU: mem_get_info's free bytes
plus what this process's caching allocator holds unused. Where none can be read the check passes.
"""
from __future__ import annotations

import torch

from .config import GPT2Config
from .device import available_memory
from .fileio import human_bytes


class MemoryBudgetError(ValueError):
    """What was to be built does not fit in the target device's free memory (message: one line)."""


def block_parameter_split(config: GPT2Config) -> tuple[int, int]:
    """(parameters of one block that tensor parallel splits, those it keeps whole): the matmul weights with their
    column-parallel biases (c_attn's, c_fc's), and the two layer norms with the row-parallel biases (c_proj's)."""
    h, inner = config.n_embd, config.inner_dim
    split = 4 * h * h + 2 * h * inner + 3 * h + inner
    whole = 2 * 2 * h + 2 * h
    return split, whole


def parameter_count(config: GPT2Config, head_rows: int | None = None) -> int:
    """The parameters a model of `config` holds, counted as torch allocates them (the vocab padding rows
    included). head_rows: a head's output rows when it is not the tied LM head (a classifier's num_labels, or an
    untied LM head's padded vocab)."""
    split, whole = block_parameter_split(config)
    h = config.n_embd
    embeddings = config.padded_vocab_size * h + config.n_positions * h + 2 * h  # wte, wpe, ln_f
    if head_rows is None and not config.tie_word_embeddings:
        head_rows = config.padded_vocab_size
    return embeddings + config.n_layer * (split + whole) + (head_rows or 0) * h


def model_bytes(config: GPT2Config, bytes_per_parameter: float, head_rows: int | None = None) -> int:
    return int(parameter_count(config, head_rows) * bytes_per_parameter)


def dtype_bytes(dtype: torch.dtype | None, default: int = 4) -> int:
    """Bytes per element of a torch dtype; default when it is not known yet (None)."""
    return default if dtype is None else torch.empty((), dtype=dtype).element_size()


def shape_of(config: GPT2Config) -> str:
    """The sizes that make a model big, as config.json names them."""
    return (f"n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
            f"n_positions={config.n_positions}")


def require_memory(nbytes: int, what: str, device=None, fix: str = "") -> None:
    """MemoryBudgetError naming `what` (the value that makes it big) and the bytes, when nbytes exceed the free
    memory of `device` (default: the CPU). Nothing is allocated here."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    free = available_memory(device)
    if free is None:
        return
    available, source = free
    if nbytes <= available:
        return
    raise MemoryBudgetError(f"{what} needs {human_bytes(nbytes)} ({nbytes} bytes) of {device.type} memory, but "
                            f"{human_bytes(available)} ({available} bytes) is available ({source}); nothing was "
                            f"allocated{': ' + fix if fix else ''}")


def require_model_memory(config: GPT2Config, device=None, dtype=None, source: str = "the model",
                         classifier: bool = False) -> None:
    """Before a model of `config` is read or built: its weights (in dtype; a checkpoint's own dtype, not known yet,
    counts 2 bytes, the least a float checkpoint holds) fit the CPU's free memory (a state dict is read there) and
    the target device's. classifier: the head is a classifier's num_labels rows, not the LM head."""
    per = dtype_bytes(dtype, default=2)
    head_rows = config.num_labels if classifier else None
    nbytes = model_bytes(config, per, head_rows)
    what = f"{source} ({shape_of(config)}: {parameter_count(config, head_rows):,} parameters x {per} bytes)"
    for target in dict.fromkeys([torch.device("cpu"), torch.device(device or "cpu")]):
        require_memory(nbytes, what, target, "check the config's sizes, or use a machine with more memory")
