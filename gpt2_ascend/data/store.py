"""The on-disk token format: prepared data files and their JSON sidecars (data/sources.py reads any input).

Language-model data is a NumPy .npy array of shape (blocks, max_length) (uint16 for GPT-2's 50257-token vocab,
int32 for bigger vocabs) that `np.load(path, mmap_mode="r")` reads without copying, plus a JSON sidecar
`path + ".json"` that says where the tokens came from (source and tokenizer sha256) and how (max_length, options).
Classification data is a .npz (input_ids, attention_mask, labels) with the same kind of sidecar.

Every file is written atomically (temporary name in the same folder, fsync, os.replace): a crash never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from ..fileio import atomic_write, write_json
from ..schema import EXTRA, Key, is_sha256, parse, read_json

FORMAT_VERSION = 1
BLOCKS_KIND = "token_blocks"
TXTCLS_KIND = "txtcls"
TXTCLS_KEYS = ("input_ids", "attention_mask", "labels")


# ---------------------------------------------------------------------------------------------------- checksums

def array_sha256(array: np.ndarray, chunk: int = 1 << 24) -> str:
    """sha256 of an array's raw C-order bytes, 16 MiB at a time (a memory map is read, never copied whole):
    ~0.4 s for WikiText-103's 240 MB of tokens on one core (docs/data.md)."""
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    digest = hashlib.sha256()
    for start in range(0, len(data), chunk):
        digest.update(data[start:start + chunk])
    return digest.hexdigest()


class DamagedDataError(ValueError):
    """A prepared data file whose bytes no longer match the checksum its sidecar recorded (message: one line)."""


