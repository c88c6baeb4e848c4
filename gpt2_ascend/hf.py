"""HF GPT-2 checkpoints <-> our modules.

HF stores the four projection weights as Conv1D, [in, out]; ours are nn.Linear, [out, in]. That transpose,
HF's optional `transformer.` prefix, its causal-mask buffers, the tied head and our internal vocab padding
are the whole difference, handled here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Iterable, Iterator

import torch

from .budget import require_model_memory
from .config import GenerationConfig, GPT2Config
from .fileio import atomic_directory, check_path, tensor_bytes, write_json
from .safe_pickle import tensor_dict, torch_load
from .schema import EXTRA, REQUIRED, Key, SchemaError, contained, loads_json, parse, read_json

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal masks that old HF versions saved
SAFE_WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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


def hf_to_ours(hf_state, config: GPT2Config, dtype: torch.dtype | None = None, device=None) -> dict:
    """An HF GPT-2 state dict (any head) -> our names and layouts, vocab padded to config's internal size.

    hf_state: a dict, or (name, tensor) pairs read one at a time (iter_tensors): each is converted -- cast to `dtype`
    (floating point tensors), moved to `device`, transposed -- before the next is read, so a loader holds the model
    once, plus one tensor in flight."""
    ours = {}
    for name, tensor in hf_state.items() if isinstance(hf_state, dict) else hf_state:
        key = normalize_hf_name(name)
        if key is None:
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
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


# c_attn's row order: HF's [q of all heads | k | v], or the per-head [q0 k0 v0 | q1 k1 v1 | ...] of distributed runs
# (parallel/tensor_parallel.py), which a row-wise tensor-parallel split cuts into whole heads
QKV_KEYS = ("attn.c_attn.weight", "attn.c_attn.bias")


def per_head_order(n_embd: int, n_head: int) -> torch.Tensor:
    """Row index map: new row i takes old row order[i] (HF [q|k|v] -> per-head [q_h k_h v_h])."""
    head_dim = n_embd // n_head
    rows = torch.arange(3 * n_embd).view(3, n_head, head_dim)  # (qkv, head, dim)
    return rows.transpose(0, 1).reshape(-1)


def hf_order(n_embd: int, n_head: int) -> torch.Tensor:
    """Inverse of per_head_order."""
    return torch.argsort(per_head_order(n_embd, n_head))


def convert_qkv_state(state: dict, n_embd: int, n_head: int, to: str) -> dict:
    """Convert the c_attn tensors of a full (unsharded) state dict between 'hf' and 'per_head' layouts."""
    order = per_head_order(n_embd, n_head) if to == "per_head" else hf_order(n_embd, n_head)
    out = {}
    for key, tensor in state.items():
        if key.endswith(QKV_KEYS) and torch.is_tensor(tensor) and tensor.size(0) == 3 * n_embd:
            tensor = tensor.index_select(0, order.to(tensor.device))
        out[key] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def resolve_model_path(path_or_hub_id: str, **hub) -> str:
    """A local directory or file as is; otherwise a hub id, downloaded with huggingface_hub (hub: download_from_hub's
    options, which a local path does not need, as in transformers). A control character or a symlink loop in the
    path is one line (fileio.check_path)."""
    if os.path.exists(check_path(path_or_hub_id, "model path")):
        return path_or_hub_id
    if path_or_hub_id.startswith((".", "/", "~")) or path_or_hub_id.count("/") > 1 or os.sep + os.sep in path_or_hub_id:
        raise FileNotFoundError(f"model path not found: {path_or_hub_id}")
    return download_from_hub(path_or_hub_id, **hub)


def download_from_hub(repo_id: str, revision: str | None = None, local_files_only: bool = False,
                      cache_dir: str | None = None, force_download: bool = False, token=None) -> str:
    """Fetch config, weights, generation and tokenizer files of a hub model into huggingface_hub's cache (the
    files already there are not fetched again; a broken download resumes) and return the snapshot folder.
    HF_ENDPOINT selects the server, HF_HUB_CACHE the cache, HF_HUB_OFFLINE=1 uses the cache alone; the arguments are
    transformers' from_pretrained options of the same names (revision: a branch, tag or commit)."""
    local_files_only = local_files_only or hub_offline()
    try:
        from huggingface_hub import snapshot_download
        # endpoint, cache and offline mode read at call time, so variables set after import still count
        return snapshot_download(repo_id, revision=revision, endpoint=os.environ.get("HF_ENDPOINT"),
                                 cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE"),
                                 local_files_only=local_files_only, force_download=force_download, token=token,
                                 allow_patterns=[
            "config.json", "*.safetensors", SAFE_INDEX, "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "special_tokens_map.json", GENERATION_CONFIG, "adapter_config.json"])
    except Exception as e:  # offline, unknown repo, HTTP error: one line, no traceback of the hub client
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        where = ("in the hub cache (HF_HUB_OFFLINE is set)" if hub_offline() else
                 "in the hub cache (local_files_only)" if local_files_only else "from the hub")
        if revision is not None:
            repo_id = f"{repo_id}@{revision}"
        raise OSError(f"could not fetch {repo_id!r} {where} ({type(e).__name__}: {reason}); "
                      f"pass a local directory with config.json and model.safetensors instead") from None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub spells true, read now rather than at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


# model.safetensors.index.json / pytorch_model.bin.index.json: which shard holds each tensor
SHARD_INDEX = {
    "metadata": Key(None, "section", items={"total_size": Key(None, "int", minimum=0), EXTRA: Key(None, "any")}),
    "weight_map": Key(REQUIRED, "map", items=Key(REQUIRED, "str"), expects="a mapping of tensor names to shard files"),
}


def read_shard_index(index_path: str) -> dict:
    """{tensor name: shard path} of a shard index, checked (SHARD_INDEX); every shard it names lies in its folder."""
    index = parse(read_json(index_path, fix="re-export the model"), SHARD_INDEX, index_path)
    if not index.weight_map:
        raise SchemaError(f"{index_path} names no tensors (an empty weight_map): re-export the model")
    folder = os.path.dirname(index_path)
    files = {name: contained(folder, name, index_path, "shard") for name in set(index.weight_map.values())}
    return {tensor: files[name] for tensor, name in index.weight_map.items()}


def weight_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory (or a single file), in shard order."""
    if os.path.isfile(path):
        return [path]
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            shards = sorted(set(read_shard_index(index_path).values()))
            missing = [s for s in shards if not os.path.isfile(s)]
            if missing:
                raise FileNotFoundError(f"{index_name} names shard {os.path.relpath(missing[0], path)} which is "
                                        f"not in {path}")
            return shards
    for single in (SAFE_WEIGHTS, BIN_WEIGHTS):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(f"no weights in {path}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}")


def iter_tensors(files: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one file at a time; safetensors are read tensor by tensor (read_safetensors)."""
    for file in files:
        if file.endswith(".safetensors"):
            yield from read_safetensors(file)
        else:
            yield from tensor_dict(load_torch_file(file), file).items()


def read_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file in file order, read into memory of its own. Not memory-mapped (as
    safetensors' own reader does): the file's pages would then count in the process' memory beside the converted
    copies, and the model's tensors would depend on a file that a later export replaces."""
    header, start = read_safetensors_header(path)
    entries = sorted(((name, info) for name, info in header.items() if name != "__metadata__"),
                     key=lambda entry: entry[1].data_offsets[0])
    with open(path, "rb") as f:
        for name, info in entries:
            tensor = torch.empty(info.shape, dtype=SAFETENSORS_DTYPES[info.dtype])
            begin, end = info.data_offsets
            f.seek(start + begin)
            buffer, filled = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), 0
            while filled < end - begin:  # (one read() returns at most 2 GB on Linux)
                got = f.readinto(buffer[filled:])
                if not got:
                    raise ValueError(f"cannot read {path}: {name!r} ends past the file end (corrupt or truncated "
                                     f"safetensors file); re-download or re-export it")
                filled += got
            yield name, tensor


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts), validated against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"cannot read {path}: corrupt or truncated safetensors file ({size} bytes); re-download or "
                             f"re-export it")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"cannot read {path}: corrupt or truncated safetensors file (header of {n} bytes); "
                             f"re-download or re-export it")
        source = f"{path} (its safetensors header)"
        header = parse(loads_json(f.read(n), source, "the file is corrupt"), SAFETENSORS_HEADER, source)
        if header["__metadata__"] is None:
            del header["__metadata__"]  # (optional: only tensors then)
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info.dtype]
        begin, end = info.data_offsets
        if end - begin != math.prod(info.shape) * dtype.itemsize:
            raise ValueError(f"cannot read {path}: corrupt entry for {name!r} (corrupt or truncated safetensors file); "
                             f"re-download or re-export it")
        if start + end > size:
            raise ValueError(f"cannot read {path}: {name!r} ends past the file end (corrupt or truncated safetensors "
                             f"file); re-download or re-export it")
    return header, start


