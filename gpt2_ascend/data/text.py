"""Plain UTF-8 text corpora (a .txt file or a folder of .txt files) -> token blocks, and the tokenizing helpers
the WikiText-2 and SST-2 preparation share.

A corpus is a list of passages: the text of each file, stripped, empty files skipped, joined by "\\n" (files of a
folder in sorted name order). The joined text is tokenized as one string (no EOS added) and cut into blocks of
exactly max_length tokens; the remainder is dropped.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from ..fileio import sha256_file
from .store import save_blocks, token_dtype

# Characters the tokenizer's pre-tokenizer may treat as whitespace although Python's str.isspace() does not.
_ODD_SPACES = "\u180e\u200b\u2060\ufeff"
CHUNK_CHARS = 1 << 18


# ---------------------------------------------------------------------------------------------------- tokenizer

def resolve_tokenizer(tokenizer=None):
    """(tokenizer object, info) from None (the GPT-2 tokenizer of the data dir, downloaded when missing),
    a tokenizer directory, or a tokenizer object. info records file checksums for data sidecars."""
    from .tokenizer import load_tokenizer, tokenizer_files
    if tokenizer is None:
        from .download import dataset_path
        tokenizer = dataset_path("gpt2")
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        tok = load_tokenizer(path)
    else:
        tok, path = tokenizer, getattr(tokenizer, "name_or_path", "") or ""
    files = tokenizer_files(path) if path and os.path.isdir(path) else []
    if files:
        shas = {os.path.basename(f): sha256_file(f) for f in files}
        ident = hashlib.sha256(repr(sorted(shas.items())).encode()).hexdigest()
        return tok, {"id": ident, "path": os.path.abspath(path), "files_sha256": shas}
    return tok, {"id": _fingerprint(tok), "path": None, "files_sha256": {}}


def _fingerprint(tok) -> str:
    """A checksum of a tokenizer object that came without files: its serialized form, else its vocabulary."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_space(ch: str) -> bool:
    return ch.isspace() or ch in _ODD_SPACES


def split_for_tokenizer(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about chunk_chars whose tokens, concatenated, equal the tokens of the whole text.

    Cuts go just before a "\\n" that sits between two non-space characters. GPT-2's pre-tokenizer
    ('s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+) never joins a non-space character with a
    following whitespace, and a lone "\\n" before text is its own pre-token, so no pre-token crosses such a cut
    and the piece after it is scanned exactly as in the whole text (tested on real WikiText-2)."""
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = text.find("\n", start + chunk_chars)
        while cut != -1 and not (cut + 1 < len(text) and not _is_space(text[cut - 1])
                                 and not _is_space(text[cut + 1])):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_many(texts: list[str], tokenizer) -> list[list[int]]:
    """The token ids of each text (no special tokens added), through the fast tokenizer's parallel batch API
    when it has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def tokenize_text(text: str, tokenizer, chunk_chars: int = CHUNK_CHARS, desc: str = "tokenizing") -> np.ndarray:
    """All tokens of text (no special tokens added), as one 1-D array of the vocab's token dtype.

    Long texts are tokenized as pieces through the fast tokenizer's batch API (parallel, with a progress bar);
    the result equals tokenizing the whole text at once."""
    from ..progress import progress_bar
    pieces = split_for_tokenizer(text, chunk_chars)
    dtype = token_dtype(len(tokenizer))
    per_batch = 8  # pieces per encode_batch call: parallel work between progress-bar updates
    out = []
    with progress_bar(total=len(text), desc=desc, unit="char", unit_scale=True, disable=len(text) < (1 << 20),
              leave=False) as bar:
        for i in range(0, len(pieces), per_batch):
            batch = pieces[i:i + per_batch]
            out.extend(np.asarray(x, dtype=dtype) for x in encode_many(batch, tokenizer))
            bar.update(sum(len(p) for p in batch))
    return np.concatenate(out)  # never empty: split_for_tokenizer gives at least one piece ("" for "")


def pack_blocks(tokens: np.ndarray, max_length: int, source: str | None = None) -> np.ndarray:
    """(n, max_length) blocks of consecutive tokens, n = len(tokens) // max_length; the remainder is dropped."""
    if int(max_length) != max_length or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length}")
    max_length = int(max_length)  # 1025.0 from a recipe is a length
    tokens = np.asarray(tokens)
    n = len(tokens) // max_length
    if n == 0:
        where = f"{source} has" if source else "got"
        raise ValueError(f"{where} only {len(tokens)} tokens, fewer than one block of max_length {max_length}: "
                         f"use a smaller --max_length or more text")
    return tokens[:n * max_length].reshape(n, max_length)


# ---------------------------------------------------------------------------------------------------- reading text

def read_utf8(path: str) -> str:
    """A file's text, universal newlines, a UTF-8 BOM dropped; a clear error when it is not UTF-8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                         f"convert it, e.g. iconv -f latin1 -t utf-8") from None


def corpus_files(path: str) -> list[str]:
    """The .txt files of a corpus: the file itself, or a folder's *.txt in sorted name order."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".txt") and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise ValueError(f"no .txt files in folder {path}: put the corpus in *.txt files (UTF-8)")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    return [path]


def sha256_paths(paths: list[str]) -> str:
    """One checksum for a list of files (a text folder): names and contents, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def source_sha256(path: str) -> str:
    """sha256 of a file, or of the sorted .txt files of a folder."""
    return sha256_paths(corpus_files(path)) if os.path.isdir(path) else sha256_file(path)


def read_text_corpus(path: str) -> str:
    """The corpus text: each file stripped, empty files skipped, files joined by "\\n"."""
    passages = [t for t in (read_utf8(f).strip() for f in corpus_files(path)) if t]
    if not passages:
        raise ValueError(f"{path} contains no text: give a non-empty UTF-8 .txt file or folder of .txt files")
    return "\n".join(passages)


# ---------------------------------------------------------------------------------------------------- corpus -> blocks

def text_blocks_and_meta(path: str, max_length: int, tokenizer, tok_info: dict):
    tokens = tokenize_text(read_text_corpus(path), tokenizer, desc=os.path.basename(path))
    blocks = pack_blocks(tokens, max_length, source=path)
    meta = dict(source=os.path.abspath(path), source_sha256=source_sha256(path), source_kind="text",
                tokenizer=tok_info["path"], tokenizer_sha256=tok_info["files_sha256"], tokenizer_id=tok_info["id"],
                options={}, num_tokens=int(len(tokens)), num_tokens_used=int(blocks.size))
    return blocks, meta


def prepare_text_corpus(path: str, max_length: int, tokenizer=None) -> np.ndarray:
    """(blocks, max_length) token blocks of a UTF-8 .txt file or a folder of .txt files."""
    tok, info = resolve_tokenizer(tokenizer)
    return text_blocks_and_meta(path, max_length, tok, info)[0]


def write_text_corpus(path: str, output_file: str, max_length: int, tokenizer=None) -> np.ndarray:
    """prepare_text_corpus, saved as .npy + JSON sidecar."""
    tok, info = resolve_tokenizer(tokenizer)
    blocks, meta = text_blocks_and_meta(path, max_length, tok, info)
    save_blocks(blocks, output_file, meta)
    return blocks