def _check_sha256(path: str, name: str, array: np.ndarray, recorded: str | None, meta: dict):
    if recorded is None or array_sha256(array) == recorded:
        return
    source = meta.get("source")
    if source and os.path.exists(source):
        fix = f"prepare it again from {source}"
    elif source:
        fix = f"its source {source} is gone: prepare it again from a copy of the source"
    else:
        fix = "prepare it again"
    raise DamagedDataError(f"{path} is damaged: the sha256 of {name} differs from the one in {sidecar_path(path)} "
                           f"(bytes changed on disk); {fix}")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535 (GPT-2's 50257 fit, at half the bytes of int32); bigger vocabs need int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def sidecar_path(path: str) -> str:
    return path + ".json"


def _checksums(value):
    """A sidecar's sha256: one checksum (token blocks), or one per array (classification data)."""
    digests = list(value.values()) if isinstance(value, dict) else [value]
    if not digests or not all(is_sha256(d) for d in digests):
        raise ValueError(CHECKSUMS)
    return value


CHECKSUMS = "a sha256 (64 lowercase hex digits), or a mapping of array names to sha256s"


# a data file's JSON sidecar (save_blocks / save_arrays write it): what the readers use is checked; the rest (the
# preparation's settings, the tokenizer's checksums) is a record for people and for the cache's key
SIDECAR_KEYS = {
    "format_version": Key(None, "int", minimum=1), "kind": Key(None, "choice", (BLOCKS_KIND, TXTCLS_KIND)),
    "dtype": Key(None, "str"), "num_blocks": Key(None, "int", minimum=0), "num_rows": Key(None, "int", minimum=0),
    "max_length": Key(None, "int", minimum=1), "source": Key(None, "str"),
    "sha256": Key(None, "any", convert=_checksums, expects=CHECKSUMS),
    "cache_key": Key(None, "map", items=Key(None, "any")), EXTRA: Key(None, "any"),
}


def read_sidecar(path: str) -> dict | None:
    """The JSON sidecar of a data file (checked: SIDECAR_KEYS), or None when it has none."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    try:
        meta = parse(read_json(side), SIDECAR_KEYS, side, defaults=False)  # (a key left out stays out)
    except ValueError as e:
        raise ValueError(f"corrupt sidecar: {e}; delete it and prepare the data again") from None
    version = meta.get("format_version")
    if version is not None and version > FORMAT_VERSION:
        raise ValueError(f"{side} has data format version {version}, newer than this code's {FORMAT_VERSION}: "
                         f"upgrade gpt2_ascend or prepare the data again")
    return meta


def _check_kind(path: str, meta: dict, kind: str):
    """A sidecar describes the kind of data its file holds (a classification sidecar beside token blocks: not ours)."""
    if meta.get("kind") not in (None, kind):
        raise ValueError(f"{sidecar_path(path)} describes {meta['kind']} data, but {path} is read as {kind}: the sidecar "
                         f"belongs to another file; prepare the data again")


# ---------------------------------------------------------------------------------------------------- token blocks

def save_blocks(array: np.ndarray, path: str, meta: dict) -> None:
    """Write a (blocks, max_length) token array as .npy plus its JSON sidecar, both atomically."""
    array = np.ascontiguousarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token blocks must be a 2-D integer array, got shape {array.shape} dtype {array.dtype}")
    if not path.endswith(".npy"):
        raise ValueError(f"token blocks are written as .npy: use an output file ending in .npy, not {path}")
    meta = dict(meta, format_version=FORMAT_VERSION, kind=BLOCKS_KIND, dtype=array.dtype.name,
                num_blocks=int(array.shape[0]), max_length=int(array.shape[1]), sha256=array_sha256(array))
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False), size=array.nbytes)
    write_json(meta, sidecar_path(path))


def load_blocks(path: str, verify: bool = True) -> np.ndarray:
    """A read-only memory map of prepared token blocks, checked against its sidecar (shape, dtype and, with
    verify, the tokens' sha256: DamagedDataError when they changed on disk)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path} (prepare it with python -m gpt2_ascend.data.wikitext2)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt or truncated token file {path} ({e}): prepare it again") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path} is not a token-block file: expected a 2-D integer array, "
                         f"got shape {array.shape} dtype {array.dtype}")
    meta = read_sidecar(path)
    if meta is not None:
        _check_kind(path, meta, BLOCKS_KIND)
        expected = (meta.get("num_blocks"), meta.get("max_length"), meta.get("dtype"))
        if expected != (array.shape[0], array.shape[1], array.dtype.name):
            raise ValueError(f"{path} does not match its sidecar: array {array.shape} {array.dtype.name}, sidecar "
                             f"({expected[0]}, {expected[1]}) {expected[2]}; prepare the data again")
        if verify:
            _check_sha256(path, "its tokens", array, meta.get("sha256"), meta)
    return array


# ---------------------------------------------------------------------------------------------------- classification

def save_arrays(arrays: dict, path: str, meta: dict) -> None:
    """Write named arrays as an uncompressed .npz plus its JSON sidecar, both atomically."""
    if not path.endswith(".npz"):
        raise ValueError(f"classification data is written as .npz: use an output file ending in .npz, not {path}")
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, kind=TXTCLS_KIND, num_rows=int(len(arrays["labels"])),
                max_length=int(arrays["input_ids"].shape[1]), sha256={k: array_sha256(v) for k, v in arrays.items()})
    atomic_write(path, lambda f: np.savez(f, **arrays), size=sum(a.nbytes for a in arrays.values()))
    write_json(meta, sidecar_path(path))


def load_arrays(path: str) -> dict:
    """input_ids / attention_mask / labels of a prepared classification .npz, checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classification file not found: {path} "
                                f"(prepare it with python -m gpt2_ascend.data.txtcls)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):  # the zip's own checksum: same size, different bytes
            raise DamagedDataError(f"{path} is damaged ({e}: bytes changed on disk); prepare it again") from None
        raise ValueError(f"corrupt or truncated classification file {path} ({e}): prepare it again") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt or truncated classification file {path} ({e}): prepare it again") from None
    missing = [k for k in TXTCLS_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: expected arrays {', '.join(TXTCLS_KEYS)}")
    ids, mask, labels = (arrays[k] for k in TXTCLS_KEYS)
    if ids.ndim != 2 or mask.shape != ids.shape or labels.shape != (ids.shape[0],):
        raise ValueError(f"{path} has inconsistent shapes: input_ids {ids.shape}, attention_mask {mask.shape}, "
                         f"labels {labels.shape}; prepare it again")
    meta = read_sidecar(path) or {}
    _check_kind(path, meta, TXTCLS_KIND)
    recorded = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    for key in TXTCLS_KEYS:
        _check_sha256(path, key, arrays[key], recorded.get(key), meta)
    return arrays