def _offsets(pair: list) -> list:
    if len(pair) != 2 or pair[0] > pair[1]:
        raise ValueError("[begin, end] with begin <= end")
    return pair


# a safetensors file's JSON header: {tensor name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}
SAFETENSORS_ENTRY = {
    "dtype": Key(REQUIRED, "choice", tuple(SAFETENSORS_DTYPES)),
    "shape": Key(REQUIRED, "list", items=Key(REQUIRED, "int", minimum=0)),
    "data_offsets": Key(REQUIRED, "list", items=Key(REQUIRED, "int", minimum=0), convert=_offsets),
}
SAFETENSORS_HEADER = {"__metadata__": Key(None, "map", items=Key(REQUIRED, "str")),
                      EXTRA: Key(REQUIRED, "section", items=SAFETENSORS_ENTRY)}


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


def load_pretrained(cls, path_or_hub_id: str, dtype=None, device=None, name: str | None = None, hub: dict | None = None,
                    **config_overrides):
    """Build `cls` from an HF-format directory, weight file or hub id (HF's layout, HF's file names). name: what the
    model records as its origin, when path_or_hub_id is already a hub id's downloaded folder; hub: download_from_hub's
    options. The weights are read, cast, moved to `device` and converted tensor by tensor into a model built on the
    meta device: the model is never held twice (transformers' low_cpu_mem_usage)."""
    path = resolve_model_path(path_or_hub_id, **(hub or {}))
    config = load_config(path, **config_overrides)
    dtype = parse_dtype(dtype)
    require_model_memory(config, device, dtype, f"the model in {path}",
                         classifier=cls.hf_architecture == "GPT2ForSequenceClassification")
    state = hf_to_ours(iter_tensors(weight_files(path)), config, dtype=dtype, device=device)
    model = model_from_state(cls, config, state, source=path, dtype=dtype, device=device)
    # as transformers: where the weights came from (peft records it as an adapter's base_model_name_or_path)
    name = name or path_or_hub_id
    model.name_or_path = os.path.abspath(name) if os.path.exists(name) else name
    if hasattr(model, "generation_config"):
        model.generation_config = load_generation_config(path, config)
    return model


