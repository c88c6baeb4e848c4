"""GPT-2's byte-level BPE tokenizer, as a transformers fast tokenizer (eos = pad = bos = 50256)."""
from __future__ import annotations

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
            tok = _from_vocab_and_merges(vocab, merges)
        elif os.path.isfile(os.path.join(path, "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast
            tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), bos_token=EOS_TOKEN,
                                          eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, **LOSSLESS_DECODE)
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
