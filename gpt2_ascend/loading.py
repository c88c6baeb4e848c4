"""load_model: the one way a model is read, whatever holds it; inspect_model: what it will be, read without a weight.

    load_model("out/run/final")                      an HF-format directory (ours or transformers'), or a weight file
    load_model("openai-community/gpt2")              a hub id (downloaded into huggingface_hub's cache)
    load_model("out/run/checkpoint/step_0000100")    a training checkpoint: one process's, or a torchrun run's sharded
                                                     one, gathered into one model here (any layout)
    load_model("out/lora/final/adapter")             a PEFT adapter directory, on the base model it names (merged;
                                                     keep_adapters=True: a LoRA model to go on training)
    load_model(path, "GPT2ForSequenceClassification", adapter="out/lora/final/adapter")   an adapter on another base
    load_model("gpt2.ckpt", shape=dict(n_head=12))   a MindFormers .ckpt (the heads and activation, which it does not
                                                     store: from `shape`, else a config.json beside it, else the
                                                     preset of its width); with LoRA tensors, lora_alpha scales them
    load_model("output/")                            a MindFormers distributed checkpoint: output/checkpoint/rank_N/
    load_model("output/checkpoint", strategy="output/strategy")   and its strategy, the slices merged here

Every command and run mode loads through here (train.py's start weights, --run_mode eval / predict, evaluate.py,
generate.py, the converters), so each takes every source. The head is chosen here and nowhere else, by the HF
architecture string: the one asked for, else the one the checkpoint records (its config.json's `architectures`),
else the language model. A checkpoint of another head does not load as a classifier (its `score` head would be
random) unless new_head=True, which a finetune asks for: the head then starts as HF starts one. A torchrun run's
internal vocab padding is cut to vocab_size and redone for the model's config (its pad_vocab_size_multiple, from
`overrides`). Sharded checkpoints are read through safe_dcp (no pickle runs code); the others with
torch.load(weights_only=True) or safetensors.
"""
from __future__ import annotations

import os

from . import checkpoints as ckpt
from .budget import require_model_memory
from .config import HF_CONFIG, GPT2Config
from .hf import load_pretrained, model_from_state, pad_vocab, parse_dtype, resolve_model_path, weight_files
from .lora import adapter_base, is_adapter_dir, load_adapter, read_adapter_config
from .mindspore_io.distributed import is_distributed_checkpoint
from .model import CLASSIFIER, LANGUAGE_MODEL, model_class
from .schema import parse, read_json

VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


def load_model(path_or_hub_id: str, architecture: str | None = None, dtype=None, device=None,
               overrides: dict | None = None, adapter: str | None = None, new_head: bool = False,
               strategy: str | None = None, shape: dict | None = None, lora_alpha: float | None = None,
               lora_dropout: float = 0.0, keep_adapters: bool = False):
    """The model in `path_or_hub_id` (see the module's doc), in eval mode, on `device` (default: the CPU), in `dtype`
    (default: the checkpoint's floating dtype). overrides: GPT2Config fields the checkpoint does not fix (dropout,
    num_labels, the attention kernel, the vocab padding). adapter: a PEFT adapter directory, merged in (a SEQ_CLS
    adapter brings the classifier head it trained). strategy: a MindSpore distributed checkpoint's strategy folder or
    file, when path is its checkpoint/ folder. shape: what MindSpore weights do not store (mindspore_shape).
    lora_alpha, lora_dropout: a MindFormers LoRA .ckpt's adapters' scale and dropout (a LoRA recipe's pet_config: the
    checkpoint stores neither; without lora_alpha such a checkpoint is refused). keep_adapters: an adapter directory
    or LoRA .ckpt as a LoRA model whose adapters train, not merged."""
    path, name = resolve_model_path(path_or_hub_id), path_or_hub_id
    if os.path.isdir(path) and is_adapter_dir(path):  # an adapter directory: on the base model it names
        if adapter:
            raise ValueError(f"{path} is a LoRA adapter directory itself: pass its base model with the adapter, or "
                             f"the adapter alone")
        name, adapter = adapter_base(path), path
        path = resolve_model_path(name)
    with ckpt.reading(path):  # a checkpoint pruned by a running training run meanwhile: said so
        if strategy is not None or is_mindspore(path):
            model = model_from_mindspore(path, architecture, overrides, dtype, device, new_head, strategy, shape,
                                         lora_alpha, lora_dropout, keep_adapters)
        else:
            model = _load_model(path, name, architecture, dtype, device, overrides, adapter, new_head)
        if adapter:
            model = load_adapter(model, adapter, merge=not keep_adapters, trainable=keep_adapters).to(device or "cpu")
    return model.eval()


