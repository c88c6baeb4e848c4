"""The on-disk token format, and the two "anything goes" loaders the trainer and evaluator call.

Language-model data is a NumPy .npy array of shape (blocks, max_length) (uint16 for GPT-2's 50257-token vocab,
int32 for bigger vocabs) that `np.load(path, mmap_mode="r")` reads without copying, plus a JSON sidecar
`path + ".json"` that says where the tokens came from (source and tokenizer sha256) and how (max_length, options).
Classification data is a .npz (input_ids, attention_mask, labels) with the same kind of sidecar.

Every file is written atomically (temporary name in the same folder, fsync, os.replace): a crash never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile

import numpy as np

FORMAT_VERSION = 1
BLOCKS_KIND = "token_blocks"
TXTCLS_KIND = "txtcls"
TXTCLS_KEYS = ("input_ids", "attention_mask", "labels")


# ---------------------------------------------------------------------------------------------------- checksums

def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_paths(paths: list[str]) -> str:
    """One checksum for a list of files (a text folder): names and contents, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


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


# ---------------------------------------------------------------------------------------------------- atomic files
from ..fileio import atomic_write, write_json  # noqa: E402,F401  (re-exported: callers import them from here)


def sidecar_path(path: str) -> str:
    return path + ".json"


def read_sidecar(path: str) -> dict | None:
    """The JSON sidecar of a data file, or None when it has none."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"corrupt sidecar {side} ({e}): delete it and prepare the data again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt sidecar {side}: not a JSON object; delete it and prepare the data again")
    version = meta.get("format_version")
    if version is not None and version > FORMAT_VERSION:
        raise ValueError(f"{side} has data format version {version}, newer than this code's {FORMAT_VERSION}: "
                         f"upgrade gpt2_ascend or prepare the data again")
    return meta


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
    recorded = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    for key in TXTCLS_KEYS:
        _check_sha256(path, key, arrays[key], recorded.get(key), meta)
    return arrays


# ---------------------------------------------------------------------------------------------------- any input

def _cache_file(cache_dir: str, source: str, key: dict, suffix: str) -> str:
    stem = os.path.basename(os.path.normpath(source))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{stem}.L{key['max_length']}.{digest}{suffix}")


def _cached(path: str, key: dict, loader, source: str):
    """The cached file at path when it exists, its sidecar records the same preparation key and a checksum,
    and its data still match that checksum (a damaged entry is prepared again, with one warning line)."""
    if not os.path.isfile(path):
        return None
    try:
        meta = read_sidecar(path) or {}
        if meta.get("cache_key") != key or "sha256" not in meta:  # an entry of older code: no checksum to trust
            return None
        return loader(path)
    except DamagedDataError:
        print(f"warning: the cached data {path} is damaged (its sha256 does not match its sidecar): rebuilding it "
              f"from {source}", file=sys.stderr)
        return None
    except ValueError:  # a truncated or mismatched cache entry is prepared again, not an error
        return None


def _raw_kind(path: str) -> str:
    """What a non-prepared dataset path is: 'wikitext' (*.tokens), 'text' (.txt or folder of .txt)."""
    if os.path.isdir(path):
        return "text"
    name = os.path.basename(path)
    if name.endswith(".tokens"):
        return "wikitext"
    if name.endswith(".txt"):
        return "text"
    raise ValueError(f"don't know how to read {path}: give a prepared .npy, a raw WikiText file (*.tokens), "
                     f"a UTF-8 .txt file or a folder of .txt files")


def _single_npy(folder: str) -> str | None:
    npys = sorted(f for f in os.listdir(folder) if f.endswith(".npy"))
    if len(npys) > 1:
        raise ValueError(f"{folder} holds {len(npys)} .npy files ({', '.join(npys[:3])}...): pass one file")
    return os.path.join(folder, npys[0]) if npys else None


def load_token_blocks(path: str, max_length: int, tokenizer=None, mindformers_compat: bool = False,
                      cache_dir: str | None = None, **datasets_options) -> np.ndarray:
    """(blocks, max_length) tokens from a prepared .npy, or from a raw wiki.*.tokens / .txt file / folder of .txt
    prepared now (and cached as .npy in cache_dir when given, reused while source and tokenizer are unchanged), or
    from a `datasets` source (data/hf_datasets.py; datasets_options: text_column, text_format, split, num_proc)."""
    from . import hf_datasets, text, wikitext2
    if hf_datasets.is_datasets_source(path):  # issue 16 hook: save_to_disk folders, parquet/json/csv/arrow, hub ids
        return hf_datasets.token_blocks(path, max_length, tokenizer, mindformers_compat=mindformers_compat,
                                        cache_dir=cache_dir, **datasets_options)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    if os.path.isdir(path):
        path = _single_npy(path) or path
    if path.endswith(".npy"):
        blocks = load_blocks(path)
        if blocks.shape[1] != max_length:
            raise ValueError(f"{path} holds blocks of {blocks.shape[1]} tokens but max_length is {max_length}: "
                             f"prepare it again with --max_length {max_length} (training uses seq_length + 1)")
        return blocks
    kind = _raw_kind(path)
    tok, tok_info = text.resolve_tokenizer(tokenizer)
    key = dict(kind=kind, max_length=max_length, source_sha256=text.source_sha256(path),
               tokenizer=tok_info["id"], mindformers_compat=bool(mindformers_compat) and kind == "wikitext",
               format_version=FORMAT_VERSION)
    cache = _cache_file(cache_dir, path, key, ".npy") if cache_dir else None
    if cache:
        hit = _cached(cache, key, load_blocks, path)
        if hit is not None:
            return hit
    if kind == "wikitext":
        blocks, meta = wikitext2.wikitext2_blocks_and_meta(path, max_length, tok, tok_info, mindformers_compat)
    else:
        blocks, meta = text.text_blocks_and_meta(path, max_length, tok, tok_info)
    if cache:
        save_blocks(blocks, cache, dict(meta, cache_key=key))
        return load_blocks(cache, verify=False)  # hashed a moment ago, while being written
    return blocks


def load_txtcls(path: str, max_length: int, tokenizer=None, cache_dir: str | None = None,
                dataset_name: str = "sst_2", mindformers_compat: bool = False, **datasets_options) -> dict:
    """input_ids / attention_mask / labels from a prepared .npz, or from a raw text-classification file (GLUE
    .tsv, IMDB / AG News .csv: data/txtcls.py) prepared now (and cached as .npz in cache_dir when given), or from a
    `datasets` source (data/hf_datasets.py; datasets_options: text_column, label_column, split)."""
    from . import hf_datasets, text, txtcls
    raw_csv = dataset_name in ("imdb", "ag_news")  # issue 16 hook: their .csv files are MindFormers' layouts
    if hf_datasets.is_datasets_source(path, raw_csv):
        return hf_datasets.txtcls_arrays(path, max_length, tokenizer, cache_dir=cache_dir, raw_csv=raw_csv,
                                         **datasets_options)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.endswith(".npz"):
        arrays = load_arrays(path)
        if arrays["input_ids"].shape[1] != max_length:
            raise ValueError(f"{path} holds rows of {arrays['input_ids'].shape[1]} tokens but max_length is "
                             f"{max_length}: prepare it again with --max_length {max_length}")
        return arrays
    if not path.endswith((".tsv", ".csv")):
        raise ValueError(f"don't know how to read {path}: give a prepared .npz, a GLUE .tsv (SST-2, CoLA) or an "
                         f"IMDB / AG News .csv file")
    tok, tok_info = text.resolve_tokenizer(tokenizer)
    key = dict(kind=TXTCLS_KIND, dataset_name=dataset_name, mindformers_compat=bool(mindformers_compat),
               max_length=max_length,
               source_sha256=sha256_file(path), tokenizer=tok_info["id"], format_version=FORMAT_VERSION)
    cache = _cache_file(cache_dir, path, key, ".npz") if cache_dir else None
    if cache:
        hit = _cached(cache, key, load_arrays, path)
        if hit is not None:
            return hit
    arrays, meta = txtcls.txtcls_arrays_and_meta(path, max_length, tok, tok_info, dataset_name, mindformers_compat)
    if cache:
        save_arrays(arrays, cache, dict(meta, cache_key=key))
    return arrays