# from_pretrained's options that say how to load (transformers' names), as opposed to config fields to override
LOADING_OPTIONS = ("dtype", "torch_dtype", "device", "device_map", "low_cpu_mem_usage", "revision", "local_files_only",
                   "cache_dir", "force_download", "token", "trust_remote_code")


def check_config_overrides(overrides: dict):
    """from_pretrained's keywords beyond its loading options must be GPT2Config fields: name anything else as an
    unknown option, listing both kinds (an HF habit, such as use_safetensors=, is then recognisable as one)."""
    fields = sorted(f.name for f in dataclasses.fields(GPT2Config))
    for key in overrides:
        if key not in fields:
            raise TypeError(f"from_pretrained() got an unknown option {key!r}: loading options are "
                            f"{', '.join(LOADING_OPTIONS)}; any other keyword overrides a GPT2Config field "
                            f"({', '.join(fields)})")


def loading_device(device=None, device_map=None):
    """The one device a model loads on, from device= or transformers' device_map: "auto" (the best device here: npu,
    else cuda, else cpu), a device (name, torch.device, or an index of the accelerator), or a dict that places every
    module on that one device ({"": 0}). A map over several devices is refused: the model loads on one device
    (several devices are torchrun's tensor / pipeline parallel)."""
    from .device import npu_available, resolve_device
    if device_map is None:
        return device
    if isinstance(device_map, dict):
        places = {str(place) for place in device_map.values()}
        if len(places) != 1:
            raise ValueError(f"device_map places modules on {len(places) or 'no'} devices ({', '.join(sorted(places))}): "
                             f"this model loads on one device; for several, run it under torchrun with tensor or "
                             f"pipeline parallel (docs/distributed.md)")
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"{'npu' if npu_available() else 'cuda'}:{device_map}"
    if not isinstance(device_map, (str, torch.device)) or str(device_map) == "disk":
        raise ValueError(f"device_map must be 'auto', a device (cpu, cuda:0, npu:0 or an index) or a dict of modules "
                         f"to one device, got {device_map!r}")
    chosen = resolve_device("auto" if device_map in ("auto", "balanced", "sequential") else device_map)
    if device is not None and resolve_device(device) != chosen:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree: pass one of them")
    return chosen


