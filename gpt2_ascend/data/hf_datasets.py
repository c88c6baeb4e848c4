"""HuggingFace `datasets` as a data source: the same token blocks and classification arrays the raw files give, in
the same on-disk cache (data/store.py, through data/sources.py), from

    PATH                     a `save_to_disk` folder (a Dataset, or a DatasetDict: the split below), a .parquet,
                             .jsonl / .json, .csv or .arrow file, or a folder of such files (one format, by name)
    PATH:SPLIT               one split of a `save_to_disk` DatasetDict folder
    NAME[:CONFIG[:SPLIT]]    a hub id, loaded through datasets.load_dataset: wikitext:wikitext-2-raw-v1:train,
                             glue:sst2:validation, NAME::SPLIT for a dataset without configs. With
                             HF_DATASETS_OFFLINE=1 it is read from the datasets cache (HF_DATASETS_CACHE), never
                             downloaded; otherwise datasets downloads it (once) from the Hub.
    a datasets.Dataset or DatasetDict object (the Python API)

The split defaults to `train` (the trainer asks for `validation` for its evaluation data).

data/sources.py (the entry point) reads these sources through the functions here and caches what they give as it
caches the raw files' blocks; a Dataset that is already tokenized (an input_ids column) is used as it is.

Language modelling reads one text column (`text`) in one of two protocols (text_format):
    wikitext   the rows are the lines of a WikiText file, as the hub's `wikitext` configs and a parquet of a .tokens
               file's lines hold them: MindFormers' passages and cleaning (data/wikitext2.py) applied row for row
               as to the raw file's lines, so the blocks are byte-identical to the raw *.tokens file's
    text       each row is one document, stripped, empty rows skipped: as each file of a folder of .txt files
    auto       wikitext when the first non-blank row is a WikiText heading (" = Title = "), else text
The passages are tokenized by Dataset.map (batched, num_proc processes, cached by the dataset's fingerprint and the
tokenizer), joined by the "\\n" token and cut into blocks of max_length: exactly the tokens of the "\\n"-joined text
(tokenize_passages says why), which is what the raw files give.

Text classification reads a text and a label column (`sentence` and `label`, GLUE SST-2's names) and encodes them
with data/txtcls.py's encode_rows: the arrays the GLUE .tsv file gives.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace

import numpy as np

from .store import token_dtype
from .text import encode_many, pack_blocks, resolve_tokenizer, sha256_paths

# data files -> the datasets builder that reads them
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
RAW_SUFFIXES = (".npy", ".npz", ".tokens", ".txt", ".tsv") + tuple(FILE_BUILDERS)  # never a hub id
TEXT_FORMATS = ("auto", "wikitext", "text")
DEFAULT_COLUMNS = dict(lm="text", txtcls="sentence", label="label")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]*)?(:[^:]+)?")
_WIKITEXT_HEADING = re.compile(r"(= )+.+( =)+")


@dataclass
class Source:
    """Where a dataset comes from: kind disk (save_to_disk folder) | files | hub | object, and how to name it."""
    kind: str
    where: object  # a path, a hub name, or a Dataset / DatasetDict
    label: str
    config: str | None = None
    split: str | None = None  # given in the source string (PATH:SPLIT, NAME:CONFIG:SPLIT)
    files: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- what is one

def is_datasets_object(obj) -> bool:
    """A datasets.Dataset / DatasetDict (checked by module, so that raw-file loading never imports datasets)."""
    return type(obj).__module__.split(".")[0] == "datasets"


def is_datasets_source(spec, raw_csv: bool = False) -> bool:
    """Whether spec is read through `datasets` (else it is a raw or prepared file: data/store.py). raw_csv: .csv
    files are MindFormers' IMDB / AG News layouts (data/txtcls.py), not data files."""
    if is_datasets_object(spec):
        return True
    if not isinstance(spec, (str, os.PathLike)):
        return False
    spec = os.fspath(spec)
    if os.path.exists(spec):
        return _local_kind(spec, raw_csv) is not None
    head, colon, _ = spec.rpartition(":")
    if colon and os.path.exists(head):
        return _local_kind(head, raw_csv) is not None
    return _looks_like_hub_id(spec)


