"""Text generation with a preallocated KV cache: prefill once, then one token per step.

The loop follows gpt-fast: the cache is allocated up front for prompt + max_new_tokens slots, the prompt
is run once (prefill) and every later step feeds one token. With `compile=True` the cache runs in fixed-shape
mode (every step reads all slots under a mask, and writes at `cache.positions`), so the decode step has one
static shape, and torch.compile turns it into a CUDA graph on CUDA, into inductor's C++ kernels on CPU (no
Python between the matrix-vector products: on CPU those products are the whole cost of a token, and the
per-token Python of the eager step was a fifth of it).

Arguments left out (None) come from the model's generation_config (its folder's generation_config.json,
read as transformers reads it), so the same folder decodes the same way here and in transformers' pipeline.

Logit processing follows transformers' generate, in its order: repetition penalty (over the real tokens of
the sequence so far, prompt included, left padding excluded, as transformers 5 does), min_new_tokens
(eos forbidden before), then for sampling temperature, top-k and top-p. Finished sequences are filled
with `pad_token_id`; generation stops when every sequence has emitted `eos_token_id`.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .config import GENERATION_BOOKKEEPING_KEYS, GENERATION_SETTINGS, MIN_TEMPERATURE, SAMPLING
from .kv_cache import KVCache, eval_mode
from .lora import unwrap_model
from .schema import check


class _FromConfig:
    """Default for eos/pad ids: the model config's (50256 for GPT-2). `None` means 'no such token'."""

    def __repr__(self):
        return "<model.config>"


FROM_CONFIG = _FromConfig()


@dataclass
class SamplingSettings:
    """One call's decoding settings, every one given (the defaults are the caller's: generate() takes them from the
    model's generation_config, as transformers does)."""
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float

    def validate(self, source: str = "the sampling arguments"):
        """One-line errors naming the bad argument and what is allowed: config.SAMPLING's ranges, where the
        arithmetic stays finite."""
        for name in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                     "repetition_penalty"):
            check(getattr(self, name), SAMPLING[name].but(nullable=False), name, source)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens!r}")
        if self.do_sample and self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"bad value {self.temperature!r} for 'temperature' in {source}: expected a number in "
                             f"[{MIN_TEMPERATURE:g}, 1e+06] when sampling; for deterministic output use greedy "
                             f"decoding (do_sample=False)")


def check_sampling_args(max_new_tokens: Optional[int] = None, min_new_tokens: int = 0, do_sample: bool = False,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        repetition_penalty: float = 1.0, seed: Optional[int] = None):
    """Validate generation arguments up front (a CLI does this before loading a model); max_new_tokens None means
    'decided later': min_new_tokens is then held to its own range only."""
    known_max = max_new_tokens if max_new_tokens is not None else SAMPLING["max_new_tokens"].maximum
    SamplingSettings(known_max, min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty).validate()
    check(seed, SAMPLING["seed"], "seed", "the sampling arguments")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str):
    """A UserWarning attributed to the first line outside this package: the user's call, whether it came through
    generate(), model.generate() or generate_text() (Python 3.12's skip_file_prefixes, by hand)."""
    frame, stacklevel = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, stacklevel=stacklevel)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# the public API
