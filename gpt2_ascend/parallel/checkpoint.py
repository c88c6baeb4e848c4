"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically, and their merge into
one HF-format directory without the original world size.

A checkpoint directory holds DCP's files for {"model": ..., "optim": ...} (every rank writes its shards),
`config.json` (the model, HF-style, plus the layout it was written with), one `rank_<r>.pt` per rank (RNG
states, data position, scheduler and loss-scaler state) and `manifest.json`, written last, in the format
of train/checkpoint.py: every file with its size, and a sha256 for the small ones. A directory without a
manifest, or whose files disagree with it, is incomplete; resume skips it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist

from ..config import GPT2Config
from ..fileio import fsync_file, reporting_disk_full, tensor_bytes, write_json
from ..safe_pickle import torch_load
from ..train import checkpoint as ckpt
from ..train.checkpoint import MANIFEST
from .tensor_parallel import convert_qkv_state

HASHED_BYTES = 64 << 20  # files up to this size get a sha256 in the manifest; shards are checked by size


def _describe(path: str) -> dict:
    size = os.path.getsize(path)
    return dict(bytes=size, sha256=ckpt.sha256_file(path)) if size <= HASHED_BYTES else dict(bytes=size)


def save_sharded(path: str, model, optimizer, rank_state: dict, meta: dict, manifest_meta: dict | None = None):
    """Every rank calls this. Writes into a temporary sibling and renames it to `path` once all ranks
    are done; the manifest (the training checkpoint format of train/checkpoint.py) is written last. A failure
    removes the temporary (rank 0); a full disk is one DiskFullError line on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = os.path.dirname(path)
    tmp = os.path.join(root, "." + os.path.basename(path) + ".tmp-sharded")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with reporting_disk_full(root, tensor_bytes([model_sd, optim_sd]), f"checkpoint {os.path.basename(path)}"):
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
            torch.save(rank_state, os.path.join(tmp, f"rank_{rank}.pt"))
            fsync_file(os.path.join(tmp, f"rank_{rank}.pt"))
            dist.barrier()
            if rank == 0:
                _finish_sharded(tmp, path, meta, manifest_meta)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier()


def _finish_sharded(tmp: str, path: str, meta: dict, manifest_meta: dict | None):
    """Rank 0, after every rank wrote its shards: config.json, the manifest, and the rename into place."""
    write_json(meta, os.path.join(tmp, "config.json"))
    files = {}
    for name in sorted(os.listdir(tmp)):
        fsync_file(os.path.join(tmp, name))
        files[name] = _describe(os.path.join(tmp, name))
    manifest = dict(format=ckpt.FORMAT_VERSION, step=meta.get("step"), time=time.time(), files=files,
                    meta=dict(manifest_meta or {}, sharded=True))
    write_json(manifest, os.path.join(tmp, MANIFEST))
    fsync_file(os.path.join(tmp, MANIFEST))
    ckpt._replace_dir(tmp, path)


def is_sharded(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isfile(os.path.join(path, ".metadata"))


def load_sharded(path: str, model, optimizer) -> dict:
    """Load into the (already parallelized) model and optimizer; reshards when the layout differs.
    Returns this rank's extra state (from the same rank of the old run, or rank 0's if it had fewer)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from .safe_dcp import dcp_load
    ckpt.verify_checkpoint(path)
    rank_state = _load_rank_state(path)  # first: a file that would run code stops every rank before anything loads
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return rank_state


def _load_rank_state(path: str) -> dict:
    """This rank's rank_N.pt (rank 0's when the old run had fewer ranks), read with weights_only. A file that
    cannot be read or is refused on any rank is the same one-line error on every rank, so none waits for it."""
    from ..safe_pickle import UnsafeFileError
    rank_file = os.path.join(path, f"rank_{dist.get_rank()}.pt")
    if not os.path.isfile(rank_file):
        rank_file = os.path.join(path, "rank_0.pt")
    state, problem = None, None
    try:
        state = torch_load(rank_file)
    except ValueError as e:  # UnsafeFileError, or a damaged file
        problem = (isinstance(e, UnsafeFileError), str(e))
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    unsafe, message = next((p for p in problems if p is not None), (None, None))
    if message is not None:
        raise (UnsafeFileError if unsafe else ckpt.CheckpointError)(message)
    return state


