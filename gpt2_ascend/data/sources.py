"""Any dataset path -> what training and evaluation read: token blocks for a language model, classification rows
for a classifier. A prepared file (.npy / .npz, data/store.py) is read as it is; a raw one (wiki.*.tokens, a .txt file
or folder of .txt files, a GLUE .tsv / IMDB or AG News .csv) or a `datasets` source (a save_to_disk folder,
.parquet / .jsonl / .csv / .arrow files, a hub id NAME:CONFIG:SPLIT, a datasets.Dataset object: data/hf_datasets.py)
is prepared now, and cached as a prepared file in cache_dir when given (reused while the source, the tokenizer and
the settings are unchanged)."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from ..fileio import check_path, sha256_file
from . import hf_datasets, text, txtcls, wikitext2
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


def _through_cache(cache_dir: str | None, stem: str, key: dict, suffix: str, prepare, source: str):
    """prepare() -> (data, sidecar record), or the data cached in cache_dir under key (None: not cached). suffix:
    .npy (token blocks, read back memory-mapped) or .npz (classification arrays)."""
    load, save = (load_blocks, save_blocks) if suffix == ".npy" else (load_arrays, save_arrays)
    cache = _cache_file(cache_dir, stem, key, suffix) if cache_dir else None
    if cache:
        hit = _cached(cache, key, load, source)
        if hit is not None:
            return hit
    data, meta = prepare()
    if not cache:
        return data
    save(data, cache, dict(meta, cache_key=key))
    return load_blocks(cache, verify=False) if suffix == ".npy" else data  # hashed a moment ago, while being written


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


def load_token_blocks(path, max_length: int, tokenizer=None, mindformers_compat: bool = False,
                      cache_dir: str | None = None, *, text_column: str | None = None, text_format: str = "auto",
                      split: str | None = None, num_proc: int | None = None) -> np.ndarray:
    """(blocks, max_length) tokens from a prepared .npy, or from a raw wiki.*.tokens / .txt file / folder of .txt
    prepared now (and cached as .npy in cache_dir when given, reused while source and tokenizer are unchanged), or
    from a `datasets` source (text_column, text_format, split, num_proc: data/hf_datasets.py; raw files ignore
    them)."""
    if isinstance(path, str):
        check_path(path, "dataset")
    if hf_datasets.is_datasets_source(path):
        return _datasets_token_blocks(path, max_length, tokenizer, mindformers_compat, cache_dir, split,
                                      dict(text_column=text_column, text_format=text_format, num_proc=num_proc))
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

    def prepare():
        if kind == "wikitext":
            return wikitext2.wikitext2_blocks_and_meta(path, max_length, tok, tok_info, mindformers_compat)
        return text.text_blocks_and_meta(path, max_length, tok, tok_info)
    return _through_cache(cache_dir, path, key, ".npy", prepare, path)


def _datasets_token_blocks(spec, max_length: int, tokenizer, mindformers_compat: bool, cache_dir: str | None,
                           split: str | None, options: dict) -> np.ndarray:
    """A datasets source's blocks, cached as the raw files' are (the key: its rows' fingerprint and files, the
    column, the protocol and the tokenizer); Dataset.map's tokenized rows are kept beside them for other lengths."""
    source, rows = hf_datasets.open_rows(spec, split, cache_dir)
    tok, tok_info = text.resolve_tokenizer(tokenizer)
    options = dict(options, text_column=options["text_column"] or hf_datasets.DEFAULT_COLUMNS["lm"],
                   mindformers_compat=bool(mindformers_compat))
    key = dict(kind="datasets", **hf_datasets.source_key(source, rows), split=source.split,
               **{k: v for k, v in options.items() if k != "num_proc"}, max_length=max_length,
               tokenizer=tok_info["id"], format_version=FORMAT_VERSION)
    stem = hf_datasets.cache_stem(source)
    map_cache = _cache_file(cache_dir, stem, dict(key, max_length="any"), ".tokens.arrow") if cache_dir else None
    return _through_cache(cache_dir, stem, key, ".npy", lambda: hf_datasets.blocks_and_meta(
        source, rows, max_length, tok, tok_info, map_cache=map_cache, **options), source.label)


def load_txtcls(path, max_length: int, tokenizer=None, cache_dir: str | None = None,
                dataset_name: str = "sst_2", mindformers_compat: bool = False, *, text_column: str | None = None,
                label_column: str | None = None, split: str | None = None) -> dict:
    """input_ids / attention_mask / labels from a prepared .npz, or from a raw text-classification file (GLUE
    .tsv, IMDB / AG News .csv: data/txtcls.py) prepared now (and cached as .npz in cache_dir when given), or from a
    `datasets` source (text_column, label_column, split: data/hf_datasets.py; raw files ignore them)."""
    raw_csv = dataset_name in ("imdb", "ag_news")  # their .csv files are MindFormers' layouts, not data files
    if isinstance(path, str):
        check_path(path, "dataset")
    if hf_datasets.is_datasets_source(path, raw_csv):
        return _datasets_txtcls(path, max_length, tokenizer, cache_dir, split, raw_csv,
                                dict(text_column=text_column, label_column=label_column))
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
    return _through_cache(cache_dir, path, key, ".npz", lambda: txtcls.txtcls_arrays_and_meta(
        path, max_length, tok, tok_info, dataset_name, mindformers_compat), path)


def _datasets_txtcls(spec, max_length: int, tokenizer, cache_dir: str | None, split: str | None, raw_csv: bool,
                     columns: dict) -> dict:
    """A datasets source's classification arrays, cached as a .tsv file's are."""
    source, rows = hf_datasets.open_rows(spec, split, cache_dir, raw_csv)
    tok, tok_info = text.resolve_tokenizer(tokenizer)
    key = dict(kind="txtcls_datasets", **hf_datasets.source_key(source, rows), split=source.split, **columns,
               max_length=max_length, tokenizer=tok_info["id"], format_version=FORMAT_VERSION)
    return _through_cache(cache_dir, hf_datasets.cache_stem(source), key, ".npz", lambda: hf_datasets.
                          txtcls_arrays_and_meta(source, rows, max_length, tok, tok_info, **columns), source.label)


# ---------------------------------------------------------------------------------------------
# what a head learns from (its `examples`: model.py), by the head, so that no caller branches on the task
# ---------------------------------------------------------------------------------------------
def load_examples(examples: str, path, length: int, training: bool = False, tokenizer=None,
                  cache_dir: str | None = None, *, dataset_name: str = "sst_2", mindformers_compat: bool = False,
                  text_column: str | None = None, label_column: str | None = None, text_format: str = "auto",
                  split: str | None = None, num_proc: int | None = None):
    """A head's data from any source: "token_blocks" (a language model's) are blocks of `length` tokens, one more in
    training (the next token of the last position); "labelled_rows" (a classifier's) are input_ids / attention_mask /
    labels rows of `length` tokens. The keywords apply where they mean something (data/hf_datasets.py, txtcls.py)."""
    if examples == "token_blocks":
        return load_token_blocks(path, length + (1 if training else 0), tokenizer, mindformers_compat, cache_dir,
                                 text_column=text_column, text_format=text_format, split=split, num_proc=num_proc)
    if examples == "labelled_rows":
        return load_txtcls(path, length, tokenizer, cache_dir, dataset_name, mindformers_compat,
                           text_column=text_column, label_column=label_column, split=split)
    raise ValueError(f"unknown kind of examples {examples!r}: token_blocks or labelled_rows")
