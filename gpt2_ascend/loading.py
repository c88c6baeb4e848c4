"""load_model: the one way a model is read, whatever holds it.

    load_model("out/run/final")                      an HF-format directory (ours or transformers'), or a weight file
    load_model("openai-community/gpt2")              a hub id (downloaded into huggingface_hub's cache)
    load_model("out/run/checkpoint/step_0000100")    a training checkpoint: one process's, or a torchrun run's sharded
                                                     one, gathered into one model here (any layout)
    load_model(path, "GPT2ForSequenceClassification", adapter="out/lora/final/adapter")
    load_model("gpt2.ckpt", overrides=dict(n_head=12))   a MindFormers .ckpt (the heads and activation, which it does
                                                     not store: from overrides, else the preset of its width)
    load_model("output/")                            a MindFormers distributed checkpoint: output/checkpoint/rank_N/
    load_model("output/checkpoint", strategy="output/strategy")   and its strategy, the slices merged here

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
from .budget import require_model_memory
from .config import HF_CONFIG, GPT2Config
from .hf import load_pretrained, model_from_state, pad_vocab, parse_dtype, resolve_model_path
from .mindspore_io.distributed import is_distributed_checkpoint
from .model import CLASSIFIER, LANGUAGE_MODEL, model_class
from .schema import parse, read_json

VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


def load_model(path_or_hub_id: str, architecture: str | None = None, dtype=None, device=None,
               overrides: dict | None = None, adapter: str | None = None, new_head: bool = False,
               strategy: str | None = None):
    """The model in `path_or_hub_id` (see the module's doc), in eval mode, on `device` (default: the CPU), in `dtype`
    (default: the checkpoint's floating dtype). overrides: GPT2Config fields the checkpoint does not fix (dropout,
    num_labels, the attention kernel, the vocab padding; for MindSpore weights also n_head and activation).
    adapter: a PEFT adapter directory, merged in (a SEQ_CLS adapter brings the classifier head it trained).
    strategy: a MindSpore distributed checkpoint's strategy folder or file, when path is its checkpoint/ folder."""
    path = resolve_model_path(path_or_hub_id)
    with ckpt.reading(path):  # a checkpoint pruned by a running training run meanwhile: said so
        if strategy is not None or is_mindspore(path):
            model = model_from_mindspore(path, architecture, overrides, dtype, device, new_head, strategy)
        else:
            model = _load_model(path, path_or_hub_id, architecture, dtype, device, overrides, adapter, new_head)
        if adapter:
            from .lora import load_adapter
            model = load_adapter(model, adapter, merge=True).to(device or "cpu")
    return model.eval()


def _load_model(path: str, path_or_hub_id: str, architecture, dtype, device, overrides, adapter, new_head: bool):
    """An HF-format model or a training checkpoint (one process or sharded); `adapter` only to size a classifier's
    head from it (load_model merges it)."""
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
    return model


def is_mindspore(path: str) -> bool:
    """MindSpore weights: a .ckpt file, or a distributed checkpoint (rank_N/ folders; output/ holding checkpoint/)."""
    return (os.path.isfile(path) and path.endswith(".ckpt")) or is_distributed_checkpoint(path)


def mindspore_overrides(path: str, strategy: str | None = None, n_head: int | None = None,
                        activation: str | None = None) -> dict:
    """load_model overrides for what a MindSpore checkpoint does not store (the heads, the activation: a command's
    --n_head / --activation); refused for other models, whose config.json fixes them."""
    given = {k: v for k, v in dict(n_head=n_head, activation=activation).items() if v is not None}
    if given and strategy is None and not is_mindspore(path):
        raise ValueError(f"--{next(iter(given))} is for MindSpore checkpoints (.ckpt or distributed), which do not "
                         f"store it; {path}'s config.json fixes the model's shape: leave it out")
    return given


def model_from_mindspore(path: str, architecture: str | None, overrides: dict | None, dtype, device, new_head: bool,
                         strategy: str | None = None):
    """MindFormers GPT-2 weights (mindspore_io.source) as a model of `architecture` (default: the checkpoint's)."""
    from .mindspore_io.source import MindFormersSource, model_from_source
    overrides = dict(overrides or {})
    n_head, activation = overrides.pop("n_head", None), overrides.pop("activation", None)
    with MindFormersSource(path, n_head, activation, strategy=strategy) as source:
        source.refuse_lora()
        found = source.architecture
        if architecture == CLASSIFIER and found != CLASSIFIER and not new_head:
            raise ValueError(f"{path} is a {found} checkpoint without a classification head: pass a model finetuned "
                             f"for text_classification ({CLASSIFIER})")
        model = model_from_source(source, model_class(architecture or found), dtype, device, **overrides)
    model.name_or_path = os.path.abspath(path)
    return model


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


def checkpoint_state(path: str, fits=lambda config: None) -> tuple[GPT2Config, dict]:
    """(config, our state dict) of a training checkpoint directory, verified: a torchrun run's sharded one (its
    vocab padding is the run's layout, so the config's is reset to none) or one process's (model.pt). fits(config)
    is called before any weight is read (the memory budget)."""
    if ckpt.is_sharded(path):
        from .safe_dcp import load_full_model_state, read_meta
        fits(GPT2Config.from_hf_dict(read_meta(path)["model_config"]))
        config, state, _ = load_full_model_state(path)
        return config.replace(pad_vocab_size_multiple=1), state
    manifest = ckpt.verify_checkpoint(path, ckpt.MODEL_FILES)  # the weights alone: the optimizer state is not read
    if manifest.get("meta", {}).get("lora"):
        raise ValueError(f"{path} is a LoRA training checkpoint (it holds the adapters only): load its run's final/ "
                         f"directory (the merged model), or final/adapter on the base model")
    config = GPT2Config.from_json_file(os.path.join(path, "config.json"))
    fits(config)
    return config, ckpt.load_checkpoint(path, ["model"], verify=False)["model"]


def model_from_checkpoint(cls, path: str, overrides: dict | None = None, dtype=None, device=None):
    """A training checkpoint (checkpoint_state) as one model of class `cls`, its config updated by `overrides`."""
    def fits(config: GPT2Config):
        require_model_memory(config.replace(**(overrides or {})), device, parse_dtype(dtype),
                             f"the model in {path}", classifier=cls.hf_architecture == CLASSIFIER)
    config, state = checkpoint_state(path, fits)
    config = config.replace(**(overrides or {}))
    state = {k: pad_vocab(v[: config.vocab_size], config) if k in VOCAB_ROWS else v for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = model_from_state(cls, config, state, source=path, dtype=dtype, device=device)
    model.name_or_path = os.path.abspath(path)
    return model