def _is_saved_dataset(folder: str) -> bool:
    """A folder written by Dataset.save_to_disk (state.json + dataset_info.json) or DatasetDict.save_to_disk."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    return has("dataset_dict.json") or (has("state.json") and has("dataset_info.json"))


def _builder_of(path: str, raw_csv: bool) -> str | None:
    suffix = os.path.splitext(path)[1].lower()
    return None if raw_csv and suffix == ".csv" else FILE_BUILDERS.get(suffix)


def _data_files(folder: str, raw_csv: bool) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, n)) and _builder_of(n, raw_csv))


def _local_kind(path: str, raw_csv: bool) -> str | None:
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return "disk"
        if any(n.endswith((".txt", ".npy")) for n in os.listdir(path)):  # a text corpus / prepared folder
            return None
        return "files" if _data_files(path, raw_csv) else None
    return "files" if _builder_of(path, raw_csv) else None


def _looks_like_hub_id(spec: str) -> bool:
    name = spec.split(":")[0]
    return bool(_HUB_ID.fullmatch(spec)) and not name.lower().endswith(RAW_SUFFIXES)


def parse_source(spec, raw_csv: bool = False) -> Source:
    """The Source a --train_dataset_dir / --eval_dataset_dir value (or a Dataset object) names."""
    if is_datasets_object(spec):
        return Source("object", spec, label=f"the given {type(spec).__name__}")
    spec = os.fspath(spec)
    path, split = spec, None
    if not os.path.exists(spec):
        head, colon, tail = spec.rpartition(":")
        if colon and os.path.exists(head):
            path, split = head, tail
    if os.path.exists(path):
        kind = _local_kind(path, raw_csv)
        if kind is None:
            raise ValueError(f"don't know how to read {path} with datasets: give a save_to_disk folder or "
                             f"{', '.join(FILE_BUILDERS)} files")
        if kind == "files" and split:
            raise ValueError(f"{spec}: a split (:{split}) belongs to a hub id or a save_to_disk DatasetDict folder; "
                             f"data files are read whole")
        files = (_data_files(path, raw_csv) if os.path.isdir(path) else [path]) if kind == "files" else []
        return Source(kind, os.path.abspath(path), label=spec, split=split or None, files=files)
    if not _looks_like_hub_id(spec):
        raise FileNotFoundError(f"dataset not found: {spec}")
    parts = spec.split(":")
    return Source("hub", parts[0], label=spec, config=(parts[1] if len(parts) > 1 else "") or None,
                  split=parts[2] if len(parts) > 2 else None)


# ---------------------------------------------------------------------------------------------------- loading rows

def open_rows(spec, split: str | None = None, cache_dir: str | None = None, raw_csv: bool = False):
    """(the Source spec names, with its split: its own, else `split`; the datasets.Dataset of that split)."""
    source = parse_source(spec, raw_csv)
    source = replace(source, split=source.split or split)
    return source, load_rows(source, cache_dir=cache_dir)


def load_rows(source: Source, cache_dir: str | None = None):
    """The datasets.Dataset a Source names (its split: the source's own, else train). Data files are
    converted to Arrow under cache_dir/datasets (datasets' default cache when None); hub ids use datasets' cache."""
    import datasets
    split = source.split or "train"
    if source.kind == "object":
        rows = source.where
    elif source.kind == "disk":
        rows = datasets.load_from_disk(source.where)
    elif source.kind == "files":
        builders = sorted({_builder_of(f, False) for f in source.files})
        if len(builders) > 1:
            raise ValueError(f"{source.label} mixes data formats ({', '.join(builders)}): keep one format per folder")
        hf_cache = os.path.join(cache_dir, "datasets") if cache_dir else None
        rows = _load_dataset(source, builders[0], data_files=source.files, split="train", cache_dir=hf_cache)
    else:
        rows = _load_dataset(source, source.where, source.config, split=split)
    if isinstance(rows, datasets.DatasetDict):
        if split not in rows:
            raise ValueError(f"{source.label} has no split {split!r} (its splits: {', '.join(rows)}): name one, "
                             f"e.g. {source.label}:{next(iter(rows), 'train')}")
        rows = rows[split]
    if not isinstance(rows, datasets.Dataset):
        raise ValueError(f"{source.label} is a {type(rows).__name__}: give a map-style datasets.Dataset (streaming "
                         f"datasets are not read)")
    return rows


def _load_dataset(source: Source, *args, **kwargs):
    """datasets.load_dataset, its failures as one line naming the source (and what offline mode reads)."""
    import datasets
    try:
        with _quiet_datasets():
            return datasets.load_dataset(*args, **kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        if source.kind != "hub":
            raise ValueError(f"could not read {source.label} with datasets ({detail})") from None
        if datasets.config.HF_DATASETS_OFFLINE:  # (HF_HUB_OFFLINE in datasets >= 2.20; this name is in all)
            hint = (f"HF_DATASETS_OFFLINE=1 reads only the datasets cache ({datasets.config.HF_DATASETS_CACHE}): "
                    f"load it once with a network, or give a local file")
        else:
            hint = "check the name, config and split, and the network (offline: HF_DATASETS_OFFLINE=1 reads the cache)"
        raise ValueError(f"could not load {source.label} with datasets.load_dataset ({detail}): {hint}") from None


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' logs off (its errors are reported in one line by the caller)."""
    from datasets.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _column(rows, name: str, label: str, flag: str):
    if name not in rows.column_names:
        raise ValueError(f"{label} has no column {name!r} (its columns: {', '.join(rows.column_names)}): "
                         f"pass {flag} NAME")
    return rows.features[name]


def _kind(feature) -> str:
    """A column's type in a few words: its dtype (string, int64, ...) or its feature class (List, Image, ...)."""
    return str(getattr(feature, "dtype", None) or type(feature).__name__)


def _text_values(rows, name: str, label: str) -> list:
    feature = _column(rows, name, label, "--text_column")
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"column {name!r} of {label} holds {_kind(feature)}, not text: pass --text_column NAME")
    return list(rows[name])


def source_key(source: Source, rows) -> dict:
    """What identifies the rows in a cache key (data/sources.py): datasets' fingerprint, and the bytes of local
    files."""
    key = dict(fingerprint=rows._fingerprint, source=source.label if source.kind == "hub" else None)
    if source.kind in ("disk", "files"):
        files = source.files or sorted(os.path.join(d, n) for d, _, names in os.walk(source.where) for n in names)
        key["files_sha256"] = sha256_paths(files)
    return key


def cache_stem(source: Source) -> str:
    """The cache files' name: the folder, file or hub id (or `dataset` for an object)."""
    return "dataset" if source.kind == "object" else source.label


def _meta(source: Source, rows, tok_info: dict, **datasets_meta) -> dict:
    """A sidecar's record of where the rows came from (data/store.py)."""
    return dict(source=source.where if source.kind in ("disk", "files") else source.label, source_kind="datasets",
                datasets=dict(kind=source.kind, config=source.config, split=source.split, rows=len(rows),
                              fingerprint=rows._fingerprint, **datasets_meta),
                tokenizer=tok_info["path"], tokenizer_sha256=tok_info["files_sha256"], tokenizer_id=tok_info["id"])


# -------------------------------------------------------------------------------------------------- language modelling

def resolve_text_format(texts: list, text_format: str = "auto") -> str:
    """wikitext or text; auto: wikitext when the first non-blank row is a WikiText heading (" = Title = ")."""
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"unknown text_format {text_format!r}: use one of {', '.join(TEXT_FORMATS)}")
    if text_format != "auto":
        return text_format
    first = next((t.strip() for t in texts if t and t.strip()), "")
    return "wikitext" if _WIKITEXT_HEADING.fullmatch(first) else "text"


