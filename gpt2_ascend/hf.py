"""HF GPT-2 checkpoints <-> our modules.

HF stores the four projection weights as Conv1D, [in, out]; ours are nn.Linear, [out, in]. That transpose,
HF's optional `transformer.` prefix, its causal-mask buffers, the tied head and our internal vocab padding
are the whole difference, handled here and nowhere else.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Iterable, Iterator

import torch

from .cli import error_line
from .config import GPT2Config
from .fileio import disk_full_error, fsync_file, is_disk_full, umask, write_json  # noqa: F401  (fsync_file: re-exported)
from .safe_pickle import torch_load

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal masks that old HF versions saved
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")
    return DTYPES[key]


# ---------------------------------------------------------------------------------------------
# name and layout mapping
# ---------------------------------------------------------------------------------------------
def is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D_SUFFIXES)


def normalize_hf_name(name: str) -> str | None:
    """HF key -> our key (None for buffers we do not keep). Accepts keys with or without `transformer.`."""
    if name.endswith(BUFFER_SUFFIXES):
        return None
    if name.startswith(("lm_head.", "score.", "transformer.")):
        return name
    return "transformer." + name


def hf_to_ours(hf_state: dict, config: GPT2Config) -> dict:
    """An HF GPT-2 state dict (any head) -> our names and layouts, vocab padded to config's internal size."""
    ours = {}
    for name, tensor in hf_state.items():
        key = normalize_hf_name(name)
        if key is None:
            continue
        ours[key] = tensor.t().contiguous() if is_conv1d(key) else tensor
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in ours:
            ours[key] = pad_vocab(ours[key], config)
    return ours


def ours_to_hf(state: dict, config: GPT2Config) -> dict:
    """Our state dict -> HF's names and Conv1D layouts, vocab padding removed, tied head dropped."""
    hf = {}
    for key, tensor in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: HF re-ties it from transformer.wte.weight
        if key in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]
        hf[key] = tensor.t().contiguous() if is_conv1d(key) else tensor.contiguous()
    return hf


def pad_vocab(weight: torch.Tensor, config: GPT2Config) -> torch.Tensor:
    rows = config.padded_vocab_size
    if weight.size(0) == rows:
        return weight
    if weight.size(0) != config.vocab_size:
        return weight  # a real shape mismatch; reported by check_state
    padded = weight.new_zeros(rows, weight.size(1))
    padded[: weight.size(0)] = weight
    return padded


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def resolve_model_path(path_or_hub_id: str) -> str:
    """A local directory or file as is; otherwise a hub id, downloaded with huggingface_hub."""
    if os.path.exists(path_or_hub_id):
        return path_or_hub_id
    if path_or_hub_id.startswith((".", "/", "~")) or path_or_hub_id.count("/") > 1 or os.sep + os.sep in path_or_hub_id:
        raise FileNotFoundError(f"model path not found: {path_or_hub_id}")
    return download_from_hub(path_or_hub_id)


