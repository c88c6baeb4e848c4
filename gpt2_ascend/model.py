"""The GPT-2 module tree, readable top to bottom.

Module and parameter names are HF's (transformer.wte, transformer.h.N.attn.c_attn, ..., lm_head), with
nn.Linear layers: HF's Conv1D weights are the transpose, handled once in hf.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import GenerationConfig, GPT2Config
from .kv_cache import KVCache
from .losses import causal_lm_loss, chunked_linear_cross_entropy, classification_loss, next_token_loss


# ---------------------------------------------------------------------------------------------
# outputs and masks
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelOutput:
    """Attribute access like HF's outputs; `out[0]` indexes the fields that are set, in HF's order
    (loss, logits, past_key_values, hidden_states, attentions for a head model; last_hidden_state first for
    GPT2Model), which is also the tuple `return_dict=False` returns."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional["KVCache"] = None
    hidden_states: Optional[tuple] = None  # output_hidden_states: the input of each block, then ln_f's output
    attentions: Optional[tuple] = None  # output_attentions: each layer's (B, H, T, keys) softmax weights

    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask, as HF's generate does: the first real token of
    each row is position 0 whatever the left padding; padded slots get a harmless 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def build_attention_mask(attention_mask: Optional[torch.Tensor], q_len: int, past: int, device,
                         cache: Optional[KVCache] = None) -> Optional[torch.Tensor]:
    """Boolean (B|1, 1, q_len, key_len) mask, True = may attend; None means plain causal attention.

    Causality is by cache slot: the query in slot s sees keys 0..s (slots past..past+q_len-1, or the
    fixed-shape cache's `positions`). Rows that see nothing at all (queries on left padding) are opened
    to every key, as HF does, so no kernel produces NaN for them; their outputs are never used.
    """
    fixed = cache is not None and cache.fixed_shape
    if attention_mask is None and not fixed and (past == 0 or q_len == 1):
        return None
    key_len = cache.max_length if fixed else past + q_len
    q_pos = cache.positions if fixed else torch.arange(past, past + q_len, device=device)
    k_pos = torch.arange(key_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, q, k)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :key_len].bool()
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


# HF forward arguments this model does not implement. Passing one with a value would change HF's output,
# so it raises instead of being ignored; None (or False) means "not asked for" and is accepted, as peft and
# other HF code pass them that way.
UNSUPPORTED_HF_ARGUMENTS = {
    "head_mask": "head masking is not implemented (transformers 5 dropped it as well)",
    "encoder_hidden_states": "GPT-2 here has no cross-attention",
    "encoder_attention_mask": "GPT-2 here has no cross-attention",
    "cache_position": "positions come from the KV cache (past_key_values) and attention_mask",
    "use_cache": "this model has no KV cache; use GPT2LMHeadModel for decoding",
    "past_key_values": "this model has no KV cache; use GPT2LMHeadModel for decoding",
}


def reject_unsupported(model_name: str, kwargs: dict):
    """TypeError for an argument forward() does not know, or an HF one it cannot honour."""
    for name, value in kwargs.items():
        if name not in UNSUPPORTED_HF_ARGUMENTS:
            raise TypeError(f"{model_name}.forward() got an unexpected keyword argument {name!r}")
        if value is not None and value is not False:
            raise TypeError(f"{model_name}.forward(): {name} is not supported ({UNSUPPORTED_HF_ARGUMENTS[name]}); "
                            f"leave it None")