def load_model_only(path: str, model):
    """The weights of a sharded checkpoint into an already-parallel model (any layout), no optimizer."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from .safe_dcp import dcp_load
    ckpt.verify_checkpoint(path)
    state = {"model": get_model_state_dict(model)}
    dcp_load(state, path)
    set_model_state_dict(model, state["model"])


def read_meta(path: str) -> dict:
    """The config.json of a sharded checkpoint: the model's HF config, its architecture, the qkv layout."""
    file = os.path.join(path, "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta.get("model_config"), dict) or not isinstance(meta.get("architecture"), str):
            raise ValueError("no model_config / architecture")
    except (OSError, ValueError, AttributeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {path} has a corrupt config.json ({e})") from None
    return meta


def load_full_model_state(path: str) -> tuple[GPT2Config, dict, str]:
    """The whole model from a sharded checkpoint in one process, in HF's c_attn layout and our names."""
    from .safe_dcp import dcp_load
    ckpt.verify_checkpoint(path)
    meta = read_meta(path)
    config = GPT2Config.from_hf_dict(meta["model_config"])
    state = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in model_tensors(path).items()}
    import warnings
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(state, path, no_dist=True)
    model_state = {k[len("model."):]: v for k, v in state.items()}
    if meta.get("qkv_layout") == "per_head":
        model_state = convert_qkv_state(model_state, config.n_embd, config.n_head, to="hf")
    return config, model_state, meta["architecture"]


def model_tensors(path: str) -> dict:
    """{key: (shape, dtype)} of the model tensors `.metadata` declares, checked to fit in the checkpoint's data
    files before anything is allocated for them."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from .safe_dcp import read_dcp_metadata
    data_bytes = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".distcp"))
    tensors, declared = {}, 0
    for key, item in read_dcp_metadata(path).state_dict_metadata.items():
        if not (isinstance(key, str) and key.startswith("model.") and isinstance(item, TensorStorageMetadata)):
            continue
        size, dtype = getattr(item, "size", None), getattr(getattr(item, "properties", None), "dtype", None)
        if not (isinstance(size, tuple) and all(isinstance(d, int) and d >= 0 for d in size)
                and isinstance(dtype, torch.dtype)):
            raise ckpt.CheckpointError(f"checkpoint {path} has a corrupt .metadata ({key}: shape {size}, "
                                       f"dtype {dtype})")
        tensors[key] = (size, dtype)
        declared += math.prod(size) * dtype.itemsize
    if declared > data_bytes:
        raise ckpt.CheckpointError(f"checkpoint {path} has a corrupt .metadata: it declares {declared} bytes of "
                                   f"weights but its .distcp files hold {data_bytes}")
    return tensors


def model_from_sharded(cls, path: str, overrides: dict | None = None, dtype=None, device=None):
    """One whole model of class `cls` from a sharded checkpoint, in one process (eval, generate, finetune):
    the run's vocab padding is cut to vocab_size and redone for this model's config."""
    from ..hf import model_from_state, pad_vocab
    config, state, architecture = load_full_model_state(path)
    if cls.hf_architecture == "GPT2ForSequenceClassification" and architecture != cls.hf_architecture:
        raise ValueError(f"{path} is a {architecture} checkpoint without a classification head: pass a model "
                         f"finetuned for text_classification (GPT2ForSequenceClassification)")
    config = config.replace(**dict(dict(pad_vocab_size_multiple=1), **(overrides or {})))
    state = {k: pad_vocab(v[: config.vocab_size], config) if k in ("transformer.wte.weight", "lm_head.weight")
             else v for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return model_from_state(cls, config, state, source=path, dtype=dtype, device=device)


def merge_to_hf(src: str, dst: str, dtype=None, max_shard_size=None):
    """Consolidate a sharded checkpoint into an HF directory (config.json + model.safetensors)."""
    config, state, architecture = load_full_model_state(src)
    _save_hf(config, state, architecture, dst, dtype, max_shard_size)
    return config, architecture


def merge_checkpoint(src: str, dst: str, dtype=None, max_shard_size=None):
    """Any training checkpoint (sharded DCP, or a single-process step_N with model.pt) -> HF directory."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if is_sharded(src):
        return merge_to_hf(src, dst, dtype, max_shard_size)
    if not ckpt.is_training_checkpoint(src):
        raise ValueError(f"{src} is not a training checkpoint (no manifest.json with DCP files or model.pt): "
                         f"pass OUTPUT_DIR/checkpoint/step_N")
    ckpt.verify_checkpoint(src, ckpt.MODEL_FILES)  # the weights alone: a damaged optimizer.pt does not matter
    config = GPT2Config.from_json_file(os.path.join(src, "config.json"))
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        architecture = (json.load(f).get("architectures") or ["GPT2LMHeadModel"])[0]
    state = ckpt.load_checkpoint(src, ["model"], verify=False)["model"]
    if any(".lora_" in k for k in state):
        raise ValueError(f"{src} holds LoRA adapters only: use the run's final/ directory, or "
                         f"convert/merge_lora.py with its final/adapter")
    _save_hf(config, state, architecture, dst, dtype, max_shard_size)
    return config, architecture


def _save_hf(config, state, architecture, dst, dtype, max_shard_size):
    from ..hf import save_pretrained
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel
    cls = GPT2ForSequenceClassification if architecture == "GPT2ForSequenceClassification" else GPT2LMHeadModel
    with torch.device("meta"):  # names the architecture and config; the tensors come from `state`
        shell = cls(config.replace(pad_vocab_size_multiple=1))  # the internal vocab padding stays internal
    if config.tie_word_embeddings and "lm_head.weight" in state and cls is GPT2LMHeadModel:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_pretrained(shell, dst, dtype=dtype, state=state, max_shard_size=max_shard_size)
