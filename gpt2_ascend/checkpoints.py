"""Training checkpoints on disk: OUTPUT_DIR/checkpoint/step_XXXXXXX/, written atomically, verified on read.

A checkpoint is a directory of files plus a manifest.json written last that lists every file with its size (and
sha256, for all but a sharded checkpoint's large shards). Two kinds share the format:
- one process: one .pt file per state dict (model.pt, optimizer.pt, trainer.pt) and config.json;
- torchrun (`is_sharded`): torch.distributed.checkpoint's shards and .metadata, a rank_N.pt per rank and a
  config.json with the layout (parallel/checkpoint.py writes it, safe_dcp.py reads it without pickle).
The whole directory is filled under a temporary name, fsync'd and renamed into place, so a crash mid-write leaves
the previous checkpoints intact and at most a stale temporary directory (removed on the next start). A checkpoint
without a manifest, or whose files do not match it, is incomplete or corrupt.

The functions take and return plain state dicts ({"model": ..., "optimizer": ..., ...}); train/checkpoint.py's
Checkpointers turn a Trainer into them and back.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time

import torch

from .fileio import atomic_directory, fsync_file, sha256_file, tensor_bytes, write_json
from .safe_pickle import tensor_dict, torch_load
from .schema import EXTRA, REQUIRED, SHA256, Key, SchemaError, contained, parse, read_json

MANIFEST = "manifest.json"
MODEL_FILES = ("model.pt", "config.json")  # what loading the weights alone reads (and so verifies)
STEP_DIR = re.compile(r"step_(\d+)")
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt (message: one line)."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoint")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def save_checkpoint(root: str, step: int, states: dict, json_files: dict | None = None, meta: dict | None = None,
                    keep: int | None = None) -> str:
    """Write `states` ({name: state_dict}) as root/step_XXXXXXX/{name}.pt plus `json_files`
    ({filename: obj}) and the manifest; keep only the newest `keep` checkpoints. Returns the path."""
    final = os.path.join(root, step_dir_name(step))
    with atomic_directory(final, size=tensor_bytes(states), what=f"checkpoint {step_dir_name(step)}",
                          whole=True) as tmp:  # the same step saved again: the old one is swapped back on failure
        files = _write_files(tmp, states, json_files)
        manifest = dict(format=FORMAT_VERSION, step=step, time=time.time(), files=files, meta=meta or {})
        write_json(manifest, os.path.join(tmp, MANIFEST))
    if keep:
        prune(root, keep)
    return final


def _write_files(tmp: str, states: dict, json_files: dict | None) -> dict:
    """{name}.pt for each state and the JSON files into tmp; their manifest entries."""
    files = {}
    for name, state in states.items():
        path = os.path.join(tmp, f"{name}.pt")
        torch.save(state, path)
        files[f"{name}.pt"] = describe(path)
    for filename, obj in (json_files or {}).items():
        path = os.path.join(tmp, filename)
        write_json(obj, path)
        files[filename] = describe(path)
    return files


HASHED_BYTES = 64 << 20  # a sharded checkpoint's files up to this size get a sha256; its shards are checked by size


def describe(path: str, hash_all: bool = True) -> dict:
    """A file's manifest entry: its size, and its sha256 (with hash_all False, only for files up to HASHED_BYTES)."""
    fsync_file(path)
    size = os.path.getsize(path)
    return dict(bytes=size, sha256=sha256_file(path)) if hash_all or size <= HASHED_BYTES else dict(bytes=size)


def prune(root: str, keep: int):
    """Delete all but the newest `keep` checkpoints (complete or not)."""
    for _, path in list_checkpoints(root)[:-keep]:
        remove_checkpoint(path)