def token_embeddings(wte: nn.Embedding, input_ids, inputs_embeds):
    """(B, T, C): the embeddings of input_ids, or inputs_embeds as given (exactly one of the two, as in HF)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != wte.embedding_dim:
            raise ValueError(f"inputs_embeds must have shape (batch, length, {wte.embedding_dim}), "
                             f"got {tuple(inputs_embeds.shape)}")
        return inputs_embeds
    return wte(input_ids)


# ---------------------------------------------------------------------------------------------
# the blocks
# ---------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v fused, each head-major
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.attn_implementation = config.attn_implementation
        # HF layout: c_attn rows are [q of all heads | k | v]. Distributed runs switch to the per-head layout
        # [q0 k0 v0 | q1 k1 v1 | ...] (parallel/tensor_parallel.py) so that a row-wise tensor-parallel split
        # hands each rank whole heads; checkpoints are converted back to HF's layout on export.
        self.qkv_per_head = False

    def split_qkv(self, qkv: torch.Tensor):
        B, T, _ = qkv.shape
        if self.qkv_per_head:  # -1: tensor parallel may leave this rank a slice of the heads
            q, k, v = qkv.view(B, T, -1, 3, self.head_dim).unbind(dim=3)
        else:
            q, k, v = (t.view(B, T, -1, self.head_dim) for t in qkv.chunk(3, dim=2))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, mask, cache: Optional[KVCache], layer_idx: int, attentions=None):
        """Called by Block.forward only, with every argument (no defaults for it to disagree with).
        attentions: a list to append this layer's attention weights to (output_attentions); the weights exist only
        on the eager path, so that path runs then, whatever attn_implementation says."""
        B, T, _ = x.shape
        q, k, v = self.split_qkv(self.c_attn(x))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        kw = dict(mask=mask, is_causal=mask is None and T > 1, dropout_p=self.attn_dropout if self.training else 0.0,
                  scale=1.0 / math.sqrt(self.head_dim))
        if attentions is not None:
            y, weights = ops.eager_attention(q, k, v, return_weights=True, **kw)
            attentions.append(weights)
        else:
            y = ops.attention(q, k, v, impl=ops.resolve_attn_implementation(self.attn_implementation, x.device.type),
                              **kw)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.activation = config.activation
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(ops.activation(self.activation, self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache: Optional[KVCache], layer_idx: int, attentions=None):
        # every argument from the caller (GPT2Model.forward, run_block), no default to disagree with;
        # attentions by keyword: tensor parallel's PrepareModuleInput lays out attn's four positional inputs
        x = x + self.attn(self.ln_1(x), mask, cache, layer_idx, attentions=attentions)
        return x + self.mlp(self.ln_2(x))


RECOMPUTE_MODES = ("none", "full", "selective")


def _selective_policy(ctx, op, *args, **kwargs):
    """Selective recompute: keep what is expensive to redo (matmuls, attention), recompute the rest
    (layer norms, gelu, dropout, adds) in the backward pass."""
    from torch.utils.checkpoint import CheckpointPolicy
    # torch_npu's flash attention registers its op only once torch_npu is imported: match it by name
    saved = op in _SAVED_OPS or "npu_fusion_attention" in str(op)
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _saved_ops():
    aten = torch.ops.aten
    ops_ = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            ops_.add(getattr(aten, name).default)
    return ops_


_SAVED_OPS = _saved_ops()


def run_block(block: nn.Module, x, mask, cache, layer_idx: int, recompute: str = "none"):
    """One block, optionally under activation recompute (dropout masks are replayed exactly)."""
    if recompute == "none":
        return block(x, mask, cache, layer_idx)
    if recompute == "full":
        return checkpoint(block, x, mask, None, layer_idx, use_reentrant=False)
    from functools import partial
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return checkpoint(block, x, mask, None, layer_idx, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def init_std(config: GPT2Config, module_name: str) -> float:
    """The standard deviation a fresh Linear / Embedding weight is drawn with (config.init_style)."""
    if config.init_style == "hf" and module_name.endswith("c_proj"):  # HF GPT-2's residual projection scaling
        return config.initializer_range / math.sqrt(2 * config.n_layer)
    return config.initializer_range


def _rng_snapshot():
    """The default generator's state for the device modules are being built on. Restored before
    init_weights, so the draws nn.Linear / nn.Embedding make in their constructors (whose shapes depend on
    the vocab padding) do not shift the real initialisation."""
    device = torch.get_default_device()
    if device.type == "cuda":
        return device, torch.cuda.get_rng_state(device)
    if device.type == "cpu":
        return device, torch.get_rng_state()
    return device, None


def _rng_restore(snapshot):
    device, state = snapshot
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class GPT2PreTrainedModel(nn.Module):
    """Shared plumbing: init, parameter counting, HF-style from_pretrained / save_pretrained."""

    config: GPT2Config
    hf_architecture = "GPT2LMHeadModel"
    # (stage, stages) when this is one stage of a pipeline (parallel/pipeline.py prunes what other stages hold):
    # its forward then takes and returns plain tensors, as torch.distributed.pipelining passes them between ranks
    pipeline_stage: Optional[tuple] = None

    def init_weights(self):
        """config.init_style "hf": N(0, initializer_range) everywhere, residual projections (c_proj) scaled by
        1 / sqrt(2 n_layer), as HF GPT-2; "mindformers": N(0, initializer_range) everywhere, no scaling, as
        MindFormers' GPT-2. Biases 0, LayerNorm weight 1 and bias 0 in both. A model built on the meta device
        (to adopt loaded weights) holds no values to draw: nothing to do (each call there cost a trip through
        torch's device mode, whose first one imports torch._dynamo: seconds before a loaded model's first token)."""
        if all(p.is_meta for p in self.parameters()):
            return
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = init_std(self.config, name)
                rows = module.weight.size(0)
                if name.endswith(("wte", "lm_head")):
                    # rows past vocab_size only pad: zero, and not drawn, so a seed gives the same real
                    # weights whatever the padding (one device, or a vocab-parallel run)
                    rows = min(rows, self.config.vocab_size)
                    nn.init.zeros_(module.weight[rows:])
                nn.init.normal_(module.weight[:rows], mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); the internal vocab padding is not counted."""
        n = sum(p.numel() for p in self.parameters())
        extra_rows = self.config.padded_vocab_size - self.config.vocab_size
        n -= extra_rows * self.config.n_embd * (1 if self.config.tie_word_embeddings or not hasattr(self, "lm_head") else 2)
        if exclude_embeddings:
            n -= (self.config.vocab_size + self.config.n_positions) * self.config.n_embd
        return n

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def gradient_checkpointing_enable(self, **_ignored):
        self.set_recompute("full")

    def gradient_checkpointing_disable(self):
        self.set_recompute("none")

    def set_recompute(self, mode: str):
        """Activation recompute in training: none, full (each block) or selective (keep matmul outputs)."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute mode {mode!r}: use one of {', '.join(RECOMPUTE_MODES)}")
        self.base_model_body().recompute = mode

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base_model_body().recompute != "none"

    def enable_input_require_grads(self):
        """Nothing to do: HF needs the embedding output to require grad only for *reentrant* checkpointing
        of a frozen model (peft calls this when wrapping); our recompute is non-reentrant, so gradients reach
        the adapters anyway. peft's fallback hook would call requires_grad_() inside the forward, which
        splits a compiled graph and adds a useless gradient through the first block."""

    def disable_input_require_grads(self):
        """The pair of enable_input_require_grads: nothing to undo."""

    @classmethod
    def can_generate(cls) -> bool:
        """transformers' question (its pipelines ask it): the language model says yes."""
        return False

    def base_model_body(self) -> "GPT2Model":
        return self if isinstance(self, GPT2Model) else self.transformer

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, dtype=None, device=None, *, torch_dtype=None, device_map=None,
                        low_cpu_mem_usage: bool = True, revision=None, local_files_only: bool = False, cache_dir=None,
                        force_download: bool = False, token=None, trust_remote_code: bool = False, **config_overrides):
        """An HF GPT-2 folder, weight file or hub id, with transformers' loading options and their meaning:
        torch_dtype (or dtype; "auto" or None: the file's dtype), device_map ("auto", a device, an index, or a dict
        placing the model on one device; it sets hf_device_map as transformers does), revision, local_files_only,
        cache_dir, force_download, token (hub downloads). The weights are converted tensor by tensor into a model
        built on the meta device, so the model is never held twice whatever low_cpu_mem_usage says; no code is ever
        run from a model folder, so trust_remote_code changes nothing. Other keywords override config fields
        (num_labels=3, attn_implementation="eager")."""
        from .hf import check_config_overrides, load_pretrained, loading_device
        check_config_overrides(config_overrides)
        for name, flag in (("low_cpu_mem_usage", low_cpu_mem_usage), ("local_files_only", local_files_only),
                           ("force_download", force_download), ("trust_remote_code", trust_remote_code)):
            if not isinstance(flag, bool):
                raise TypeError(f"from_pretrained(): {name} must be True or False, got {flag!r}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass one of them")
        dtype = dtype if dtype is not None else torch_dtype
        hub = dict(revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                   force_download=force_download, token=token)
        model = load_pretrained(cls, path_or_hub_id, dtype=None if dtype == "auto" else dtype,
                                device=loading_device(device, device_map), hub=hub, **config_overrides)
        if device_map is not None:
            model.hf_device_map = {"": str(model.device)}  # as transformers records where a device_map put it
        return model

    def save_pretrained(self, output_dir: str, dtype=None, max_shard_size=None, safe_serialization: bool = True,
                        state_dict: dict | None = None):
        """config.json + model.safetensors (safe_serialization=False: pytorch_model.bin) + a language model's
        generation_config.json, as transformers' save_pretrained writes them; max_shard_size ("500MB") splits the
        weights into shards with an index; state_dict: save these tensors (our names) instead of the model's."""
        from .hf import save_pretrained
        save_pretrained(self, output_dir, dtype=dtype, max_shard_size=max_shard_size, state=state_dict,
                        safe_serialization=safe_serialization)


