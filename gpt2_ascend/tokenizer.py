"""GPT-2's byte-level BPE tokenizer, as a transformers fast tokenizer (eos = pad = bos = 50256)."""
from __future__ import annotations

import json
import os
import shutil

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Byte-level BPE decodes back to the exact text. transformers 4.x defaults to "cleaning up" spaces before
# punctuation on decode (WikiText's "world ." became "world."); 5.x does not: say it for every version.
LOSSLESS_DECODE = dict(clean_up_tokenization_spaces=False)


def default_data_dir() -> str:
    """GPT2_DATA_DIR, else the ../shared/data folder beside the checkout, else ~/.cache/gpt2_ascend/data."""
    env = os.environ.get("GPT2_DATA_DIR")
    if env:
        return env
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = os.path.join(os.path.dirname(repo_root), "shared", "data")
    if os.path.isdir(shared):
        return shared
    return os.path.join(os.path.expanduser("~"), ".cache", "gpt2_ascend", "data")


def default_tokenizer_dir() -> str:
    return os.path.join(default_data_dir(), "gpt2")


def check_bpe_files(vocab_path: str, merges_path: str):
    """vocab.json and merges.txt must be whole and a pair: a damaged file is one ValueError naming it (the
    tokenizers library raises a bare Exception, and reads a truncated merges.txt without complaint, tokenizing
    differently)."""
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError("not a JSON object of token -> id")
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{vocab_path} is damaged or not a BPE vocabulary ({str(e).splitlines()[0]}): "
                         f"re-copy the tokenizer files") from None
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


def _from_vocab_and_merges(vocab: str, merges: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE.from_file(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN, **LOSSLESS_DECODE)


def load_tokenizer(path_or_hub_id: str | None = None):
    """A fast GPT-2 tokenizer from a directory (vocab.json + merges.txt, or tokenizer.json) or a hub id.

    With no argument it reads the GPT-2 files of the data directory (GPT2_DATA_DIR)."""
    path = path_or_hub_id or default_tokenizer_dir()
    if os.path.isdir(path):
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            check_bpe_files(vocab, merges)
            tok = _from_vocab_and_merges(vocab, merges)
        elif os.path.isfile(os.path.join(path, "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast
            file = os.path.join(path, "tokenizer.json")
            try:
                tok = PreTrainedTokenizerFast(tokenizer_file=file, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                              unk_token=EOS_TOKEN, **LOSSLESS_DECODE)
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise ValueError(f"{file} is damaged or not a tokenizer ({str(e).strip().splitlines()[0]}): "
                                 f"re-copy the tokenizer files") from None
        else:
            raise FileNotFoundError(f"no tokenizer in {path}: expected vocab.json + merges.txt or tokenizer.json")
    elif os.path.exists(path) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    else:
        from .hf import download_from_hub
        return load_tokenizer(download_from_hub(path))
    tok.pad_token = EOS_TOKEN
    tok.model_max_length = 1024
    return tok


def save_tokenizer(tokenizer, output_dir: str, source_dir: str | None = None):
    """Write tokenizer files next to a model: the original vocab/merges where known, plus tokenizer.json."""
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    if source_dir:
        for name in ("vocab.json", "merges.txt"):
            src = os.path.join(source_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(output_dir, name))


def tokenizer_files(path: str) -> list[str]:
    """The files that define a tokenizer directory (for checksums in data sidecars)."""
    return [os.path.join(path, n) for n in ("vocab.json", "merges.txt", "tokenizer.json") if os.path.isfile(os.path.join(path, n))]
