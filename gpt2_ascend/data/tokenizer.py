"""GPT-2's byte-level BPE tokenizer, as transformers' own GPT2TokenizerFast (eos = pad = bos = 50256).

The class matters for exports: transformers 5 saves a generic PreTrainedTokenizerFast as
"TokenizersBackend", a class transformers 4 does not have; a GPT2TokenizerFast is saved as "GPT2Tokenizer",
which both major versions load (4.x picks its GPT2TokenizerFast, 5.x its GPT2Tokenizer)."""
from __future__ import annotations

import os
import shutil

from ..schema import EXTRA, MAX_SIZE, REQUIRED, Key, SchemaError, check, parse, read_json
from .download import default_data_dir

EOS_TOKEN = "<|endoftext|>"
# Every file a tokenizer directory may hold (copied next to merged weights as they are)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# Byte-level BPE decodes back to the exact text. transformers 4.x defaults to "cleaning up" spaces before
# punctuation on decode (WikiText's "world ." became "world."); 5.x does not: say it for every version.
LOSSLESS_DECODE = dict(clean_up_tokenization_spaces=False)


def default_tokenizer_dir() -> str:
    """The GPT-2 tokenizer files of the data directory (GPT2_DATA_DIR/gpt2)."""
    return os.path.join(default_data_dir(), "gpt2")


def holds_tokenizer(path: str) -> bool:
    """Whether a model directory carries its own tokenizer (vocab.json or tokenizer.json)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "tokenizer.json"))


def tokenizer_for(model_path: str, explicit: str | None = None) -> str | None:
    """The tokenizer to use with a model: the one named, else the model directory's own, else None (the data
    directory's GPT-2 one, load_tokenizer's default)."""
    if explicit:
        return explicit
    return model_path if holds_tokenizer(model_path) else None


# vocab.json: {token: id}, every id a distinct integer in [0, 2^24) (a token given twice is refused by read_json)
VOCAB = Key(REQUIRED, "map", items=Key(REQUIRED, "int", minimum=0, below=MAX_SIZE), expects="a mapping of tokens to ids")


_CHECKED_BPE_FILES: set = set()  # (path, size, mtime) of both files, checked whole in this process


def check_bpe_files(vocab_path: str, merges_path: str):
    """vocab.json and merges.txt must be whole and a pair: a damaged file is one ValueError naming it (the
    tokenizers library raises a bare Exception, and reads a truncated merges.txt without complaint, tokenizing
    differently). A pair already checked in this process, unchanged since (same size and modification time), is
    not read again: a command checks its tokenizer before the expensive work and loads it after."""
    stamp = tuple((os.path.realpath(p), st.st_size, st.st_mtime_ns)
                  for p, st in ((p, os.stat(p)) for p in (vocab_path, merges_path)))
    if stamp in _CHECKED_BPE_FILES:
        return
    _check_bpe_files(vocab_path, merges_path)
    _CHECKED_BPE_FILES.add(stamp)


def _check_bpe_files(vocab_path: str, merges_path: str):
    raw = read_json(vocab_path, fix="re-copy the tokenizer files")
    if isinstance(raw, dict) and all(type(i) is int and 0 <= i < MAX_SIZE for i in raw.values()):
        vocab = raw  # what VOCAB accepts, checked in one pass (50k entries through the schema take ~0.3 s)
    else:
        vocab = check(raw, VOCAB, "vocab", vocab_path)  # (its one-line error names the first bad entry)
    ids = {}
    for token, i in vocab.items():  # each id names one token: a second would decode to the wrong text
        if i in ids:
            raise SchemaError(f"{vocab_path} gives the id {i} to two tokens ({ids[i]!r} and {token!r}): it is damaged "
                              f"or not a BPE vocabulary; re-copy the tokenizer files")
        ids[i] = token
    try:
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{merges_path} is damaged: not UTF-8 text ({e.reason} at byte {e.start}); re-copy the "
                         f"tokenizer files") from None
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    bad = next((i for i, pair in enumerate(merges) if len(pair) != 2), None)
    if bad is not None:
        raise ValueError(f"{merges_path} is damaged: merge {bad + 1} is {' '.join(merges[bad])!r}, not two tokens; "
                         f"re-copy the tokenizer files")
    _check_every_token_is_made(vocab, merges, vocab_path, merges_path)


def _check_every_token_is_made(vocab: dict, merges: list, vocab_path: str, merges_path: str):
    """In a byte-level BPE every multi-character token but the specials (<|endoftext|>) is some merge's result:
    tokens no merge makes mean merges.txt lost its end, or the two files are not a pair."""
    made = {a + b for a, b in merges}
    orphans = [t for t in vocab if len(t) > 1 and t not in made and not (t.startswith("<") and t.endswith(">"))]
    if orphans:
        raise ValueError(f"{merges_path} has {len(merges)} merges, but {len(orphans)} tokens of {vocab_path} (e.g. "
                         f"{orphans[0]!r}) are made by none of them: merges.txt is truncated or from another "
                         f"tokenizer; re-copy the tokenizer files")
    unknown = next((pair for pair in merges if pair[0] not in vocab or pair[1] not in vocab), None)
    if unknown is not None:
        raise ValueError(f"{merges_path} merges {' '.join(unknown)!r}, which are not both in {vocab_path}: the two "
                         f"files are not a pair; re-copy the tokenizer files")


NO_LIMIT = int(1e30)  # the model_max_length transformers writes for a tokenizer without one


def _special_token(value):
    """A special token as transformers writes it: the text, or {"content": text, ...} (an AddedToken)."""
    if isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str)):
        return value
    raise ValueError("a token: its text, or a mapping with its text as content")


SPECIAL_TOKEN = Key(None, "any", convert=_special_token, expects="a token: its text, or a mapping with its content")
SPECIAL_TOKENS = {name: SPECIAL_TOKEN for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
# tokenizer_config.json / special_tokens_map.json: what transformers reads from them with a meaning here is checked
# (transformers' own errors named vocab.json); the rest is left to transformers
TOKENIZER_SETTINGS = {
    "tokenizer_config.json": {
        **SPECIAL_TOKENS, "add_prefix_space": Key(False, "bool"), "add_bos_token": Key(False, "bool"),
        "add_eos_token": Key(False, "bool"), "clean_up_tokenization_spaces": Key(False, "bool"),
        "model_max_length": Key(None, "int", minimum=1, maximum=NO_LIMIT),
        "tokenizer_class": Key(None, "str"), EXTRA: Key(None, "any")},
    "special_tokens_map.json": {**SPECIAL_TOKENS, EXTRA: Key(None, "any")},
}


def check_tokenizer_settings(path: str):
    """A tokenizer directory's settings files, when it has them, checked (TOKENIZER_SETTINGS)."""
    for name, table in TOKENIZER_SETTINGS.items():
        file = os.path.join(path, name)
        if os.path.isfile(file):
            parse(read_json(file, fix="re-copy the tokenizer files"), table, file)