class GPT2Model(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config):
        super().__init__()
        rng = _rng_snapshot()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.recompute = "full" if config.gradient_checkpointing else "none"
        if type(self) is GPT2Model:
            _rng_restore(rng)
            self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, token_type_ids=None, inputs_embeds=None, output_hidden_states=None,
                output_attentions=None, return_dict=None, **hf_only):
        """HF GPT2Model's arguments with HF's meaning; those this model lacks raise TypeError (hf_only). In a
        pipeline stage after the first (no wte: parallel/pipeline.py), input_ids is the previous stage's hidden
        states."""
        reject_unsupported(type(self).__name__, hf_only)
        embeds = self.wte is not None
        if embeds:
            for ids in (input_ids, token_type_ids):  # both are looked up in wte
                if ids is not None:
                    self._check_input_ids(ids)
            x = token_embeddings(self.wte, input_ids, inputs_embeds)
        else:
            x = input_ids
        B, T, device = x.size(0), x.size(1), x.device
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache(self.config.n_layer)
        past = cache.length if cache is not None else 0
        self._check_lengths(B, T, past, attention_mask, cache)

        if embeds:
            if position_ids is None:
                position_ids = self._default_positions(attention_mask, T, past, device, cache)
            x = x + self.wpe(position_ids)
            if token_type_ids is not None:
                x = x + self.wte(token_type_ids)  # as HF: token types share the token embedding table
            x = self.drop(x)

        mask = build_attention_mask(attention_mask, T, past, device, cache)
        if cache is not None and cache.fixed_shape and mask is None:
            raise ValueError("a fixed-shape KV cache needs an attention_mask over all cache slots")
        # the compiled per-block step (compile_blocks) serves full-sequence passes; the KV-cache path stays eager
        step = run_block if cache is not None else getattr(self, "_compiled_block_step", run_block)
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, block in self.blocks():
            if hidden_states is not None:
                hidden_states.append(x)
            if attentions is not None:  # the eager path that has the weights, block by block
                x = block(x, mask, cache, i, attentions=attentions)
            else:
                x = step(block, x, mask, cache, i, self.recompute if self.training and cache is None else "none")
        if self.ln_f is not None:  # (a pipeline stage before the last has none)
            x = self.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)
        if cache is not None and not cache.fixed_shape:
            cache.length = past + T
        out = ModelOutput(last_hidden_state=x,
                          past_key_values=cache if use_cache or past_key_values is not None else None,
                          hidden_states=tuple(hidden_states) if hidden_states is not None else None,
                          attentions=tuple(attentions) if attentions is not None else None)
        return out.to_tuple() if return_dict is False else out

    def blocks(self) -> list[tuple[int, nn.Module]]:
        """(layer index, block) of every block this model holds: all of them, or a pipeline stage's slice (h is then
        a ModuleDict keyed by the layer index, so parameter names stay those of the whole model)."""
        if isinstance(self.h, nn.ModuleDict):
            return [(int(key), block) for key, block in self.h.items()]
        return list(enumerate(self.h))

    def compile_blocks(self, **compile_kwargs):
        """torch.compile the per-block step, activation recompute included, once for all blocks: identical
        blocks share the compilation (a 40-layer model compiles about as fast as a 2-layer one), and the
        recompute runs inside the compiled graph, where selective recompute's policy holds. (A checkpoint
        wrapped around an already compiled block recomputed more than plain full recompute: measured on CPU,
        a step took 790 ms that way against 573 ms eager.)"""
        self._compiled_block_step = torch.compile(run_block, **compile_kwargs)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.recompute != "none"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool):
        self.recompute = "full" if enabled else "none"

    def _check_input_ids(self, input_ids):
        """One clear ValueError for ids the embedding cannot look up (instead of an IndexError or a reshape
        error deep inside). Reading the ids' range is free only for CPU tensors in eager mode: elsewhere it
        would make each step wait for the device or break the compiled graph, so there the ids are checked
        where they enter (the trainer's check_data, generation's prepare_prompt, evaluation's loaders)."""
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, sequence) tensor of token ids, got shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = torch.aminmax(input_ids)
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}) (the vocabulary), found "
                                 f"{int(low)}..{int(high)}")

    def _check_lengths(self, B, T, past, attention_mask, cache):
        if cache is not None and cache.max_length is not None and not cache.fixed_shape and past + T > cache.max_length:
            raise ValueError(f"KV cache holds {cache.max_length} positions but {past + T} are needed; "
                             f"build it with a larger max_length")
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's context "
                             f"n_positions={self.config.n_positions}; shorten the input")
        if attention_mask is not None:
            expected = cache.max_length if cache is not None and cache.fixed_shape else past + T
            if attention_mask.shape != (B, expected):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but ({B}, {expected}) "
                                 f"is needed: one entry per cached and new token")

    @staticmethod
    def _default_positions(attention_mask, T, past, device, cache):
        if attention_mask is None:
            return torch.arange(past, past + T, device=device)[None]
        pos = positions_from_mask(attention_mask)
        if cache is not None and cache.fixed_shape:
            return pos.index_select(1, cache.positions)
        return pos[:, past:past + T]