def load_generation_config(path: str, config: GPT2Config) -> GenerationConfig:
    """The directory's generation_config.json, else defaults from the model config (as transformers)."""
    return folder_generation_config(path) or GenerationConfig.from_model_config(config)


def folder_generation_config(path: str) -> GenerationConfig | None:
    """The generation_config.json of a model directory (or of a weight file's directory), or None."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(directory, GENERATION_CONFIG)
    return GenerationConfig.from_json_file(file) if os.path.isfile(file) else None


def model_from_state(cls, config: GPT2Config, state: dict, source: str, dtype=None, device=None):
    """Build on the meta device and adopt the given tensors, so no memory goes to a throwaway init."""
    from .device import on_meta_device
    dtype = parse_dtype(dtype)
    with on_meta_device():
        model = cls(config)
    is_classifier = model.hf_architecture == "GPT2ForSequenceClassification"
    fresh_head = is_classifier and "score.weight" not in state
    ignore = ["lm_head.weight"] if is_classifier or config.tie_word_embeddings else []
    if not is_classifier:
        ignore.append("score.weight")  # a classifier's base loads as a language model
    check_state(model, state, source, allow_missing=["score.weight"] if fresh_head else [], ignore=ignore)
    if fresh_head:  # an LM checkpoint as the start of a classifier: a new head, as HF does
        head = torch.empty(config.num_labels, config.n_embd)
        torch.nn.init.normal_(head, std=config.initializer_range)
        state["score.weight"] = head
    if config.tie_word_embeddings and not is_classifier:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    target_dtype = dtype or next(iter(state.values())).dtype
    if not target_dtype.is_floating_point:
        target_dtype = torch.float32
    state = {k: v.to(dtype=target_dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings and not is_classifier:
        model.lm_head.weight = model.transformer.wte.weight
    if device is not None:
        model.to(device)
    return model.eval()


def atomic_model_dir(output_dir: str, size: int | None = None):
    """fileio.atomic_directory for an HF model directory: into an existing one file by file, keeping what is not
    ours (a tokenizer, an adapter) but dropping weight shards the new weights do not have."""
    return atomic_directory(output_dir, size, stale=WEIGHT_FILE.fullmatch)


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


# ---------------------------------------------------------------------------------------------
# the one safetensors writer
# ---------------------------------------------------------------------------------------------
# safetensors (https://github.com/huggingface/safetensors): 8-byte little-endian header size, a JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data. Knowing every name, dtype
# and shape up front, the writer lays out the file, then fills each tensor in place as it arrives, so converting a
# model never holds more than one of its tensors.
class SafetensorsWriter:
    """A safetensors file laid out from (name -> (dtype, shape)); tensors are written in any order."""

    def __init__(self, path: str, specs: dict, metadata: dict | None = None):
        self.path, self.specs = path, specs
        header, offset = {}, 0
        for name, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = metadata or {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data 8-byte aligned, as safetensors itself writes it
        self.data_start = 8 + len(blob)
        self.offsets = {name: info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}
        self.pending = set(specs)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor):
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name!r}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {tuple(shape)}")
        self.file.seek(self.data_start + self.offsets[name])
        self.file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.pending.discard(name)

    def close(self):
        if self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} tensors never written, e.g. {sorted(self.pending)[0]!r}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def shard_file_names(n: int) -> list[str]:
    return [SAFE_WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_hf_weights(output_dir: str, specs: dict, fetch, max_shard_size=None, order=None, progress=None):
    """Write model.safetensors (or shards + index) into output_dir, pulling tensors one at a time.

    specs: name -> (dtype, shape) in file order; fetch(name) -> tensor; order: the order to fetch in (the
    cheapest for the source, default specs order); progress: a tqdm-like wrapper for the loop.
    """
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (dtype, shape) in specs.items()}
    plan = shard_plan(sizes, parse_size(max_shard_size) if max_shard_size else None)
    files = shard_file_names(len(plan))
    writers, file_of = {}, {}
    try:
        for file, names in zip(files, plan):
            writers[file] = SafetensorsWriter(os.path.join(output_dir, file), {n: specs[n] for n in names})
            file_of.update({n: file for n in names})
        names = list(order or specs)
        for name in progress(names) if progress else names:
            writers[file_of[name]].write(name, fetch(name))
        for writer in writers.values():
            writer.close()
    finally:
        for writer in writers.values():
            if not writer.file.closed:
                writer.file.close()
    if len(files) > 1:
        write_json({"metadata": {"total_size": sum(sizes.values())}, "weight_map": file_of},
                   os.path.join(output_dir, SAFE_INDEX))
    return files


def save_pretrained(model, output_dir: str, dtype=None, max_shard_size=None, state: dict | None = None,
                    safe_serialization: bool = True):
    """config.json + model.safetensors that transformers' from_pretrained loads unchanged (safe_serialization=False:
    pytorch_model.bin, as transformers writes it then), and a language model's generation_config.json."""
    config: GPT2Config = model.config
    dtype = parse_dtype(dtype)
    state = model.state_dict() if state is None else state
    hf_state = {k: (v.to(dtype) if dtype else v).detach().cpu() for k, v in ours_to_hf(state, config).items()}
    hf_config = config.to_hf_dict(model.hf_architecture)
    hf_config["torch_dtype"] = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in hf_state.items()}
    with atomic_model_dir(output_dir, size=tensor_bytes(hf_state)) as tmp:
        write_json(hf_config, os.path.join(tmp, "config.json"))
        if safe_serialization:
            write_hf_weights(tmp, specs, hf_state.__getitem__, max_shard_size)
        else:
            write_bin_weights(tmp, hf_state, max_shard_size)
        generation = getattr(model, "generation_config", None)
        if generation is not None:  # a language model: the defaults transformers' generate() and ours read
            write_json(generation_file(generation), os.path.join(tmp, GENERATION_CONFIG))