# ---------------------------------------------------------------------------------------------
def generate(model, input_ids, attention_mask=None, max_new_tokens: Optional[int] = None,
             min_new_tokens: Optional[int] = None, do_sample: Optional[bool] = None,
             temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
             repetition_penalty: Optional[float] = None, eos_token_id=FROM_CONFIG, pad_token_id=FROM_CONFIG,
             seed: Optional[int] = None, streamer=None, compile: bool = False, fixed_shape: bool = False,
             truncate_prompt: bool = False, generation_config=None, **options):
    """Continue each prompt; returns (B, prompt_len + n) token ids, prompt included (as transformers does).

    input_ids: (B, T) or (T,) token ids, left-padded when prompts differ in length, with
        attention_mask (B, T), 1 = real token. Each row's output equals what it gets alone.
    max_new_tokens ... repetition_penalty: None takes the model's generation_config (transformers' defaults
        where its folder's generation_config.json says nothing: greedy; top_k 50, top_p 1, temperature 1
        when sampling; max_new_tokens from max_length, else 20).
    eos_token_id / pad_token_id: default to the generation config's; eos_token_id=None never stops early.
        After a row emits eos it is filled with pad_token_id; n stops at the step where all rows are done.
    seed: sampling becomes reproducible (a torch.Generator on the model's device).
    streamer: an object with put(token_ids) / end() (transformers' BaseStreamer, e.g. TextStreamer):
        put() gets the prompt first, then each step's new tokens, as in transformers.
    compile: compile the decode step over a fixed-shape cache (a CUDA graph on CUDA; C++ kernels on CPU, which
        needs a C++ compiler), once per process and shape: worth it for long or repeated generations (the first
        call compiles, tens of seconds on CPU); elsewhere it runs the same fixed-shape step uncompiled.
        fixed_shape: use that cache mode without compiling.
    truncate_prompt: drop the oldest prompt tokens when prompt + max_new_tokens exceeds n_positions
        (otherwise that is an error).
    generation_config, **options: transformers' generate() arguments with transformers' meaning (max_length,
        num_beams, num_return_sequences, stopping_criteria, stop_strings with tokenizer=, logits_processor,
        output_scores / return_dict_in_generate, use_cache, no_repeat_ngram_size, bad_words_ids, typical_p, min_p,
        ...). The decoder here (greedy or sampling over a preallocated cache) runs whenever the call and the model's
        generation_config ask for nothing else; otherwise transformers' own generate() runs on this model
        (hf_generation.py) and returns what transformers returns (a GenerateOutput with return_dict_in_generate).
    """
    lm = language_model(model)
    check(seed, SAMPLING["seed"], "seed", "the sampling arguments")  # numpy's and torch's generators' range
    if generation_config is not None or not own_decoder_covers(lm.generation_config, options):
        named = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer)
        options.update({k: v for k, v in named.items() if v is not None and v is not FROM_CONFIG}
                       | ({"eos_token_id": None} if eos_token_id is None else {}))
        return _generate_with_transformers(lm, input_ids, attention_mask, generation_config, seed, truncate_prompt,
                                           bool(compile or fixed_shape), options)
    config = lm.config
    defaults = lm.generation_config
    prompt_length = torch.as_tensor(input_ids).size(-1)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(defaults, prompt_length, config.n_positions, options.get("max_length"))
    chosen = lambda value, key: setting(defaults, key) if value is None else value  # noqa: E731
    settings = SamplingSettings(max_new_tokens, chosen(min_new_tokens, "min_new_tokens") or 0,
                                chosen(do_sample, "do_sample"), chosen(temperature, "temperature"),
                                chosen(top_k, "top_k") or 0, chosen(top_p, "top_p"),
                                chosen(repetition_penalty, "repetition_penalty"))
    settings.validate()
    eos, pad = _special_ids(config, defaults, eos_token_id, pad_token_id)
    device = next(lm.parameters()).device
    squeeze = torch.as_tensor(input_ids).dim() == 1
    input_ids, attention_mask = prepare_prompt(input_ids, attention_mask, config, max_new_tokens,
                                               truncate_prompt, device)
    use_compile = bool(compile) and compile_supported(device)
    if compile and not use_compile:
        warn_at_caller(f"compile=True needs a CUDA device, or a CPU with a C++ compiler (the model is on "
                       f"{device.type}); running the fixed-shape decode step uncompiled")
    shape = (input_ids.size(0), input_ids.size(1) + max_new_tokens)
    if use_compile:
        decoder = Decoder.reusable(lm, *shape)
    else:
        decoder = Decoder(lm, *shape, fixed_shape=bool(compile or fixed_shape))
    with torch.no_grad(), eval_mode(lm):
        out = _decode_loop(decoder, input_ids, attention_mask, settings, eos, pad, seed, streamer)
    return out[0] if squeeze else out


# What the decoder here implements, of a generation config: anything else set to a value other than transformers'
# default goes to transformers' generate().
OWN_DECODER_SETTINGS = frozenset(GENERATION_SETTINGS)


@functools.lru_cache(maxsize=None)
def blank_generation_config():
    from transformers import GenerationConfig as HFGenerationConfig
    return HFGenerationConfig()


@functools.lru_cache(maxsize=None)
def transformers_defaults() -> dict:
    """transformers' generation defaults: 4.x stores them in every GenerationConfig, 5.x leaves a setting None and
    fills these in when generate() runs."""
    blank = blank_generation_config()
    return {**blank.to_dict(), **getattr(blank, "_get_default_generation_params", dict)()}


