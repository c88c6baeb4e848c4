"""load_model: the one way a model is read, whatever holds it.

    load_model("out/run/final")                      an HF-format directory (ours or transformers'), or a weight file
    load_model("openai-community/gpt2")              a hub id (downloaded into huggingface_hub's cache)
    load_model("out/run/checkpoint/step_0000100")    a training checkpoint: one process's, or a torchrun run's sharded
                                                     one, gathered into one model here (any layout)
    load_model(path, "GPT2ForSequenceClassification", adapter="out/lora/final/adapter")

The head is chosen here and nowhere else, by the HF architecture string: the one asked for, else the one the checkpoint
records (its config.json's `architectures`), else the language model. A checkpoint of another head does not load as a
classifier (its `score` head would be random) unless new_head=True, which a finetune asks for: the head then starts as
HF starts one. A torchrun run's internal vocab padding is cut to vocab_size and redone for the model's config (its
pad_vocab_size_multiple, from `overrides`). Sharded checkpoints are read through safe_dcp (no pickle runs code); the
others with torch.load(weights_only=True) or safetensors.
"""
from __future__ import annotations

import os

from . import checkpoints as ckpt
from .config import HF_CONFIG, GPT2Config
from .hf import load_pretrained, model_from_state, pad_vocab, resolve_model_path
from .model import CLASSIFIER, LANGUAGE_MODEL, model_class
from .schema import parse, read_json

VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


def load_model(path_or_hub_id: str, architecture: str | None = None, dtype=None, device=None,
               overrides: dict | None = None, adapter: str | None = None, new_head: bool = False):
    """The model in `path_or_hub_id` (see the module's doc), in eval mode, on `device` (default: the CPU), in `dtype`
    (default: the checkpoint's floating dtype). overrides: GPT2Config fields the checkpoint does not fix (dropout,
    num_labels, the attention kernel, the vocab padding). adapter: a PEFT adapter directory, merged in (a SEQ_CLS
    adapter brings the classifier head it trained)."""
    path = resolve_model_path(path_or_hub_id)
    found = checkpoint_architecture(path)
    architecture = architecture or found or LANGUAGE_MODEL
    overrides = dict(overrides or {})
    if adapter and architecture == CLASSIFIER:
        from .lora import adapter_head_rows, read_adapter_config
        read_adapter_config(adapter)  # one-line error when it is not an adapter directory
        rows = adapter_head_rows(adapter, "score")
        if rows is not None:  # the classification head comes with the adapter
            overrides["num_labels"], found = rows, CLASSIFIER
    if architecture == CLASSIFIER and found not in (None, CLASSIFIER) and not new_head:
        raise ValueError(f"{path} is a {found} checkpoint without a classification head: pass a model finetuned for "
                         f"text_classification ({CLASSIFIER})")
    cls = model_class(architecture)
    if os.path.isdir(path) and (ckpt.is_sharded(path) or ckpt.is_training_checkpoint(path)):
        model = model_from_checkpoint(cls, path, overrides, dtype=dtype, device=device)
    else:
        model = load_pretrained(cls, path, dtype=dtype, device=device, name=path_or_hub_id, **overrides)
    if adapter:
        from .lora import load_adapter
        model = load_adapter(model, adapter, merge=True).to(device or "cpu")
    return model.eval()


def checkpoint_architecture(path: str) -> str | None:
    """The HF architecture a checkpoint records (config.json's architectures, a sharded checkpoint's meta), or None."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path) and ckpt.is_sharded(path):
        from .safe_dcp import read_meta
        return read_meta(path)["architecture"]
    file = os.path.join(directory or ".", "config.json")
    if not os.path.isfile(file):
        return None
    architectures = parse(read_json(file, fix="re-export the model"), HF_CONFIG, file).architectures or []
    return next((a for a in architectures if a in (LANGUAGE_MODEL, CLASSIFIER)), architectures[0] if architectures
                else None)


def checkpoint_state(path: str) -> tuple[GPT2Config, dict]:
    """(config, our state dict) of a training checkpoint directory, verified: a torchrun run's sharded one (its
    vocab padding is the run's layout, so the config's is reset to none) or one process's (model.pt)."""
    if ckpt.is_sharded(path):
        from .safe_dcp import load_full_model_state
        config, state, _ = load_full_model_state(path)
        return config.replace(pad_vocab_size_multiple=1), state
    manifest = ckpt.verify_checkpoint(path, ckpt.MODEL_FILES)  # the weights alone: the optimizer state is not read
    if manifest.get("meta", {}).get("lora"):
        raise ValueError(f"{path} is a LoRA training checkpoint (it holds the adapters only): load its run's final/ "
                         f"directory (the merged model), or final/adapter on the base model")
    config = GPT2Config.from_json_file(os.path.join(path, "config.json"))
    return config, ckpt.load_checkpoint(path, ["model"], verify=False)["model"]


def model_from_checkpoint(cls, path: str, overrides: dict | None = None, dtype=None, device=None):
    """A training checkpoint (checkpoint_state) as one model of class `cls`, its config updated by `overrides`."""
    config, state = checkpoint_state(path)
    config = config.replace(**(overrides or {}))
    state = {k: pad_vocab(v[: config.vocab_size], config) if k in VOCAB_ROWS else v for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = model_from_state(cls, config, state, source=path, dtype=dtype, device=device)
    model.name_or_path = os.path.abspath(path)
    return model

