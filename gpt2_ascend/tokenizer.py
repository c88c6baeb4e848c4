"""GPT-2's byte-level BPE tokenizer, as transformers' own GPT2TokenizerFast (eos = pad = bos = 50256).

The class matters for exports: transformers 5 saves a generic PreTrainedTokenizerFast as
"TokenizersBackend", a class transformers 4 does not have; a GPT2TokenizerFast is saved as "GPT2Tokenizer",
which both major versions load (4.x picks its GPT2TokenizerFast, 5.x its GPT2Tokenizer)."""
from __future__ import annotations

import os
import shutil

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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


def _gpt2_tokenizer(path: str):
    """GPT2TokenizerFast from a directory with vocab.json + merges.txt or tokenizer.json. Byte-level BPE
    decodes exactly what was encoded, so no clean-up of spaces (transformers 4.x would default to it)."""
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast.from_pretrained(path, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                             pad_token=EOS_TOKEN, model_max_length=1024,
                                             clean_up_tokenization_spaces=False)


def load_tokenizer(path_or_hub_id: str | None = None):
    """A fast GPT-2 tokenizer from a directory (vocab.json + merges.txt, or tokenizer.json) or a hub id.

    With no argument it reads the GPT-2 files of the data directory (GPT2_DATA_DIR)."""
    path = path_or_hub_id or default_tokenizer_dir()
    if os.path.isdir(path):
        has_bpe = all(os.path.isfile(os.path.join(path, n)) for n in ("vocab.json", "merges.txt"))
        if not (has_bpe or os.path.isfile(os.path.join(path, "tokenizer.json"))):
            raise FileNotFoundError(f"no tokenizer in {path}: expected vocab.json + merges.txt or tokenizer.json")
        return _gpt2_tokenizer(path)
    if os.path.exists(path) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    from .hf import download_from_hub
    return load_tokenizer(download_from_hub(path))


def save_tokenizer(tokenizer, output_dir: str, source_dir: str | None = None):
    """Write tokenizer files next to a model: tokenizer.json + tokenizer_config.json, and vocab.json +
    merges.txt (the original files where known, else the BPE model's), so that transformers' slow
    GPT2Tokenizer of 4.x loads the export too."""
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    for name in ("vocab.json", "merges.txt"):
        src = os.path.join(source_dir, name) if source_dir else ""
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(output_dir, name))
    if not all(os.path.isfile(os.path.join(output_dir, n)) for n in ("vocab.json", "merges.txt")):
        tokenizer.backend_tokenizer.model.save(output_dir)  # writes vocab.json and merges.txt


def tokenizer_files(path: str) -> list[str]:
    """The files that define a tokenizer directory (for checksums in data sidecars)."""
    return [os.path.join(path, n) for n in ("vocab.json", "merges.txt", "tokenizer.json") if os.path.isfile(os.path.join(path, n))]