def setting(generation_config, name: str):
    """The value generate() uses for `name`: the config's, else transformers' default."""
    value = getattr(generation_config, name, None)
    return transformers_defaults().get(name) if value is None else value


def is_set(generation_config, name: str) -> bool:
    """Whether the config sets `name` (5.x: anything not None; 4.x: anything but the stored default)."""
    value = getattr(generation_config, name, None)
    return value is not None and value != getattr(blank_generation_config(), name, None)


def is_default(name: str, value) -> bool:
    """Whether `value` of transformers' setting `name` asks for nothing (its default; None, False, 0 and empty all
    mean off)."""
    default = transformers_defaults().get(name)
    off = (None, False, 0, 0.0, (), [], {})
    return value == default or (value in off and default in off)


def own_decoder_covers(generation_config, options: dict) -> bool:
    """True when the model's generation config and the call's transformers options (generate()'s **options) ask for
    nothing the decoder here does not implement: greedy or sampling, one eos id, one sequence per prompt, a cache."""
    settings = {name: value for name, value in generation_config.to_diff_dict().items()
                if name not in GENERATION_BOOKKEEPING_KEYS and not name.startswith("_")}
    for name, value in settings.items():
        if name in OWN_DECODER_SETTINGS:
            if isinstance(value, list):  # several eos ids
                return False
        elif not is_default(name, setting(generation_config, name)):
            return False
    for name, value in options.items():
        if name == "max_length" or (name in ("logits_processor", "stopping_criteria") and not value):
            continue
        if name not in transformers_defaults() or not is_default(name, value):  # (unknown: transformers names it)
            return False
    return True


def default_max_new_tokens(defaults, prompt_length: int, n_positions: int, max_length: Optional[int] = None) -> int:
    """transformers' rule: max_new_tokens, else max_length (the call's, else the config's) minus the prompt,
    else 20."""
    if is_set(defaults, "max_new_tokens"):
        return defaults.max_new_tokens
    if max_length is None and is_set(defaults, "max_length"):
        max_length = defaults.max_length
    if max_length is not None:
        return new_token_budget(prompt_length, max_length, n_positions)
    return 20


def _generate_with_transformers(lm, input_ids, attention_mask, generation_config, seed, truncate_prompt: bool,
                                compile: bool, options: dict):
    """generate() through transformers' own decoding (hf_generation.py), the prompt checked as here."""
    from .hf_generation import transformers_generate
    if compile:
        warn_at_caller("compile / fixed_shape apply to greedy and sampling decoding; this call runs transformers' "
                       "generation code, uncompiled")
    budget = 0  # the prompt alone must fit (transformers stops a sequence at the context by the model's own error)
    if truncate_prompt:
        config = generation_config if generation_config is not None else lm.generation_config
        budget = options.get("max_new_tokens") or (config.max_new_tokens if is_set(config, "max_new_tokens") else None)
        if budget is None:
            raise ValueError("truncate_prompt needs max_new_tokens (the room to leave for new tokens)")
    squeeze = torch.as_tensor(input_ids).dim() == 1
    input_ids, attention_mask = prepare_prompt(input_ids, attention_mask, lm.config, budget, truncate_prompt,
                                               lm.device)
    out = transformers_generate(lm, input_ids, attention_mask, generation_config, seed, **options)
    # a 1-D prompt gives a 1-D answer; several sequences for it (num_return_sequences) stay rows
    return out[0] if squeeze and isinstance(out, torch.Tensor) and out.size(0) == 1 else out