class GPT2LMHeadModel(GPT2PreTrainedModel):
    # What differs between the heads, carried by the head so that no caller branches on the task: the data it learns
    # from (data/sources.py: blocks of seq_length tokens, + 1 for training's next-token targets), how it is evaluated
    # (eval/runner.py METRICS), its head module, a pipeline's last-stage loss (logits, targets), whether it pools one
    # position (tensor parallel then hands it the whole sequence)
    examples = "token_blocks"
    metric = "perplexity"
    head_name = "lm_head"
    stage_loss = staticmethod(next_token_loss)
    pools_last_token = False

    def __init__(self, config: GPT2Config):
        super().__init__()
        rng = _rng_snapshot()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # generate()'s defaults; from_pretrained replaces them with the folder's generation_config.json
        self.generation_config = GenerationConfig.from_model_config(config)
        _rng_restore(rng)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, past_key_values=None,
                use_cache=False, targets=None, token_type_ids=None, inputs_embeds=None, output_hidden_states=None,
                output_attentions=None, return_dict=None, logits_to_keep=0, num_items_in_batch=None, **hf_only):
        """HF GPT2LMHeadModel's arguments with HF's meaning (those this model lacks raise TypeError), plus
        targets: already the next token of each position (nanoGPT semantics), the trainer's form; with
        config.loss_chunk_size set, the loss is computed chunk by chunk without the (tokens x vocab) logits and no
        logits are returned. labels: HF semantics (shifted inside: logits at t predict labels at t+1).
        logits_to_keep: an int n > 0 keeps the last n positions, a 1-D tensor the positions it lists.
        num_items_in_batch: transformers' Trainer's count of the accumulated batch's predicted tokens (the loss is
        then this batch's sum over it, losses.next_token_loss)."""
        reject_unsupported(type(self).__name__, hf_only)
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache, token_type_ids=token_type_ids,
                               inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        hidden = out.last_hidden_state
        if self.pipeline_stage is not None:  # tensors in, tensors out: torch.distributed.pipelining sends them on
            if self.lm_head is None:
                return hidden if attention_mask is None else (hidden, attention_mask)
            return self.logits(hidden)
        extras = dict(past_key_values=out.past_key_values, hidden_states=out.hidden_states, attentions=out.attentions)
        if targets is not None and self.config.loss_chunk_size and torch.is_grad_enabled():
            check_labels(targets, "targets", self.config.vocab_size, ignore=-100)
            loss = chunked_linear_cross_entropy(hidden, self.lm_head.weight, targets, self.config.vocab_size,
                                                self.config.loss_chunk_size)
            if num_items_in_batch is not None:  # the mean over this batch's tokens -> their sum over the count
                loss = loss * (targets != -100).sum() / num_items_in_batch
            result = ModelOutput(loss=loss, **extras)
            return result.to_tuple() if return_dict is False else result
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            check_labels(labels, "labels", self.config.vocab_size, ignore=-100)
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        elif targets is not None:
            check_labels(targets, "targets", self.config.vocab_size, ignore=-100)
            loss = next_token_loss(logits, targets, num_items_in_batch)
        result = ModelOutput(loss=loss, logits=logits, **extras)
        return result.to_tuple() if return_dict is False else result

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """forward()'s arguments for one decoding step: the tokens the cache has not seen yet (HF's hook, which
        peft's PeftModelForCausalLM wraps; our own generate() drives the cache itself)."""
        seen = past_key_values.length if past_key_values is not None else 0
        return dict(input_ids=input_ids[:, seen:], attention_mask=attention_mask, past_key_values=past_key_values,
                    use_cache=True, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vocabulary logits, without the internal padding rows."""
        logits = self.lm_head(hidden)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def generation_config(self):
        """transformers' GenerationConfig, as transformers' models carry it: what generate() uses for the arguments
        a call leaves out and what save_pretrained writes. From the folder's generation_config.json, else from the
        model config; kept as read until first used, so that building a model does not import transformers."""
        settings = self.__dict__["_generation_config"]
        if isinstance(settings, GenerationConfig):
            settings = self.__dict__["_generation_config"] = settings.to_transformers(self.config)
        return settings

    @generation_config.setter
    def generation_config(self, settings):
        """Ours (gpt2_ascend.config.GenerationConfig, checked) or transformers' GenerationConfig."""
        if not isinstance(settings, GenerationConfig) and not hasattr(settings, "to_diff_dict"):
            raise TypeError(f"generation_config must be a transformers GenerationConfig or a "
                            f"gpt2_ascend.config.GenerationConfig, got {type(settings).__name__}")
        self.__dict__["_generation_config"] = settings

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def generate(self, inputs=None, generation_config=None, attention_mask=None, input_ids=None, **kwargs):
        """transformers' generate(), with its arguments and their meaning (inputs or input_ids, generation_config,
        max_length, num_beams, stopping_criteria, logits_processor, output_scores, ...), plus this project's seed,
        compile, fixed_shape and truncate_prompt (gpt2_ascend.generation.generate). Greedy and sampling calls run
        the project's own KV-cache decoder; the rest runs transformers' generation code on this model."""
        from .generation import generate
        if (inputs is None) == (input_ids is None):
            raise TypeError("generate() takes the prompt once: as inputs (the first argument) or as input_ids")
        return generate(self, inputs if inputs is not None else input_ids, attention_mask=attention_mask,
                        generation_config=generation_config, **kwargs)


class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    hf_architecture = "GPT2ForSequenceClassification"
    examples = "labelled_rows"  # input_ids / attention_mask / labels (what GPT2LMHeadModel's attributes say)
    metric = "accuracy"
    head_name = "score"
    stage_loss = staticmethod(classification_loss)
    pools_last_token = True

    def __init__(self, config: GPT2Config):
        super().__init__()
        rng = _rng_snapshot()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        _rng_restore(rng)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, token_type_ids=None,
                inputs_embeds=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                num_items_in_batch=None, **hf_only):
        """HF GPT2ForSequenceClassification's arguments with HF's meaning (no KV cache here: those this model
        lacks raise TypeError). Pools the last real token of each row (attention mask, else the last non-pad
        id); with inputs_embeds and no mask, the last position, as HF does. num_items_in_batch: transformers'
        Trainer's count of the accumulated batch's labels (losses.classification_loss; transformers' own GPT-2
        classifier takes it and ignores it, so under gradient accumulation its loss is not the batch's mean)."""
        reject_unsupported(type(self).__name__, hf_only)
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
                               output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        hidden = out.last_hidden_state
        stage = self.pipeline_stage is not None
        if stage and self.score is None:  # a pipeline stage before the last: tensors on to the next
            return hidden if attention_mask is None else (hidden, attention_mask)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        if attention_mask is None and (input_ids is None or stage):  # (a stage's input_ids are hidden states)
            last = torch.full_like(rows, hidden.size(1) - 1)
        else:
            last = last_token_index(input_ids if input_ids is not None else attention_mask, attention_mask,
                                    self.config.pad_token_id)
        logits = self.score(hidden[rows, last])
        if stage:
            return logits
        loss = None
        if labels is not None:
            check_labels(labels, "labels", self.config.num_labels)
            loss = classification_loss(logits, labels, num_items_in_batch)
        result = ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)
        return result.to_tuple() if return_dict is False else result


