"""GPT2Config: one dataclass for every shape, named presets, and the mapping to HF's config.json."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional

from .schema import EXTRA, MAX_SIZE, REQUIRED, SEED_MAX, Key, SchemaError, check_fields, parse, read_json

ACTIVATIONS = ("gelu_new", "fast_gelu", "gelu")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "npu", "auto")
# How a fresh model is initialised (GPT2PreTrainedModel.init_weights):
#   hf:          HF GPT-2's: N(0, initializer_range) for embeddings and Linear weights, the residual projections
#                (c_proj) N(0, initializer_range / sqrt(2 n_layer)); biases 0, LayerNorm 1 / 0.
#   mindformers: MindFormers' GPT-2 (MindSpore's initializer('normal'), sigma 0.01: set initializer_range 0.01):
#                N(0, initializer_range) for both embeddings and every Linear weight, no residual scaling;
#                biases 0, LayerNorm 1 / 0.
INIT_STYLES = ("hf", "mindformers")

# MindFormers' shapes (its configs/gpt2/run_gpt2*.yaml). vocab 50257, eps 1e-5 and dropout 0.1 everywhere.
PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, activation="gelu_new"),
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, activation="gelu_new"),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, activation="gelu_new"),
    "large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, activation="gelu_new"),
    "xl": dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, activation="fast_gelu"),
    "13b": dict(n_layer=40, n_embd=5120, n_head=40, n_positions=2048, activation="fast_gelu"),
    "52b": dict(n_layer=64, n_embd=8192, n_head=32, n_positions=1024, activation="fast_gelu"),
}

# HF activation_function names -> ours. HF's "gelu_fast"/"gelu_pytorch_tanh" are the same tanh
# approximation as gelu_new; "quick_gelu" is x * sigmoid(1.702 x), MindSpore's fast_gelu.
HF_ACTIVATION_TO_OURS = {
    "gelu_new": "gelu_new", "gelu_fast": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
    "gelu_python_tanh": "gelu_new", "quick_gelu": "fast_gelu", "gelu": "gelu", "gelu_python": "gelu",
}
OURS_TO_HF_ACTIVATION = {"gelu_new": "gelu_new", "fast_gelu": "quick_gelu", "gelu": "gelu"}
# MindFormers' hidden_act names -> ours (its recipes and .ckpt conversions). MindFormers' GPT-2 "gelu" is the tanh
# approximation (HF gelu_new).
MINDFORMERS_ACTIVATIONS = {"gelu": "gelu_new", "gelu_new": "gelu_new", "fast_gelu": "fast_gelu", "gelu_exact": "gelu"}

# HF config.json keys that carry no meaning for the GPT-2 math (bookkeeping, generation defaults,
# GPT2DoubleHeads summary settings). Read and ignored; anything else unknown is an error.
HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "task_specific_params",
    "n_ctx", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "use_cache", "bos_token_id", "eos_token_id", "_name_or_path", "id2label",
    "label2id", "problem_type", "return_dict", "output_hidden_states", "output_attentions",
    "reorder_and_upcast_attn", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
    "add_cross_attention", "tokenizer_class", "prefix", "max_length", "do_sample", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "_attn_implementation_autoset", "attn_implementation",
    "gradient_checkpointing", "finetuning_task", "torchscript", "tie_encoder_decoder", "pruned_heads",
    "cross_attention_hidden_size", "decoder_start_token_id", "sep_token_id", "tf_legacy_loss",
    "use_bfloat16", "_commit_hash", "output_scores", "return_dict_in_generate", "transformers.js_config",
    # the generation defaults transformers 4.x kept on every config (its to_dict() writes them all)
    "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "length_penalty", "min_length", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_return_sequences", "remove_invalid_values", "repetition_penalty", "suppress_tokens",
    "temperature", "top_k", "top_p", "typical_p",
}


def _size(default):
    return Key(default, "int", minimum=1, maximum=MAX_SIZE)


def _rate(default):
    return Key(default, "float", minimum=0.0, below=1.0)


TOKEN_ID = Key(50256, "int", minimum=0, below=MAX_SIZE, nullable=True)
# GPT2Config's fields: what each accepts (GPT2Config checks itself against this; config.json's keys of the same name
# are read with the same Keys)
CONFIG_KEYS = dict(
    vocab_size=_size(50257), n_positions=_size(1024), n_embd=_size(768), n_layer=_size(12), n_head=_size(12),
    n_inner=Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True),
    activation=Key("gelu_new", "choice", ACTIVATIONS),
    layer_norm_epsilon=Key(1e-5, "float", above=0.0),
    embd_pdrop=_rate(0.1), attn_pdrop=_rate(0.1), resid_pdrop=_rate(0.1),
    initializer_range=Key(0.02, "float", minimum=0.0),
    init_style=Key("hf", "choice", INIT_STYLES),
    tie_word_embeddings=Key(True, "bool"),
    num_labels=_size(2),
    pad_token_id=TOKEN_ID, eos_token_id=TOKEN_ID, bos_token_id=TOKEN_ID,
    attn_implementation=Key("auto", "choice", ATTN_IMPLEMENTATIONS),
    gradient_checkpointing=Key(False, "bool"),
    pad_vocab_size_multiple=_size(1),
    loss_chunk_size=Key(0, "int", minimum=0, maximum=MAX_SIZE),
)


@dataclass
class GPT2Config:
    model_type: ClassVar[str] = "gpt2"  # what HF code (peft) reads to recognise the architecture
    # what transformers 4.x's pipeline() reads of a model's config (it has no hub revision, tokenizer class or task
    # parameters of its own: the pipeline then takes the tokenizer it is given)
    _commit_hash: ClassVar[Optional[str]] = None
    tokenizer_class: ClassVar[Optional[str]] = None
    task_specific_params: ClassVar[Optional[dict]] = None
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # None -> 4 * n_embd
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    init_style: str = "hf"  # hf | mindformers (INIT_STYLES)
    tie_word_embeddings: bool = True
    num_labels: int = 2
    pad_token_id: int = 50256
    eos_token_id: int = 50256
    bos_token_id: int = 50256
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    # Embedding rows are padded internally to a multiple of this (64 -> 50304, for fast matmuls and
    # vocab-parallel splits). Logits, losses and saved checkpoints always have exactly vocab_size.
    pad_vocab_size_multiple: int = 1
    # Tokens per chunk of the fused LM head + cross-entropy when training with next-token targets (0: plain logits
    # + cross-entropy). A training setting: never written to config.json.
    loss_chunk_size: int = 0
    id2label: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_fields(self, CONFIG_KEYS, "GPT2Config")  # types and ranges: one line naming the field
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    # ---- derived sizes ----
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    # ---- construction ----
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if not (k == "model_type" and v == cls.model_type)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT2Config key {unknown[0]!r}: valid keys are {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # no model_type: peft would then look for HF-only keys (_name_or_path)

    @classmethod
    def from_pretrained(cls, path: str) -> "GPT2Config":
        """The config of an HF GPT-2 directory (its config.json), as transformers' config classes offer it
        (peft calls this on the base model's config class)."""
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    def replace(self, **changes) -> "GPT2Config":
        return self.from_dict({**self.to_dict(), **changes})

    # ---- HF config.json ----
    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "GPT2Config":
        """Build from a transformers GPT-2 config.json dict (read from `source`, named in errors), checked key by
        key (HF_CONFIG); refuses features this model does not have."""
        hf = parse(hf, HF_CONFIG, source)
        for key, value, why in (("add_cross_attention", True, "cross-attention GPT-2 is not supported"),
                                ("scale_attn_by_inverse_layer_idx", True, "not supported"),
                                ("scale_attn_weights", False, "not supported")):
            if hf[key] is value:
                raise ValueError(f"{source} sets {key}={str(value).lower()}: {why}")
        mapped = {k: hf[k] for k in HF_CONFIG_FIELDS}
        mapped["activation"] = hf.activation_function  # HF's name, turned into ours by the choice
        id2label = hf.id2label
        if id2label and any(v != f"LABEL_{k}" for k, v in id2label.items()):
            mapped["id2label"] = id2label
        mapped["num_labels"] = hf.num_labels or (len(id2label) if id2label else 2)
        if id2label and len(id2label) != mapped["num_labels"]:
            raise SchemaError(f"bad value {hf.num_labels} for 'num_labels' in {source}: its id2label names "
                              f"{len(id2label)} labels")
        for name in ("eos_token_id", "bos_token_id"):
            if mapped[name] is None:
                mapped.pop(name)  # this model's default, as before
        if mapped["pad_token_id"] is None:
            mapped["pad_token_id"] = mapped.get("eos_token_id", cls.eos_token_id)  # GPT-2 convention: pad = eos
        # Our own extras survive a round trip through config.json under a namespaced key.
        try:
            return cls.from_dict({**mapped, **(hf.gpt2_ascend or {})})
        except ValueError as e:  # a rule of several keys (n_embd divisible by n_head): name the file too
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self, architecture: str = "GPT2LMHeadModel") -> dict:
        hf = dict(
            architectures=[architecture], model_type="gpt2", vocab_size=self.vocab_size,
            n_positions=self.n_positions, n_ctx=self.n_positions, n_embd=self.n_embd, n_layer=self.n_layer,
            n_head=self.n_head, n_inner=self.n_inner, activation_function=OURS_TO_HF_ACTIVATION[self.activation],
            layer_norm_epsilon=self.layer_norm_epsilon, embd_pdrop=self.embd_pdrop, attn_pdrop=self.attn_pdrop,
            resid_pdrop=self.resid_pdrop, initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings, scale_attn_weights=True, use_cache=True,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            summary_type="cls_index", summary_use_proj=True, summary_activation=None,
            summary_proj_to_labels=True, summary_first_dropout=0.1,
        )
        if architecture == "GPT2ForSequenceClassification":
            labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
            hf["id2label"] = {str(k): v for k, v in labels.items()}
            hf["label2id"] = {v: int(k) for k, v in labels.items()}
        extras = {k: getattr(self, k) for k in ("attn_implementation", "gradient_checkpointing", "pad_vocab_size_multiple",
                                                "init_style")
                  if getattr(self, k) != getattr(GPT2Config, k)}
        if extras:
            hf["gpt2_ascend"] = extras
        return hf

    @classmethod
    def from_json_file(cls, path: str) -> "GPT2Config":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.from_hf_dict(read_json(path, fix="re-export the model"), source=path)