def passages_of(texts: list, text_format: str, mindformers_compat: bool = False) -> list[str]:
    """The passages the raw-file protocols would build: WikiText's cleaned passages from rows of lines
    (data/wikitext2.py; mindformers_compat drops the last), or each non-empty row stripped (data/text.py)."""
    if text_format == "wikitext":
        from .wikitext2 import clean_passages, group_passages
        lines = (line for text in texts if text for line in text.split("\n"))
        return clean_passages(group_passages(lines, mindformers_compat))
    return [p for p in (t.strip() for t in texts if t) if p]


def _encode_rows_batch(batch: dict, tokenizer) -> dict:
    return {"ids": encode_many(batch["text"], tokenizer)}


def tokenize_passages(passages: list[str], tokenizer, num_proc: int | None = None, cache_file: str | None = None,
                      fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens, tokens per passage), tokenized by Dataset.map in batches on num_proc processes; with cache_file
    the map's Arrow output is kept there (and reused) under `fingerprint`.

    Joined by the "\n" token, the passages' tokens are exactly the tokens of the "\n"-joined text: GPT-2's
    pre-tokenizer makes a lone "\n" between two non-space characters a pre-token of its own, and BPE never merges
    across pre-tokens (checked for every Unicode character at either edge of a stripped passage; text.py's
    split_for_tokenizer cuts long texts at such places for the same reason)."""
    import datasets
    import pyarrow.compute as pc
    if num_proc is not None and (int(num_proc) != num_proc or num_proc < 1):
        raise ValueError(f"preprocessing_num_workers must be a positive integer, got {num_proc}")
    table = datasets.Dataset.from_dict({"text": passages})
    with _quiet_datasets():
        mapped = table.map(functools.partial(_encode_rows_batch, tokenizer=tokenizer), batched=True,
                           num_proc=num_proc if num_proc and num_proc > 1 and len(passages) > 1 else None,
                           remove_columns=["text"], cache_file_name=cache_file, new_fingerprint=fingerprint,
                           desc="tokenizing")
    ids = mapped.data.column("ids").combine_chunks()
    return ids.flatten().to_numpy(), pc.list_value_length(ids).to_numpy().astype(np.int64)


def join_pieces(values: np.ndarray, lengths: np.ndarray, separator: list[int], dtype) -> np.ndarray:
    """The pieces' tokens (values, cut by lengths) with the separator's tokens between consecutive pieces."""
    n, s = len(lengths), len(separator)
    out = np.empty(len(values) + max(n - 1, 0) * s, dtype=dtype)
    piece = np.repeat(np.arange(n), lengths)
    out[np.arange(len(values)) + piece * s] = values
    if n > 1 and s:
        starts = np.cumsum(lengths)[:-1] + np.arange(n - 1) * s  # just after piece i
        out[(starts[:, None] + np.arange(s)).ravel()] = np.tile(np.asarray(separator, dtype=dtype), n - 1)
    return out


def tokens_and_meta(source: Source, rows, tokenizer, tok_info: dict, *, text_column: str | None = None,
                    text_format: str = "auto", mindformers_compat: bool = False, num_proc: int | None = None,
                    map_cache: str | None = None) -> tuple[np.ndarray, dict]:
    """(all tokens of the rows' text column, 1-D; their sidecar record). map_cache: a file where Dataset.map keeps
    its tokenized rows (reused for every block length of the same rows, column, protocol and tokenizer)."""
    text_column = text_column or DEFAULT_COLUMNS["lm"]
    texts = _text_values(rows, text_column, source.label)
    fmt = resolve_text_format(texts, text_format)
    compat = bool(mindformers_compat) and fmt == "wikitext"
    passages = passages_of(texts, fmt, compat)
    if not any(passages):
        raise ValueError(f"{source.label} holds no text in column {text_column!r}")
    if compat and any("\t" in p for p in passages):
        raise ValueError(f"{source.label} contains tab characters, which MindFormers' script mangles: prepare it "
                         f"without mindformers_compat")
    fingerprint = None
    if map_cache:
        fingerprint = hashlib.sha256(json.dumps([rows._fingerprint, text_column, fmt, compat, tok_info["id"]])
                                     .encode()).hexdigest()[:16]
    values, lengths = tokenize_passages(passages, tokenizer, num_proc, map_cache, fingerprint)
    tokens = join_pieces(values, lengths, encode_many(["\n"], tokenizer)[0], token_dtype(len(tokenizer)))
    meta = dict(_meta(source, rows, tok_info, text_column=text_column),
                options=dict(text_format=fmt, mindformers_compat=compat), num_tokens=int(len(tokens)))
    return tokens, meta


def blocks_and_meta(source: Source, rows, max_length: int, tokenizer, tok_info: dict, **options):
    """(blocks, max_length) tokens of the rows and their sidecar record (options: tokens_and_meta's)."""
    tokens, meta = tokens_and_meta(source, rows, tokenizer, tok_info, **options)
    blocks = pack_blocks(tokens, max_length, source=source.label)
    return blocks, dict(meta, num_tokens_used=int(blocks.size))


def token_stream(spec, tokenizer=None, *, split: str | None = None, cache_dir: str | None = None,
                 **options) -> np.ndarray:
    """All tokens of a datasets source, 1-D (the strided perplexity protocol reads them whole; not cached)."""
    source, rows = open_rows(spec, split, cache_dir)
    tok, tok_info = resolve_tokenizer(tokenizer)
    return tokens_and_meta(source, rows, tok, tok_info, **options)[0]


# -------------------------------------------------------------------------------------------------- classification

def _label_values(rows, name: str, label: str) -> np.ndarray:
    import datasets
    feature = _column(rows, name, label, "--label_column")
    if not (isinstance(feature, datasets.ClassLabel) or str(getattr(feature, "dtype", "")).startswith(("int", "uint"))):
        raise ValueError(f"column {name!r} of {label} holds {_kind(feature)}, not integer labels 0..num_labels-1: "
                         f"pass --label_column NAME, or cast it (Dataset.class_encode_column)")
    labels = np.asarray(rows[name], dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{int((labels < 0).sum())} rows of {label} have label {labels.min()} in column {name!r}: "
                         f"an unlabelled split (GLUE's test splits are); use a labelled one, e.g. validation")
    return labels


def txtcls_arrays_and_meta(source: Source, rows, max_length: int, tokenizer, tok_info: dict, *,
                           text_column: str | None = None, label_column: str | None = None) -> tuple[dict, dict]:
    """input_ids / attention_mask / labels of the rows' text and label columns (GLUE SST-2's `sentence` and `label`
    by default), right-padded with the eos id and cut to max_length by txtcls.encode_rows as the .tsv path does; and
    their sidecar record."""
    from .txtcls import encode_rows, pad_token_id
    text_column, label_column = text_column or DEFAULT_COLUMNS["txtcls"], label_column or DEFAULT_COLUMNS["label"]
    sentences = _text_values(rows, text_column, source.label)
    labels = _label_values(rows, label_column, source.label)
    empty = next((i for i, s in enumerate(sentences) if not s), None)
    if empty is not None:
        raise ValueError(f"row {empty} of {source.label} has an empty {text_column!r}: remove it (Dataset.filter)")
    if not sentences:
        raise ValueError(f"{source.label} has no rows")
    input_ids, mask, truncated = encode_rows(sentences, max_length, tokenizer)
    meta = dict(_meta(source, rows, tok_info, text_column=text_column, label_column=label_column),
                options={"padding": "right", "pad_token_id": int(pad_token_id(tokenizer))},
                num_truncated=int(truncated), max_tokens=int(mask.sum(1).max()),
                label_counts={str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))})
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels), meta


# -------------------------------------------------------------------------------------------------- in memory

def token_columns(data) -> dict | None:
    """An already tokenized datasets.Dataset (one with an input_ids column) as the model's input columns, numpy
    arrays as any in-memory data (input_ids, and attention_mask / labels where it has them); None for any other
    data (a Dataset of text is tokenized by data/sources.py)."""
    if not is_datasets_object(data) or "input_ids" not in getattr(data, "column_names", ()):
        return None  # (a DatasetDict's column_names is a dict of splits: it names a split first)
    names = [n for n in ("input_ids", "attention_mask", "labels") if n in data.column_names]
    table = data.with_format("numpy")
    try:
        return {name: np.asarray(table[name]) for name in names}
    except ValueError as e:
        raise ValueError(f"the Dataset's {', '.join(names)} rows must all be the same length: pack them into "
                         f"blocks first ({e})") from None