def _gpt2_tokenizer(path: str):
    """GPT2TokenizerFast from a directory with vocab.json + merges.txt or tokenizer.json (transformers reads
    tokenizer.json when there is one). Byte-level BPE decodes exactly what was encoded (LOSSLESS_DECODE)."""
    from transformers import GPT2TokenizerFast
    settings = os.path.join(path, "tokenizer_config.json")  # (checked by check_tokenizer_settings)
    saved = read_json(settings, fix="re-copy the tokenizer files").get("model_max_length") \
        if os.path.isfile(settings) else None
    try:  # the folder's own context (a model saved here names it), else GPT-2's 1024 (not transformers' NO_LIMIT)
        return GPT2TokenizerFast.from_pretrained(path, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                                 pad_token=EOS_TOKEN,
                                                 model_max_length=saved if saved and saved < NO_LIMIT else 1024,
                                                 **LOSSLESS_DECODE)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        file = os.path.join(path, "tokenizer.json")
        what = file if os.path.isfile(file) else os.path.join(path, "vocab.json + merges.txt")
        raise ValueError(f"{what} is damaged or not a tokenizer ({str(e).strip().splitlines()[0]}): "
                         f"re-copy the tokenizer files") from None


def load_tokenizer(path_or_hub_id: str | None = None):
    """A fast GPT-2 tokenizer from a directory (vocab.json + merges.txt, or tokenizer.json) or a hub id.

    With no argument it reads the GPT-2 files of the data directory (GPT2_DATA_DIR)."""
    path = path_or_hub_id or default_tokenizer_dir()
    if check_tokenizer(path):
        return _gpt2_tokenizer(path)
    from ..hf import download_from_hub
    return load_tokenizer(download_from_hub(path))


def check_tokenizer(path_or_hub_id: str | None = None) -> bool:
    """A tokenizer directory's files, checked as load_tokenizer reads them (a missing folder or damaged file is one
    line): the quick check a run makes before anything expensive. False for a hub id (checked once downloaded)."""
    path = path_or_hub_id or default_tokenizer_dir()
    if os.path.isdir(path):
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            check_bpe_files(vocab, merges)
        elif not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"no tokenizer in {path}: expected vocab.json + merges.txt or tokenizer.json")
        check_tokenizer_settings(path)
        return True
    if os.path.exists(path) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    return False


def save_tokenizer(tokenizer, output_dir: str, source_dir: str | None = None, model_max_length: int | None = None):
    """Write tokenizer files next to a model: tokenizer.json + tokenizer_config.json, and vocab.json +
    merges.txt (the original files where known, else the BPE model's), so that transformers' slow
    GPT2Tokenizer of 4.x loads the export too. model_max_length: the model's context (n_positions), which
    transformers' tokenizer truncates to (`truncation=True`); GPT-2's 1024 otherwise."""
    os.makedirs(output_dir, exist_ok=True)
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(output_dir)
    for name in ("vocab.json", "merges.txt"):
        src = os.path.join(source_dir, name) if source_dir else ""
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(output_dir, name))
    if not all(os.path.isfile(os.path.join(output_dir, n)) for n in ("vocab.json", "merges.txt")):
        tokenizer.backend_tokenizer.model.save(output_dir)  # writes vocab.json and merges.txt


def copy_tokenizer(source_dir: str, output_dir: str, model_max_length: int | None = None):
    """The tokenizer of source_dir written next to a model in output_dir (save_tokenizer: GPT-2's files, which
    transformers 4.x and 5.x both load, with the model's context as model_max_length); FileNotFoundError when
    source_dir holds none."""
    save_tokenizer(load_tokenizer(source_dir), output_dir, source_dir=source_dir, model_max_length=model_max_length)


def tokenizer_files(path: str) -> list[str]:
    """The files that define a tokenizer directory (for checksums in data sidecars)."""
    return [os.path.join(path, n) for n in ("vocab.json", "merges.txt", "tokenizer.json") if os.path.isfile(os.path.join(path, n))]