def generate_text(model, tokenizer, prompts, batch_size: int = 8, max_decode_length: Optional[int] = None,
                  **kwargs):
    """Generate continuations of text prompts; returns the new text of each (a str for a str prompt).

    Prompts are left-padded in batches of `batch_size`; kwargs go to `generate`. An empty prompt
    starts from the eos token, as GPT-2 samples unconditionally. Without max_new_tokens,
    `max_decode_length` (MindFormers' name: prompt + new tokens) sets how many tokens each batch gets.
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if kwargs.get("streamer") is not None and batch_size > 1 and len(prompts) > 1:
        raise ValueError("a streamer follows one sequence: use batch_size=1 to stream several prompts")
    config = language_model(model).config
    start = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    texts = []
    for i in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p).input_ids or [start] for p in prompts[i:i + batch_size]]
        ids, mask = left_pad(encoded, pad_id=config.pad_token_id if config.pad_token_id is not None else start)
        kw = dict(kwargs)
        if kw.get("max_new_tokens") is None and (max_decode_length is not None or "max_length" not in kw):
            kw["max_new_tokens"] = new_token_budget(ids.size(1), max_decode_length, config.n_positions) \
                if max_decode_length is not None else \
                default_max_new_tokens(language_model(model).generation_config, ids.size(1), config.n_positions)
        out = generate(model, ids, attention_mask=mask, **kw)
        # the prompt part of `out` is what generate kept (truncate_prompt may have dropped its oldest tokens)
        kept = min(ids.size(1), config.n_positions - kw["max_new_tokens"]) \
            if kw.get("truncate_prompt") else ids.size(1)
        new = out[:, kept:]
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in new.tolist()]
    return texts[0] if single else texts


def new_token_budget(prompt_length: int, max_decode_length: int, n_positions: int) -> int:
    """How many tokens to generate when prompt + new may total max_decode_length (capped by the context)."""
    limit = min(max_decode_length, n_positions)
    if prompt_length >= limit:
        raise ValueError(f"a prompt of {prompt_length} tokens leaves no room under max_decode_length="
                         f"{max_decode_length} (context n_positions={n_positions}); pass max_new_tokens "
                         f"(--max_new_tokens N, with --truncate_prompt for long prompts)")
    return limit - prompt_length


def left_pad(sequences, pad_id: int):
    """(ids, attention_mask) of a batch of token lists, left-padded to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.as_tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def language_model(model):
    """Our GPT2LMHeadModel, inside a peft wrapper or not (its LoRA layers stay active in the module tree)."""
    lm = unwrap_model(model)
    if not (hasattr(lm, "transformer") and hasattr(lm, "logits") and hasattr(lm, "config")):
        raise TypeError(f"generate needs a gpt2_ascend GPT2LMHeadModel, got {type(lm).__name__}")
    return lm


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def prepare_prompt(input_ids, attention_mask, config, max_new_tokens: int, truncate: bool, device):
    """Validated (B, T) ids and mask on `device`; left padding only; fits the context (or truncated)."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.size(1) == 0 or ids.size(0) == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got shape {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), found {int(ids.min())}..{int(ids.max())}")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(attention_mask).long()
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("prompts must be left-padded (padding first, then tokens) and none may be empty; "
                             "set tokenizer.padding_side='left' or use generate_text")
    context = config.n_positions
    if ids.size(1) + max_new_tokens > context:
        if not truncate:
            raise ValueError(f"prompt of {ids.size(1)} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context n_positions={context}; shorten the prompt, lower max_new_tokens "
                             f"or allow truncate_prompt (--truncate_prompt) to keep the last tokens")
        keep = context - max_new_tokens
        if keep < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in n_positions={context}")
        ids, mask = ids[:, -keep:], mask[:, -keep:]
    return ids.to(device), mask.to(device)


def _special_ids(config, defaults, eos_token_id, pad_token_id):
    eos = defaults.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id
    pad = defaults.pad_token_id if pad_token_id is FROM_CONFIG else pad_token_id
    if pad is None:
        pad = eos  # transformers does the same when a model has no pad token
    for name, value in (("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None and (not _is_int(value) or not 0 <= value < config.vocab_size):
            raise ValueError(f"{name} must be a token id in [0, {config.vocab_size}) or None, got {value!r}")
    return eos, pad


# ---------------------------------------------------------------------------------------------
# the decoder: cache, prefill, one-token step
# ---------------------------------------------------------------------------------------------
class Decoder:
    """Owns the preallocated cache and the slot mask (B, max_length) of one generate call."""

    def __init__(self, lm, batch_size: int, max_length: int, fixed_shape: bool, compiled: bool = False):
        self.lm = lm
        device, dtype = next(lm.parameters()).device, next(lm.parameters()).dtype
        self.cache = KVCache.static(lm.config, batch_size, max_length, device=device, dtype=dtype,
                                    fixed_shape=fixed_shape)
        self.slots = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.fixed_shape = fixed_shape
        self.padded = False
        self.step_fn = _forward_last
        if fixed_shape:
            # one position buffer for every decode step, updated in place: a CUDA graph sees the same address
            self.position = torch.zeros(1, dtype=torch.long, device=device)
        if compiled:
            for t in self.cache.keys + self.cache.values + [self.slots, self.position]:
                torch._dynamo.mark_static_address(t)
            self.step_fn = compiled_step(device.type)

    @classmethod
    def reusable(cls, lm, batch_size: int, max_length: int) -> "Decoder":
        """A compiled decoder kept on the model and reused while the shape stays the same: the CUDA graph
        reads its buffers at fixed addresses (marked static), so new buffers would mean recording the graph
        again.
        Only the latest shape is kept, to bound the memory the cache holds between calls."""
        device, dtype = next(lm.parameters()).device, next(lm.parameters()).dtype
        key = (batch_size, max_length, device, dtype)
        kept = getattr(lm, "_compiled_decoder", None)
        if kept is None or kept[0] != key:
            lm._compiled_decoder = kept = (key, cls(lm, batch_size, max_length, fixed_shape=True, compiled=True))
        decoder = kept[1]
        decoder.slots.zero_()
        for t in decoder.cache.keys + decoder.cache.values:  # masked, but a stale NaN would still leak in
            t.zero_()
        return decoder

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.size(1)
        self.slots[:, :T] = attention_mask
        self.padded = not bool(attention_mask.all())
        if self.fixed_shape:
            self.cache.positions = torch.arange(T, device=input_ids.device)
            logits = _forward_last(self.lm, input_ids, self.slots, self.cache)  # prefill is not captured
            self.cache.positions = self.position
            return logits
        # without padding, no mask at all: plain causal attention takes the fastest kernel
        return _forward_last(self.lm, input_ids, attention_mask if self.padded else None, self.cache)

    def step(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits (B, V) after feeding `tokens` (B,) into cache slot `slot`."""
        self.slots[:, slot] = 1
        if self.fixed_shape:
            self.position.fill_(slot)
            if self.step_fn is not _forward_last and tokens.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            try:
                return self.step_fn(self.lm, tokens[:, None], self.slots, self.cache).clone()
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if self.step_fn is _forward_last or tokens.device.type != "cpu":
                    raise
                # a CPU whose C++ toolchain cannot build inductor's kernels (no Python headers, an old
                # compiler): the same step uncompiled, and no second try in this process
                _COMPILE_FAILED.add("cpu")
                self.step_fn = _forward_last
                first_line = (str(e.inner_exception).strip().splitlines() or [type(e.inner_exception).__name__])[0]
                warn_at_caller(f"compile=True: the decode step did not compile on this CPU ({first_line[:200]}); "
                               f"running it uncompiled")
                return _forward_last(self.lm, tokens[:, None], self.slots, self.cache).clone()
        mask = self.slots[:, :slot + 1] if self.padded else None
        return _forward_last(self.lm, tokens[:, None], mask, self.cache)