def download_from_hub(repo_id: str) -> str:
    """Fetch config, weights and tokenizer files of a hub model (HF_ENDPOINT selects the server)."""
    try:
        from huggingface_hub import snapshot_download
        # endpoint and cache read at call time, so HF_ENDPOINT / HF_HUB_CACHE set after import still count
        return snapshot_download(repo_id, endpoint=os.environ.get("HF_ENDPOINT"),
                                 cache_dir=os.environ.get("HF_HUB_CACHE"), allow_patterns=[
            "config.json", "*.safetensors", SAFE_INDEX, "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "special_tokens_map.json", "adapter_config.json"])
    except Exception as e:  # offline, unknown repo, HTTP error: one line, no traceback of the hub client
        reason = error_line(e)
        raise OSError(f"could not fetch {repo_id!r} from the hub ({type(e).__name__}: {reason}); "
                      f"pass a local directory with config.json and model.safetensors instead") from None


def weight_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory (or a single file), in shard order."""
    if os.path.isfile(path):
        return [path]
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise FileNotFoundError(f"{index_name} names shard {missing[0]} which is not in {path}")
            return [os.path.join(path, s) for s in shards]
    for single in (SAFE_WEIGHTS, BIN_WEIGHTS):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(f"no weights in {path}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}")


def iter_tensors(files: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one file at a time; safetensors are read lazily, tensor by tensor."""
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"cannot read {file}: {e} (corrupt or truncated safetensors file)") from None
        else:
            state = load_torch_file(file)
            if not isinstance(state, dict):
                raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
            yield from state.items()


def load_torch_file(file: str):
    """torch.load with weights_only (never unpickle code: UnsafeFileError), memory-mapped when the file format
    allows; a file that cannot be read is one ValueError line naming it."""
    return torch_load(file, mmap=True)


def read_state_dict(path: str) -> dict:
    return dict(iter_tensors(weight_files(path)))


def load_config(path: str, **overrides) -> GPT2Config:
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {directory or '.'}: an HF GPT-2 directory needs one")
    config = GPT2Config.from_json_file(config_path)
    return config.replace(**overrides) if overrides else config


# ---------------------------------------------------------------------------------------------
# model loading / saving
# ---------------------------------------------------------------------------------------------
def check_state(model: torch.nn.Module, state: dict, source: str, allow_missing=(), ignore=()):
    """Missing, unexpected or misshapen tensors: one error naming the first offender."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    for key in ignore:
        state.pop(key, None)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); "
                         f"is this a GPT-2 checkpoint of the same kind?")
    missing = sorted(set(expected) - set(state) - set(allow_missing))
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} in all)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the config needs "
                             f"{tuple(expected[key])}")


def load_pretrained(cls, path_or_hub_id: str, dtype=None, device=None, **config_overrides):
    """Build `cls` from an HF-format directory, weight file or hub id (see DESIGN.md)."""
    path = resolve_model_path(path_or_hub_id)
    config = load_config(path, **config_overrides)
    state = hf_to_ours(read_state_dict(path), config)
    return model_from_state(cls, config, state, source=path, dtype=dtype, device=device)


def model_from_state(cls, config: GPT2Config, state: dict, source: str, dtype=None, device=None):
    """Build on the meta device and adopt the given tensors, so no memory goes to a throwaway init."""
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = cls(config)
    is_classifier = hasattr(model, "score")
    fresh_head = is_classifier and "score.weight" not in state
    ignore = ["lm_head.weight"] if is_classifier or config.tie_word_embeddings else []
    if not is_classifier:
        ignore.append("score.weight")  # a classifier's base loads as a language model
    check_state(model, state, source, allow_missing=["score.weight"] if fresh_head else [], ignore=ignore)
    if fresh_head:  # an LM checkpoint as the start of a classifier: a new head, as HF does
        head = torch.empty(config.num_labels, config.n_embd)
        torch.nn.init.normal_(head, std=config.initializer_range)
        state["score.weight"] = head
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        state["lm_head.weight"] = state["transformer.wte.weight"]
    target_dtype = dtype or next(iter(state.values())).dtype
    if not target_dtype.is_floating_point:
        target_dtype = torch.float32
    state = {k: v.to(dtype=target_dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.transformer.wte.weight
    if device is not None:
        model.to(device)
    return model.eval()


def atomic_directory(output_dir: str, size: int | None = None):
    """A temporary sibling directory to fill, swapped into place when the `with` block ends without error and
    removed on any failure (the commit's included); a full disk is DiskFullError naming `size` bytes."""
    return _AtomicDir(output_dir, size)


class _AtomicDir:
    def __init__(self, output_dir: str, size: int | None = None):
        self.final = os.path.abspath(output_dir)
        if os.path.exists(self.final) and not os.path.isdir(self.final):
            raise ValueError(f"{output_dir} is a file, not a directory: pass another output directory")
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        self.size = size
        self.tmp = tempfile.mkdtemp(prefix="." + os.path.basename(self.final) + ".tmp-", dir=parent)
        self.umask = umask()
        os.chmod(self.tmp, 0o777 & ~self.umask)  # mkdtemp makes it private; the export is an ordinary folder

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        except BaseException as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if is_disk_full(e):
                raise disk_full_error(os.path.dirname(self.final), self.size, self.final) from None
            raise
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if is_disk_full(exc):
                raise disk_full_error(os.path.dirname(self.final), self.size, self.final) from None
        return False

    def _commit(self):
        for name in os.listdir(self.tmp):
            path = os.path.join(self.tmp, name)
            if os.path.isfile(path):  # some writers use private temp files; give them the usual mode
                os.chmod(path, 0o666 & ~self.umask)
            fsync_file(path)
        if os.path.isdir(self.final):
            # keep files we do not own (tokenizer, adapters); replace ours, dropping stale weight shards
            for name in os.listdir(self.final):
                if WEIGHT_FILE.fullmatch(name) and name not in os.listdir(self.tmp):
                    os.remove(os.path.join(self.final, name))
            for name in os.listdir(self.tmp):
                os.replace(os.path.join(self.tmp, name), os.path.join(self.final, name))
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


def parse_size(size) -> int:
    """'5GB', '500MB', '10KB' or an int (bytes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"bad size {size!r}: use a number of bytes or e.g. 500MB, 5GB")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2)]
    return int(float(m.group(1)) * unit)


def shard_plan(sizes: dict, max_shard_size: int | None) -> list[list[str]]:
    """Greedy split of tensor names, in order, into shards of at most max_shard_size bytes."""
    if not max_shard_size:
        return [list(sizes)]
    shards, current, current_size = [], [], 0
    for name, size in sizes.items():
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def write_safetensors(hf_state: dict, output_dir: str, max_shard_size=None):
    """model.safetensors, or shards model-0000i-of-0000n.safetensors plus the index HF reads."""
    from safetensors.torch import save_file
    sizes = {k: v.numel() * v.element_size() for k, v in hf_state.items()}
    shards = shard_plan(sizes, parse_size(max_shard_size) if max_shard_size else None)
    if len(shards) == 1:
        save_file(hf_state, os.path.join(output_dir, SAFE_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: hf_state[k] for k in names}, os.path.join(output_dir, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
    write_json({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
               os.path.join(output_dir, SAFE_INDEX))


def save_pretrained(model, output_dir: str, dtype=None, max_shard_size=None, state: dict | None = None):
    """config.json + model.safetensors that transformers' from_pretrained loads unchanged."""
    config: GPT2Config = model.config
    dtype = parse_dtype(dtype)
    state = model.state_dict() if state is None else state
    hf_state = {k: (v.to(dtype) if dtype else v).detach().cpu() for k, v in ours_to_hf(state, config).items()}
    hf_config = config.to_hf_dict(model.hf_architecture)
    hf_config["torch_dtype"] = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
    with atomic_directory(output_dir, size=sum(t.numel() * t.element_size() for t in hf_state.values())) as tmp:
        write_json(hf_config, os.path.join(tmp, "config.json"))
        write_safetensors(hf_state, tmp, max_shard_size)