def check_labels(labels, name: str, high: int, ignore: int | None = None):
    """One clear ValueError for labels a loss cannot use: not integer ids, or outside [0, high) (ignore: the
    index the loss skips, -100), instead of cross-entropy's IndexError or its reading of float labels as
    probabilities. Read on CPU in eager mode only, as input_ids are (elsewhere the data is checked where it
    enters)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if labels.numel() and labels.device.type == "cpu" and not torch.compiler.is_compiling():
        kept = labels[labels != ignore] if ignore is not None else labels
        if kept.numel():
            low, top = torch.aminmax(kept)
            if low < 0 or top >= high:
                skipped = f" ({ignore} is skipped)" if ignore is not None else ""
                raise ValueError(f"{name} must be in [0, {high}){skipped}, found {int(low)}..{int(top)}")


def last_token_index(input_ids, attention_mask, pad_token_id):
    """Index of the last real token of each row (left or right padding): from the attention mask
    when given, else the rightmost token that is not the pad id (HF's rule)."""
    T = input_ids.size(1)
    if attention_mask is not None:
        real = attention_mask.to(torch.int32)
    elif pad_token_id is not None:
        real = (input_ids != pad_token_id).to(torch.int32)
    else:
        return torch.full((input_ids.size(0),), T - 1, device=input_ids.device, dtype=torch.long)
    return (torch.arange(T, device=input_ids.device, dtype=torch.int32) * real).argmax(-1)


# ---------------------------------------------------------------------------------------------
# the heads by HF architecture name: the one place a model class is chosen
# ---------------------------------------------------------------------------------------------
MODEL_CLASSES = {cls.hf_architecture: cls for cls in (GPT2LMHeadModel, GPT2ForSequenceClassification)}
ARCHITECTURES = tuple(MODEL_CLASSES)
LANGUAGE_MODEL, CLASSIFIER = ARCHITECTURES


def model_class(architecture: str | None):
    """GPT2LMHeadModel or GPT2ForSequenceClassification for an HF architecture string (None: the language model)."""
    if architecture is None:
        return GPT2LMHeadModel
    if architecture not in MODEL_CLASSES:
        raise ValueError(f"unknown architecture {architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    return MODEL_CLASSES[architecture]
