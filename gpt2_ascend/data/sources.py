"""Any dataset path -> what training and evaluation read: token blocks for a language model, classification rows
for a classifier. A prepared file (.npy / .npz, data/store.py) is read as it is; a raw one (wiki.*.tokens, a .txt file
or folder of .txt files, a GLUE .tsv / IMDB or AG News .csv) is prepared now, and cached as a prepared file in
cache_dir when given (reused while the source, the tokenizer and the settings are unchanged)."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from ..fileio import sha256_file
from . import text, txtcls, wikitext2
from .store import (FORMAT_VERSION, TXTCLS_KIND, DamagedDataError, load_arrays, load_blocks, read_sidecar,
                    save_arrays, save_blocks)


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
                      cache_dir: str | None = None) -> np.ndarray:
    """(blocks, max_length) tokens from a prepared .npy, or from a raw wiki.*.tokens / .txt file / folder of .txt
    prepared now (and cached as .npy in cache_dir when given, reused while source and tokenizer are unchanged)."""
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
                dataset_name: str = "sst_2", mindformers_compat: bool = False) -> dict:
    """input_ids / attention_mask / labels from a prepared .npz, or from a raw text-classification file (GLUE
    .tsv, IMDB / AG News .csv: data/txtcls.py) prepared now (and cached as .npz in cache_dir when given)."""
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
