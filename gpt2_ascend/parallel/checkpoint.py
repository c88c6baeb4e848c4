"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically, and their merge into
one HF-format directory without the original world size.

A checkpoint directory holds DCP's files for {"model": ..., "optim": ...} (every rank writes its shards),
`config.json` (the model, HF-style, plus the layout it was written with), one `rank_<r>.pt` per rank (RNG
states, data position, scheduler and loss-scaler state) and `manifest.json`, written last, listing every
file with its size. A directory without a manifest, or whose files disagree with it, is incomplete.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from ..config import GPT2Config
from ..hf import fsync_file, write_json
from .tensor_parallel import convert_qkv_state

MANIFEST = "manifest.json"


def _files(directory: str) -> dict:
    return {name: os.path.getsize(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
            if name != MANIFEST}


def save_sharded(path: str, model, optimizer, rank_state: dict, meta: dict):
    """Every rank calls this. Writes into `<path>.tmp` and renames it to `path` once all ranks are done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = path + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rank_state, os.path.join(tmp, f"rank_{rank}.pt"))
    fsync_file(os.path.join(tmp, f"rank_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        write_json(meta, os.path.join(tmp, "config.json"))
        for name in os.listdir(tmp):
            fsync_file(os.path.join(tmp, name))
        write_json({"files": _files(tmp)}, os.path.join(tmp, MANIFEST))
        fsync_file(os.path.join(tmp, MANIFEST))
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()


def verify(path: str) -> str | None:
    """None if the checkpoint is complete and intact, else the reason in a few words."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return "no manifest.json (the write did not finish)"
    try:
        with open(manifest, encoding="utf-8") as f:
            expected = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    actual = _files(path)
    for name, size in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != size:
            return f"{name} has {actual[name]} bytes, the manifest says {size} (truncated or corrupt)"
    return None


def load_sharded(path: str, model, optimizer) -> dict:
    """Load into the (already parallelized) model and optimizer; reshards when the layout differs.
    Returns this rank's extra state (from the same rank of the old run, or rank 0's if it had fewer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    problem = verify(path)
    if problem:
        raise ValueError(f"checkpoint {path} is not usable: {problem}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = os.path.join(path, f"rank_{dist.get_rank()}.pt")
    if not os.path.isfile(rank_file):
        rank_file = os.path.join(path, "rank_0.pt")
    return torch.load(rank_file, map_location="cpu", weights_only=False)


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def load_full_model_state(path: str) -> tuple[GPT2Config, dict, str]:
    """The whole model from a sharded checkpoint in one process, in HF's c_attn layout and our names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    problem = verify(path)
    if problem:
        raise ValueError(f"checkpoint {path} is not usable: {problem}")
    meta = read_meta(path)
    config = GPT2Config.from_hf_dict(meta["model_config"])
    reader = FileSystemReader(path)
    metadata = reader.read_metadata()
    state = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state[key] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(state, storage_reader=reader, no_dist=True)
    model_state = {k[len("model."):]: v for k, v in state.items()}
    if meta.get("qkv_layout") == "per_head":
        model_state = convert_qkv_state(model_state, config.n_embd, config.n_head, to="hf")
    return config, model_state, meta["architecture"]


def merge_to_hf(src: str, dst: str, dtype=None):
    """Consolidate a sharded checkpoint into an HF directory (config.json + model.safetensors)."""
    from ..hf import save_pretrained
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel
    config, state, architecture = load_full_model_state(src)
    cls = GPT2ForSequenceClassification if architecture == "GPT2ForSequenceClassification" else GPT2LMHeadModel
    with torch.device("meta"):  # names the architecture and config; the tensors come from `state`
        shell = cls(config.replace(pad_vocab_size_multiple=1))  # the internal vocab padding stays internal
    if config.tie_word_embeddings and "lm_head.weight" in state and cls is GPT2LMHeadModel:
        state.pop("lm_head.weight")
    save_pretrained(shell, dst, dtype=dtype, state=state)
    return config, architecture