def _forward_last(lm, input_ids, attention_mask, cache):
    """fp32 logits of the last position only (no (B, T, V) tensor at prefill)."""
    hidden = lm.transformer(input_ids, attention_mask=attention_mask, past_key_values=cache,
                            use_cache=True).last_hidden_state
    return lm.logits(hidden[:, -1]).float()


_COMPILED_STEPS: dict = {}
_COMPILE_FAILED: set = set()  # device types whose compiled step failed to build in this process


def compile_supported(device: torch.device) -> bool:
    """CUDA (CUDA graphs), or a CPU where inductor finds a C++ compiler; elsewhere the fixed-shape step runs
    uncompiled."""
    if device.type == "cuda":
        return True
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    return device.type == "cpu" and "cpu" not in _COMPILE_FAILED and any(shutil.which(c) for c in compilers)


def compiled_step(device_type: str = "cuda"):
    """The decode step compiled once per process and device type (dynamo recompiles by itself for a new batch
    size or cache length): captured as a CUDA graph on CUDA (mode='reduce-overhead'); on CPU inductor's C++
    kernels around the library's matrix products (the default mode: no CUDA graph to capture)."""
    if device_type not in _COMPILED_STEPS:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED_STEPS[device_type] = torch.compile(_forward_last, mode=mode, dynamic=False)
    return _COMPILED_STEPS[device_type]