def _label_names(labels: dict) -> dict:
    """config.json's id2label ({"0": "negative", ...}; a transformers object's has int keys) with int keys 0..n-1."""
    ids = [k if isinstance(k, int) else int(k) if isinstance(k, str) and k.isdigit() else None for k in labels]
    if sorted(i for i in ids if i is not None) != list(range(len(labels))):
        raise ValueError("a mapping of the label ids 0, 1, ... n-1 to label names")
    return {i: v for i, v in zip(ids, labels.values())}


HF_CONFIG_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon",
                    "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range", "tie_word_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id")
# config.json, key by key: GPT2Config's fields under HF's names with the same Keys, the keys HF writes that say nothing
# about the math (read, not checked), and our extras. Anything else is an unknown key.
HF_CONFIG = {
    **{name: Key(None, "any") for name in HF_IGNORED_KEYS},
    **{name: CONFIG_KEYS[name] for name in HF_CONFIG_FIELDS},
    "pad_token_id": TOKEN_ID.but(default=None),  # none: eos, GPT-2's convention
    "model_type": Key("gpt2", "choice", ("gpt2",)),
    "activation_function": Key("gelu_new", "choice", HF_ACTIVATION_TO_OURS),
    "num_labels": Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True),
    "id2label": Key(None, "map", items=Key(REQUIRED, "str"), convert=_label_names,
                    expects="a mapping of the label ids 0, 1, ... n-1 to label names"),
    "label2id": Key(None, "map", items=Key(REQUIRED, "int", minimum=0, maximum=MAX_SIZE)),
    "n_ctx": Key(None, "int", minimum=1, maximum=MAX_SIZE),
    "architectures": Key(None, "list", items=Key(REQUIRED, "str")),
    "torch_dtype": Key(None, "str"), "dtype": Key(None, "str"),
    "add_cross_attention": Key(False, "bool"), "scale_attn_by_inverse_layer_idx": Key(False, "bool"),
    "scale_attn_weights": Key(True, "bool"), "reorder_and_upcast_attn": Key(False, "bool"),
    "use_cache": Key(True, "bool"),
    # GPT2ForSequenceClassification computes cross-entropy; HF's regression / multi-label losses are not here
    "problem_type": Key(None, "choice", ("single_label_classification",)),
    "gpt2_ascend": Key(None, "section", items={
        name: CONFIG_KEYS[name] for name in ("attn_implementation", "gradient_checkpointing",
                                             "pad_vocab_size_multiple", "init_style", "loss_chunk_size")}),
}


