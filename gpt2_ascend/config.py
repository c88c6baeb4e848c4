"""GPT2Config: one dataclass for every shape, named presets, and the mapping to HF's config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional

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


@dataclass
class GPT2Config:
    model_type: ClassVar[str] = "gpt2"  # what HF code (peft) reads to recognise the architecture
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
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.init_style not in INIT_STYLES:
            raise ValueError(f"unknown init_style {self.init_style!r}: use one of {', '.join(INIT_STYLES)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"unknown attn_implementation {self.attn_implementation!r}: "
                             f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.loss_chunk_size, int) or isinstance(self.loss_chunk_size, bool) or self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be an integer >= 0 (0: off), got {self.loss_chunk_size!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"n_inner must be a positive integer or null, got {self.n_inner!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")

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
    def from_hf_dict(cls, hf: dict) -> "GPT2Config":
        """Build from a transformers GPT-2 config.json dict; refuses features this model does not have."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt2'")
        if hf.get("add_cross_attention"):
            raise ValueError("config.json sets add_cross_attention=true: cross-attention GPT-2 is not supported")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("config.json sets scale_attn_by_inverse_layer_idx=true: not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise ValueError("config.json sets scale_attn_weights=false: not supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in HF_ACTIVATION_TO_OURS:
            raise ValueError(f"config.json activation_function {act!r} is not supported: "
                             f"use one of {', '.join(HF_ACTIVATION_TO_OURS)}")
        mapped = dict(
            vocab_size=hf.get("vocab_size", 50257), n_positions=hf.get("n_positions", 1024),
            n_embd=hf.get("n_embd", 768), n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
            n_inner=hf.get("n_inner"), activation=HF_ACTIVATION_TO_OURS[act],
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), embd_pdrop=hf.get("embd_pdrop", 0.1),
            attn_pdrop=hf.get("attn_pdrop", 0.1), resid_pdrop=hf.get("resid_pdrop", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )
        id2label = hf.get("id2label")
        if id2label and any(v != f"LABEL_{k}" for k, v in id2label.items()):
            mapped["id2label"] = {int(k): v for k, v in id2label.items()}
        mapped["num_labels"] = hf.get("num_labels", len(id2label) if id2label else 2)
        for ours, theirs in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id"),
                             ("pad_token_id", "pad_token_id")):
            if hf.get(theirs) is not None:
                mapped[ours] = hf[theirs]
        if hf.get("pad_token_id") is None and mapped.get("eos_token_id") is not None:
            mapped["pad_token_id"] = mapped["eos_token_id"]  # GPT-2 convention: pad = eos
        # Our own extras survive a round trip through config.json under a namespaced key.
        extras = hf.get("gpt2_ascend", {})
        unknown = sorted(set(hf) - HF_IGNORED_KEYS - set(mapped) - {
            "activation_function", "gpt2_ascend", "num_labels", "n_inner", "resid_pdrop", "embd_pdrop",
            "attn_pdrop", "layer_norm_epsilon", "initializer_range", "tie_word_embeddings"})
        if unknown:
            raise ValueError(f"config.json has unknown GPT-2 key {unknown[0]!r}; remove it or convert the model first")
        return cls.from_dict({**mapped, **extras})

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
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); re-export the model") from None
        return cls.from_hf_dict(d)


# ---------------------------------------------------------------------------------------------
# generation_config.json
# ---------------------------------------------------------------------------------------------
SAMPLING_ONLY_KEYS = ("temperature", "top_k", "top_p")
# Keys of a generation_config.json that say nothing about which tokens come out.
GENERATION_BOOKKEEPING_KEYS = {
    "transformers_version", "_from_model_config", "use_cache", "output_scores", "output_logits",
    "output_attentions", "output_hidden_states", "return_dict_in_generate", "cache_implementation",
}


@dataclass
class GenerationConfig:
    """The generation defaults a model folder carries (generation_config.json), read and written as
    transformers does: a key the file leaves out takes transformers' default (top_k 50, greedy, ...), so
    transformers' pipeline and our generate() decode the same folder the same way. Arguments passed to
    generate() win over these."""
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
    unsupported: dict = field(default_factory=dict, repr=False)  # set in the file, not implemented here

    @classmethod
    def from_model_config(cls, config: GPT2Config, **settings) -> "GenerationConfig":
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id, **settings)

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "GenerationConfig":
        known = {f.name for f in fields(cls)} - {"unsupported"}
        hf = {k: v[0] if k.endswith("_token_id") and isinstance(v, list) and len(v) == 1 else v
              for k, v in hf.items()}  # transformers may write one eos id as a list
        settings = {k: v for k, v in hf.items() if k in known and not isinstance(v, list)}
        others = {k: v for k, v in hf.items() if k not in settings and k not in GENERATION_BOOKKEEPING_KEYS}
        return cls(**settings, unsupported=_non_default_generation_keys(others))

    def to_hf_dict(self) -> dict:
        """What transformers accepts without a warning: the sampling-only keys only when sampling."""
        hf = {k: getattr(self, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(self, k) is not None}
        hf.update(do_sample=self.do_sample, repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            hf.update({k: getattr(self, k) for k in SAMPLING_ONLY_KEYS})
        for key in ("max_length", "max_new_tokens"):
            if getattr(self, key) is not None:
                hf[key] = getattr(self, key)
        if self.min_new_tokens:
            hf["min_new_tokens"] = self.min_new_tokens
        return hf

    @classmethod
    def from_json_file(cls, path: str) -> "GenerationConfig":
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_hf_dict(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); delete it or re-export the model") from None


def _non_default_generation_keys(settings: dict) -> dict:
    """The settings that differ from transformers' defaults (num_beams 4, no_repeat_ngram_size 3, ...):
    generate() refuses them rather than decode differently from transformers."""
    if not settings:
        return {}
    from transformers import GenerationConfig as HFGenerationConfig
    defaults = HFGenerationConfig().to_dict()
    return {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}