def remove_checkpoint(path: str):
    """Take the checkpoint out of its step_N name in one rename, then delete it: a reader sees it whole or not at
    all, never half deleted (`reading` then says it was removed). A kill mid-delete leaves a .step_* temporary,
    which the next run's remove_stale_temporaries deletes."""
    doomed = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.removing-{os.getpid()}-{time.time_ns()}")
    try:
        os.replace(path, doomed)
    except OSError:  # gone already, or not renamable: delete in place
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(root: str):
    """Temporary directories left by a crash during a save."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".step_") or ".old-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every step_* directory, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.fullmatch(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


# manifest.json, key by key (save_checkpoint and parallel/checkpoint.py write it)
MANIFEST_KEYS = {
    "format": Key(FORMAT_VERSION, "int", minimum=1, maximum=FORMAT_VERSION,
                  expects=f"{FORMAT_VERSION} or less (a larger one: a newer gpt2_ascend wrote it)"),
    "step": Key(REQUIRED, "int", minimum=0),
    "time": Key(None, "float", minimum=0.0),
    "files": Key(REQUIRED, "map", items=Key(REQUIRED, "section", items={
        "bytes": Key(REQUIRED, "int", minimum=0),
        "sha256": SHA256})),
    "meta": {  # what the run recorded about itself
        "prefix": Key("", "str"), "lora": Key(False, "bool"), "load_checkpoint": Key("", "str"),
        "architecture": Key(None, "str"), "step": Key(None, "int", minimum=0), "sharded": Key(False, "bool"),
        EXTRA: Key(None, "any")},
}


def read_manifest(path: str) -> dict:
    """A checkpoint's manifest, checked (MANIFEST_KEYS): a damaged one is one CheckpointError line naming the field,
    and every file it lists must lie inside the checkpoint directory."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST}: the save was interrupted)")
    try:
        manifest = parse(read_json(manifest_path), MANIFEST_KEYS, MANIFEST)
        for filename in manifest.files:
            contained(path, filename, MANIFEST)
    except SchemaError as e:
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST}: {e}") from None
    return manifest


def verify_checkpoint(path: str, files=None, hashes: bool = True) -> dict:
    """The manifest, after checking the size and sha256 of every file it lists (or only of `files`, which it
    must list; hashes False: their sizes only, the quick check before a run reads them); CheckpointError naming the
    first bad file."""
    manifest = read_manifest(path)
    for filename in files or ():
        if filename not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path} holds no {filename} (its manifest lists "
                                  f"{', '.join(manifest['files'])})")
    for filename, info in manifest["files"].items():
        if files is not None and filename not in files:
            continue
        file = os.path.join(path, filename)  # (inside path: read_manifest checked every name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} is incomplete: {filename} is missing")
        size = os.path.getsize(file)
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {filename} has {size} bytes, the manifest "
                                  f"says {info['bytes']} (truncated?)")
        if hashes and "sha256" in info and sha256_file(file) != info["sha256"]:  # sharded checkpoints hash small files only
            raise CheckpointError(f"checkpoint {path} is corrupt: {filename} does not match its sha256")
    return manifest


def find_resume_checkpoint(root: str, report=print) -> str | None:
    """The newest complete and valid checkpoint under root (None if there is none). Each newer one that
    fails verification is reported in one line and skipped."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            report(f"warning: {e}; trying an older one")
    return None


@contextlib.contextmanager
def reading(path: str):
    """Read the checkpoint at path inside this block: when it vanishes meanwhile (a running training run prunes
    its older checkpoints: remove_checkpoint), whatever failed is reported as its removal, in one line, not as a
    damaged or interrupted save."""
    existed = os.path.isdir(path)
    try:
        yield
    except Exception:
        if existed and not os.path.isdir(path):
            raise CheckpointError(f"{path} was removed while it was read (a training run keeps only its newest "
                                  f"keep_checkpoint_max checkpoints and deletes the older ones): read a newer one, "
                                  f"or copy it out of the run directory first") from None
        raise


def load_checkpoint(path: str, names=None, verify: bool = True) -> dict:
    """{name: state_dict} of a checkpoint directory (all .pt files, or just `names`: only those are verified
    and read). Files are read with torch.load(weights_only=True): one that pickles anything else raises
    UnsafeFileError."""
    manifest = read_manifest(path)
    if names is None and manifest.get("meta", {}).get("sharded"):
        raise CheckpointError(f"{path} is a sharded checkpoint of a torchrun run: resume it under torchrun with "
                              f"--use_parallel True (any layout), or start from its weights with --load_checkpoint")
    available = [f[:-3] for f in manifest["files"] if f.endswith(".pt")]
    wanted = available if names is None else list(names)
    for name in wanted:
        if name not in available:
            raise CheckpointError(f"checkpoint {path} holds no {name}.pt (it has {', '.join(available)})")
    if verify:
        verify_checkpoint(path, None if names is None else [f"{name}.pt" for name in wanted])
    states = {name: torch_load(os.path.join(path, f"{name}.pt")) for name in wanted}
    for name, state in states.items():  # what a pickle holds is checked before anything reads it
        file = os.path.join(path, f"{name}.pt")
        if name == "model":
            tensor_dict(state, file)
        elif not isinstance(state, dict):
            raise CheckpointError(f"{file} is not a valid checkpoint: it holds a {type(state).__name__}, not a state "
                                  f"dict")
    return states


def is_training_checkpoint(path: str) -> bool:
    """One process's checkpoint (model.pt beside the manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isfile(os.path.join(path, "model.pt"))


def is_sharded(path: str) -> bool:
    """A torchrun run's checkpoint (torch.distributed.checkpoint's .metadata beside the manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isfile(os.path.join(path, ".metadata"))