def _load_model(path: str, path_or_hub_id: str, architecture, dtype, device, overrides, adapter, new_head: bool):
    """An HF-format model or a training checkpoint (one process or sharded); `adapter` only to size a classifier's
    head from it (load_model merges it)."""
    architecture, overrides = choose_head(path, architecture, overrides, adapter, new_head)
    cls = model_class(architecture)
    if os.path.isdir(path) and (ckpt.is_sharded(path) or ckpt.is_training_checkpoint(path)):
        model = model_from_checkpoint(cls, path, overrides, dtype=dtype, device=device)
    else:
        model = load_pretrained(cls, path, dtype=dtype, device=device, name=path_or_hub_id, **overrides)
    return model


def choose_head(path: str, architecture: str | None, overrides: dict | None, adapter: str | None, new_head: bool):
    """(architecture, overrides) of an HF-format model or training checkpoint: the one asked for, else the
    checkpoint's; a classifier adapter's head rows become num_labels. A language model is no classifier unless
    new_head (a finetune that starts a head)."""
    found = checkpoint_architecture(path)
    architecture = architecture or found or LANGUAGE_MODEL
    overrides = dict(overrides or {})
    if adapter and architecture == CLASSIFIER:
        from .lora import adapter_head_rows
        read_adapter_config(adapter)  # one-line error when it is not an adapter directory
        rows = adapter_head_rows(adapter, "score")
        if rows is not None:  # the classification head comes with the adapter
            overrides["num_labels"], found = rows, CLASSIFIER
    refuse_missing_head(path, architecture, found, new_head)
    return architecture, overrides


def refuse_missing_head(path: str, architecture: str | None, found: str | None, new_head: bool):
    if architecture == CLASSIFIER and found not in (None, CLASSIFIER) and not new_head:
        raise ValueError(f"{path} is a {found} checkpoint without a classification head: pass a model finetuned for "
                         f"text_classification ({CLASSIFIER})")


def is_mindspore(path: str) -> bool:
    """MindSpore weights: a .ckpt file, or a distributed checkpoint (rank_N/ folders; output/ holding checkpoint/)."""
    return (os.path.isfile(path) and path.endswith(".ckpt")) or is_distributed_checkpoint(path)


def mindspore_shape(path: str, strategy: str | None = None, n_head: int | None = None,
                    activation: str | None = None) -> dict:
    """load_model's `shape` from a command's --n_head / --activation: what a MindSpore checkpoint does not store;
    refused for other models, whose config.json fixes them."""
    given = {k: v for k, v in dict(n_head=n_head, activation=activation).items() if v is not None}
    if given and strategy is None and not is_mindspore(path):
        raise ValueError(f"--{next(iter(given))} is for MindSpore checkpoints (.ckpt or distributed), which do not "
                         f"store it; {path}'s config.json fixes the model's shape: leave it out")
    return given


def recipe_shape(n_embd: int, n_head: int, activation: str, source: str, given: bool = False) -> dict:
    """load_model's `shape` from a recipe's model_config: its heads and activation are a MindSpore checkpoint's when
    the user set them (given: a flag or an override; named in messages as the recipe key) or when the recipe
    describes a model of the checkpoint's width (its hidden_size)."""
    if given:
        return dict(n_head=n_head, activation=activation, given_as="model.model_config.num_heads")
    return dict(described=dict(n_embd=n_embd, n_head=n_head, activation=activation, source=source))


def shape_from_overrides(overrides: dict | None, shape: dict | None) -> tuple[dict, dict]:
    """(overrides, shape) with overrides' n_head / activation moved into shape: the way the Python API gave a .ckpt's
    heads before `shape` (load_model(path, overrides=dict(n_head=12))) keeps working."""
    overrides, shape = dict(overrides or {}), dict(shape or {})
    for key in ("n_head", "activation"):
        if key in overrides:
            shape.setdefault(key, overrides.pop(key))
    return overrides, shape


def open_mindspore(path: str, shape: dict | None, strategy: str | None = None, verify_crc: bool = True):
    """A MindFormersSource (mindspore_io/source.py) of `path`, its heads and activation from `shape`."""
    from .mindspore_io.source import MindFormersSource
    shape = dict(shape or {})
    return MindFormersSource(path, shape.get("n_head"), shape.get("activation"), verify_crc=verify_crc,
                             strategy=strategy, described=shape.get("described"),
                             given_as=shape.get("given_as", "--n_head"))