# ---------------------------------------------------------------------------------------------
# the loop and the logit processing
# ---------------------------------------------------------------------------------------------
def _decode_loop(decoder: Decoder, input_ids, attention_mask, s: SamplingSettings, eos, pad, seed, streamer):
    B, T = input_ids.shape
    device = input_ids.device
    tokens = torch.zeros((B, T + s.max_new_tokens), dtype=torch.long, device=device)  # each column returned is set
    tokens[:, :T] = input_ids
    seen = None
    if s.repetition_penalty != 1.0:
        vocab = decoder.lm.config.vocab_size
        # padding is not part of the sequence: it marks a spare column. (Scattering the mask itself writes False and
        # True to one place when a prompt also holds the pad id, which scatter_ leaves in no defined order on GPUs.)
        seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=device)
        seen = seen.scatter_(1, input_ids.masked_fill(attention_mask == 0, vocab), True)[:, :vocab]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    all_done = torch.zeros(s.max_new_tokens, dtype=torch.bool, device=device)
    check_every = stop_check_interval(device, streamer)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    logits = decoder.prefill(input_ids, attention_mask)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # read where the loop syncs anyway
    n = s.max_new_tokens
    for i in range(s.max_new_tokens):
        nonfinite |= ~torch.isfinite(logits).all()
        if i == 0 or (i + 1) % check_every == 0:  # before the first token is streamed, then every check
            _require_finite(nonfinite, i)
        next_tokens = choose_next(logits, s, step=i, eos=eos, seen=seen, generator=generator)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad)
            unfinished &= next_tokens != eos
            all_done[i] = ~unfinished.any()
        tokens[:, T + i] = next_tokens
        if seen is not None:
            seen[torch.arange(B, device=device), next_tokens] = True
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        last = i == s.max_new_tokens - 1
        if eos is not None and ((i + 1) % check_every == 0 or last) and bool(all_done[:i + 1].any()):
            n = int(all_done.nonzero()[0]) + 1
            break
        if not last:
            logits = decoder.step(next_tokens, T + i)
    _require_finite(nonfinite, n - 1)
    if streamer is not None:
        streamer.end()
    return tokens[:, :T + n]


ACCELERATOR_STOP_CHECK = 8


def stop_check_interval(device: torch.device, streamer) -> int:
    """Steps between two stop checks, each a device-to-host sync: every step on CPU (no sync to save) and when
    streaming; every ACCELERATOR_STOP_CHECK steps on accelerators, the output trimmed afterwards to the exact step
    where every row had finished."""
    return 1 if device.type == "cpu" or streamer is not None else ACCELERATOR_STOP_CHECK


def _require_finite(nonfinite: torch.Tensor, step: int):
    """Greedy decoding of NaN logits silently picks token 0 forever: refuse instead."""
    if bool(nonfinite):
        raise ValueError(f"the model's logits became NaN/inf by new token {step + 1}: its weights hold NaN/inf "
                         f"values or overflow in this dtype; check the checkpoint (evaluate.py reports it too), or "
                         f"try --dtype fp32")


def choose_next(logits: torch.Tensor, s: SamplingSettings, step: int, eos=None, seen=None, generator=None):
    """The next token of each row from fp32 logits (B, V): greedy argmax or a sample."""
    scores = process_logits(logits, s, step, eos, seen)
    if not s.do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def process_logits(logits: torch.Tensor, s: SamplingSettings, step: int, eos=None, seen=None) -> torch.Tensor:
    """transformers' processors, in its order; filtered tokens get -inf."""
    scores = logits
    if seen is not None:
        penalized = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
        scores = torch.where(seen, penalized, scores)
    if eos is not None and step < s.min_new_tokens:
        scores = scores.clone()
        scores[:, eos] = -math.inf
    if not s.do_sample:
        return scores
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k > 0:
        scores = top_k_filter(scores, s.top_k)
    if s.top_p < 1.0:
        scores = top_p_filter(scores, s.top_p)
    return scores


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th are kept, as in transformers)."""
    k = min(k, scores.size(-1))
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p
    (transformers' rule: drop tokens whose ascending cumulative probability is <= 1 - p; keep at least one)."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, -math.inf)