# ---------------------------------------------------------------------------------------------
# generation_config.json
# ---------------------------------------------------------------------------------------------
SAMPLING_ONLY_KEYS = ("temperature", "top_k", "top_p")
# Keys of a generation_config.json that say nothing about how to decode: the version that wrote it. (transformers'
# other bookkeeping, _from_model_config, is kept with the settings, so that a folder saved again is written alike.)
GENERATION_BOOKKEEPING_KEYS = {"transformers_version"}
# The sampling settings, in the ranges where the arithmetic stays finite in fp32 (one definition: generate()'s
# arguments, generate.py's flags, a recipe's model_config and generation_config.json are checked with these). The
# logits are divided by the temperature and multiplied or divided by the repetition penalty, so both stay in
# [1e-6, 1e6]: a model's logits (below 1e4) then stay below 1e10, far from fp32's 3.4e38, where 1e-45 (a denormal)
# turned every score into inf and the sampling probabilities into NaN. Greedy decoding is the limit of a temperature
# going to 0 (a greedy run ignores the temperature, so there 0 is accepted, as transformers accepts it).
MIN_TEMPERATURE = 1e-6
SAMPLING = dict(
    max_new_tokens=Key(None, "int", minimum=1, maximum=MAX_SIZE),
    min_new_tokens=Key(0, "int", minimum=0, maximum=MAX_SIZE),
    do_sample=Key(False, "bool"),
    temperature=Key(1.0, "float", minimum=0.0, maximum=1e6),
    top_k=Key(50, "int", minimum=0, maximum=MAX_SIZE),  # 0: off; past the vocabulary it keeps every token
    top_p=Key(1.0, "float", above=0.0, maximum=1.0),
    repetition_penalty=Key(1.0, "float", minimum=1e-6, maximum=1e6),
    seed=Key(None, "int", minimum=0, maximum=SEED_MAX),
)