def model_from_mindspore(path: str, architecture: str | None, overrides: dict | None, dtype, device, new_head: bool,
                         strategy: str | None = None, shape: dict | None = None, lora_alpha: float | None = None,
                         lora_dropout: float = 0.0, keep_adapters: bool = False):
    """MindFormers GPT-2 weights (mindspore_io.source) as a model of `architecture` (default: the checkpoint's); a
    LoRA checkpoint's adapters (mindspore_io.lora) scaled by lora_alpha, merged unless keep_adapters."""
    from .mindspore_io.source import model_from_source
    overrides, shape = shape_from_overrides(overrides, shape)
    with open_mindspore(path, shape, strategy) as source:
        if lora_alpha is None:
            source.refuse_lora()
        refuse_missing_head(path, architecture, source.architecture, new_head)
        cls, config = model_class(architecture or source.architecture), source.config
        if not source.lora_names:
            model = model_from_source(source, cls, dtype, device, **(overrides or {}))
            model.name_or_path = os.path.abspath(path)
            return model
    from .lora import merge_adapter, unwrap_model
    from .mindspore_io.lora import load_mindformers_lora
    model = load_mindformers_lora(path, lora_alpha, config.n_head, config.activation, cls=cls, verify_crc=False,
                                  strategy=strategy, lora_dropout=lora_dropout, **(overrides or {}))
    unwrap_model(model).name_or_path = os.path.abspath(path)
    if not keep_adapters:
        layout, model = model.lora_layout, merge_adapter(model)
        model.lora_layout = layout  # (rank, targets): what was merged, for the caller's report
        model = model.to(parse_dtype(dtype)) if dtype is not None else model
    return model.to(device or "cpu")


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


# ---------------------------------------------------------------------------------------------
# inspect_model: the checks and the shape, before any weight is read
# ---------------------------------------------------------------------------------------------
def inspect_model(path_or_hub_id: str, architecture: str | None = None, overrides: dict | None = None,
                  strategy: str | None = None, shape: dict | None = None, lora_alpha: float | None = None,
                  new_head: bool = False, adapter: str | None = None, **_loading_only) -> GPT2Config:
    """The config of the model load_model would build from these arguments, read from the source's small files
    (config.json, a manifest, a sharded checkpoint's meta, a .ckpt's index, an adapter's config) and checked as
    load_model checks them, without reading a weight: a missing, damaged or unfitting source is the same one-line
    error, before the data are tokenized or the model is built (a hub id is downloaded here, once). It takes
    load_model's arguments (those about weights alone are ignored)."""
    path = resolve_model_path(path_or_hub_id)  # a path not there: one line; a hub id: downloaded now, once
    if os.path.isdir(path) and is_adapter_dir(path):
        adapter, path = path, resolve_model_path(adapter_base(path))
    if adapter:
        read_adapter_config(adapter)
    changes = dict(overrides or {})
    if strategy is not None or is_mindspore(path):
        changes, shape = shape_from_overrides(changes, shape)
        with open_mindspore(path, shape, strategy) as source:  # its index: every tensor's name, dtype and shape
            if lora_alpha is None:
                source.refuse_lora()
            refuse_missing_head(path, architecture, source.architecture, new_head)
            return source.config.replace(**changes)
    architecture, changes = choose_head(path, architecture, changes, adapter, new_head)
    if os.path.isdir(path) and ckpt.is_sharded(path):
        from .safe_dcp import read_meta
        config = GPT2Config.from_hf_dict(read_meta(path)["model_config"])
        return config.replace(**dict(pad_vocab_size_multiple=1, **changes))
    if os.path.isdir(path) and ckpt.is_training_checkpoint(path):
        refuse_lora_checkpoint(path, ckpt.verify_checkpoint(path, ckpt.MODEL_FILES, hashes=False))  # (hashes: loaded)
        return GPT2Config.from_json_file(os.path.join(path, "config.json")).replace(**changes)
    from .hf import load_config
    config = load_config(path, **changes)
    weight_files(path)  # the weights are there (one line naming what is missing otherwise)
    return config


# ---------------------------------------------------------------------------------------------
# training checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_state(path: str, fits=lambda config: None) -> tuple[GPT2Config, dict]:
    """(config, our state dict) of a training checkpoint directory, verified: a torchrun run's sharded one (its
    vocab padding is the run's layout, so the config's is reset to none) or one process's (model.pt). fits(config)
    is called before any weight is read (the memory budget)."""
    if ckpt.is_sharded(path):
        from .safe_dcp import load_full_model_state, read_meta
        fits(GPT2Config.from_hf_dict(read_meta(path)["model_config"]))
        config, state, _ = load_full_model_state(path)
        return config.replace(pad_vocab_size_multiple=1), state
    refuse_lora_checkpoint(path, ckpt.verify_checkpoint(path, ckpt.MODEL_FILES))  # the optimizer state is not read
    config = GPT2Config.from_json_file(os.path.join(path, "config.json"))
    fits(config)
    return config, ckpt.load_checkpoint(path, ["model"], verify=False)["model"]


def refuse_lora_checkpoint(path: str, manifest: dict):
    if manifest.get("meta", {}).get("lora"):
        raise ValueError(f"{path} is a LoRA training checkpoint (it holds the adapters only): load its run's final/ "
                         f"directory (the merged model), or final/adapter on the base model")


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