def write_bin_weights(output_dir: str, hf_state: dict, max_shard_size=None) -> list[str]:
    """pytorch_model.bin (or shards + pytorch_model.bin.index.json), as transformers' save_pretrained writes with
    safe_serialization=False: torch.save of {name: tensor}, each tensor with a storage of its own."""
    sizes = {name: t.numel() * t.element_size() for name, t in hf_state.items()}
    plan = shard_plan(sizes, parse_size(max_shard_size) if max_shard_size else None)
    files = [BIN_WEIGHTS] if len(plan) == 1 else [f"pytorch_model-{i:05d}-of-{len(plan):05d}.bin"
                                                  for i in range(1, len(plan) + 1)]
    for file, names in zip(files, plan):
        torch.save({n: hf_state[n].clone() for n in names}, os.path.join(output_dir, file))
    if len(files) > 1:
        write_json({"metadata": {"total_size": sum(sizes.values())},
                    "weight_map": {n: file for file, names in zip(files, plan) for n in names}},
                   os.path.join(output_dir, BIN_INDEX))
    return files


# The sampling-only settings: transformers' GenerationConfig refuses to save them in a greedy config (5.x) or warns
# about them (4.x); left out, a reader takes transformers' defaults, which a greedy decoder never reads.
SAMPLING_ONLY_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                          "top_h")


def generation_file(generation_config) -> dict:
    """generation_config.json's content as transformers writes it (GenerationConfig.save_pretrained: what differs
    from its defaults, with transformers_version), from transformers' GenerationConfig (a model's)."""
    written = generation_config.to_diff_dict()
    written.pop("compile_config", None)  # transformers 5 leaves it out as well
    if not written.get("do_sample"):
        written = {k: v for k, v in written.items() if k not in SAMPLING_ONLY_SETTINGS}
    return written
