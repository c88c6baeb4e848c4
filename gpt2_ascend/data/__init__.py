"""Data: the GPT-2 tokenizer; WikiText-2 and plain-text corpora -> token blocks (.npy + JSON sidecar), GLUE SST-2 ->
classification rows (.npz + sidecar); any of them read by sources.py, batched by loader.py; the data directory with
checksum-verified downloads. See docs/data.md.

Names are imported lazily, so that `python -m gpt2_ascend.data.wikitext2` runs its module only once."""
import importlib

_HOMES = {
    "download": ("dataset_path", "default_data_dir", "ensure_data_dir"),  # download(): gpt2_ascend.data.download
    "sources": ("load_token_blocks", "load_txtcls"),
    "store": ("load_arrays", "load_blocks", "save_arrays", "save_blocks"),
    "text": ("pack_blocks", "prepare_text_corpus", "resolve_tokenizer", "tokenize_text"),
    "txtcls": ("prepare_txtcls", "read_sst2"),
    "wikitext2": ("prepare_wikitext2", "read_passages", "wikitext2_token_stream", "wikitext_clean"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name):
    if name in _HOME_OF:
        return getattr(importlib.import_module(f".{_HOME_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