def _token_ids(value):
    """A generation_config.json token id: an id, or a list of ids (transformers writes one eos id as a list)."""
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_SIZE for i in ids):
        raise ValueError(f"a token id in [0, {MAX_SIZE}) or a list of them")
    return ids[0] if len(ids) == 1 else ids


GENERATION_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# generation_config.json: the settings generate() implements, checked; the bookkeeping keys, read and ignored; any
# other transformers setting is kept, and generate() refuses it when it differs from transformers' default.
GENERATION_FILE = {
    **{name: Key(None, "any") for name in GENERATION_BOOKKEEPING_KEYS},
    **{name: Key(None, "any", convert=_token_ids, expects=f"a token id in [0, {MAX_SIZE}) or a list of them")
       for name in GENERATION_TOKEN_IDS},
    **{name: SAMPLING[name] for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                         "max_new_tokens", "min_new_tokens")},
    "max_length": Key(None, "int", minimum=1, maximum=MAX_SIZE),
    EXTRA: Key(None, "any"),
}


@dataclass
class GenerationConfig:
    """A generation_config.json as read and checked here (the settings below against their ranges; transformers'
    other settings kept in `extra`), turned into transformers' own GenerationConfig for the model
    (`to_transformers`): a key the file leaves out takes transformers' default (top_k 50, greedy, ...), so
    transformers' pipeline and our generate() decode the same folder the same way. Arguments passed to generate()
    win over these."""
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_length: Optional[int] = None  # prompt + new tokens (HF's name for MindFormers' max_decode_length)
    max_new_tokens: Optional[int] = None  # wins over max_length, as in transformers
    min_new_tokens: int = 0
    # the file's other transformers settings (num_beams, no_repeat_ngram_size, several eos ids, ...) that differ from
    # transformers' defaults: generate() hands them to transformers' own decoding (hf_generation.py)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_fields(self, {**{name: TOKEN_ID.but(default=None) for name in GENERATION_TOKEN_IDS},
                            **{k: v for k, v in GENERATION_FILE.items() if k in GENERATION_SETTINGS}},
                     "GenerationConfig")

    @classmethod
    def from_model_config(cls, config: GPT2Config, **settings) -> "GenerationConfig":
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id, **settings)

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "generation_config.json") -> "GenerationConfig":
        """A generation_config.json's dict (read from `source`, named in errors), checked (GENERATION_FILE)."""
        hf = parse(hf, GENERATION_FILE, source)
        if hf.do_sample and hf.temperature < MIN_TEMPERATURE:
            raise SchemaError(f"bad value {hf.temperature!r} for 'temperature' in {source}: expected a number in "
                              f"[{MIN_TEMPERATURE:g}, 1e+06] when do_sample is true (greedy decoding is the limit of a "
                              f"small temperature)")
        settings = {k: hf[k] for k in GENERATION_SETTINGS if hf[k] is not None or k in GENERATION_TOKEN_IDS}
        several = {k: v for k, v in settings.items() if isinstance(v, list)}  # several eos ids: transformers' decoding
        settings = {k: v for k, v in settings.items() if k not in several}
        others = {k: v for k, v in hf.items()
                  if k not in GENERATION_FILE or k in several}  # transformers' other settings
        return cls(**settings, extra=_non_default_generation_keys(others))

    def settings(self) -> dict:
        """The non-default settings, as transformers' GenerationConfig takes them; the sampling-only keys only when
        sampling (transformers warns about them in a greedy config, and refuses to save one)."""
        hf = {k: getattr(self, k) for k in GENERATION_TOKEN_IDS if getattr(self, k) is not None}
        if self.do_sample:
            hf.update(do_sample=True, **{k: getattr(self, k) for k in SAMPLING_ONLY_KEYS})
        for key, default in (("repetition_penalty", 1.0), ("max_length", None), ("max_new_tokens", None),
                             ("min_new_tokens", 0)):
            if getattr(self, key) != default:
                hf[key] = getattr(self, key)
        return {**hf, **self.extra}

    def to_transformers(self, model_config: Optional[GPT2Config] = None):
        """transformers' GenerationConfig with these settings. One that only repeats the model config's token ids is
        the one transformers derives from the model config (GenerationConfig.from_model_config), so that an export
        writes the generation_config.json transformers writes for GPT-2."""
        import transformers
        settings = self.settings()
        if model_config is not None and settings == {k: getattr(model_config, k) for k in GENERATION_TOKEN_IDS
                                                     if getattr(model_config, k) is not None}:
            return transformers.GenerationConfig.from_model_config(
                transformers.GPT2Config(**model_config.to_hf_dict()))
        config = transformers.GenerationConfig.from_dict(settings)
        config._original_object_hash = hash(config)  # as transformers' loaders stamp it: "not modified since"
        return config

    @classmethod
    def from_json_file(cls, path: str) -> "GenerationConfig":
        return cls.from_hf_dict(read_json(path, fix="delete it or re-export the model"), source=path)


GENERATION_SETTINGS = GENERATION_TOKEN_IDS + ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                              "max_length", "max_new_tokens", "min_new_tokens")


def _non_default_generation_keys(settings: dict) -> dict:
    """The settings that differ from transformers' defaults (num_beams 4, no_repeat_ngram_size 3, ...)."""
    if not settings:
        return {}
    from transformers import GenerationConfig as HFGenerationConfig
    defaults = HFGenerationConfig().to_dict()
    return {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}
