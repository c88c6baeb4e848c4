"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its shards, atomically, and reads
them back into its (already parallelized) model and optimizer, in any layout.

A checkpoint directory holds DCP's files for {"model": ..., "optim": ...}, `config.json` (the model, HF-style, plus
the layout it was written with), one `rank_<r>.pt` per rank (RNG states, data position, scheduler and loss-scaler
state) and `manifest.json`, written last, in the format of gpt2_ascend/checkpoints.py: every file with its size,
and a sha256 for the small ones. A directory without a manifest, or whose files disagree with it, is incomplete;
resume skips it. One process reads the whole model back with loading.load_model (safe_dcp.py).
"""
from __future__ import annotations

import os
import shutil
import time

import torch
import torch.distributed as dist

from .. import checkpoints as ckpt
from ..fileio import fsync_file, replace_dir, reporting_disk_full, tensor_bytes, write_json
from ..safe_dcp import dcp_load
from ..safe_pickle import UnsafeFileError, torch_load


def save_sharded(path: str, model, optimizer, rank_state: dict, meta: dict, manifest_meta: dict | None = None):
    """Every rank calls this. Writes into a temporary sibling and renames it to `path` once all ranks
    are done; the manifest (the training checkpoint format of gpt2_ascend/checkpoints.py) is written last. A failure
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
    files = {name: ckpt.describe(os.path.join(tmp, name), hash_all=False) for name in sorted(os.listdir(tmp))}
    manifest = dict(format=ckpt.FORMAT_VERSION, step=meta.get("step"), time=time.time(), files=files,
                    meta=dict(manifest_meta or {}, sharded=True))
    write_json(manifest, os.path.join(tmp, ckpt.MANIFEST))
    fsync_file(os.path.join(tmp, ckpt.MANIFEST))
    replace_dir(tmp, path)


def load_sharded(path: str, model, optimizer) -> dict:
    """Load into the (already parallelized) model and optimizer; reshards when the layout differs.
    Returns this rank's extra state (from the same rank of the old run, or rank 0's if it had fewer)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
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
    ckpt.verify_checkpoint(path)
    state = {"model": get_model_state_dict(model)}
    dcp_load(state, path)
    set_model_state_dict(model, state["model"])
