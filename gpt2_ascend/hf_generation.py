"""transformers' own generate() driving our model, for every option the project's decoder does not cover.

GPT2LMHeadModel.generate runs generation.py's decoder (greedy or sampling over a preallocated KV cache, compiled on
CUDA) when a call asks for nothing more. Anything else transformers offers -- beam search, num_return_sequences,
stopping criteria and stop strings, logits processors, n-gram blocking, bad words, typical_p, min_p, scores and
return_dict_in_generate, a generation_config object, use_cache=False -- is transformers' code, run here on our
modules: `TransformersView` is a transformers PreTrainedModel that owns no weights and whose forward runs our model,
with transformers' own Cache behind the interface our attention layers call. The semantics are therefore
transformers' (of the installed version, 4.45 to 5.x) by construction, not re-implemented.

transformers' modeling code is imported here only, and only when such a call comes (it takes seconds).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .kv_cache import eval_mode


class CacheBridge:
    """transformers' Cache (DynamicCache) behind the interface of our KVCache that the attention layers use, so the
    cache transformers' generate builds, reorders for beams and returns is the one our layers fill."""

    fixed_shape = False
    max_length = None
    positions = None

    def __init__(self, cache):
        self.cache = cache
        self.length = cache.get_seq_length()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(k, v, layer)


@functools.lru_cache(maxsize=None)
def view_class():
    """The TransformersView class, built on first use (importing transformers' modeling code)."""
    import transformers
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # transformers 5.x calls the cache argument `cache`, 4.x `past_key_values`
    cache_name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

    class TransformersView(transformers.PreTrainedModel, transformers.GenerationMixin):
        """One of our GPT2LMHeadModels as transformers' generate() expects a model to be."""

        config_class = transformers.GPT2Config
        base_model_prefix = "transformer"
        main_input_name = "input_ids"
        _supports_cache_class = True  # transformers 4.x: build a DynamicCache rather than legacy tuples

        def __init__(self, lm, generation_config):
            super().__init__(transformers.GPT2Config(**lm.config.to_hf_dict(lm.hf_architecture)))
            self.__dict__["lm"] = lm  # not registered as a submodule: the view holds no weights of its own
            self.generation_config = generation_config

        @property
        def device(self) -> torch.device:
            return self.lm.device

        @property
        def dtype(self) -> torch.dtype:
            return self.lm.dtype

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, position_ids=None, use_cache=None,
                                          logits_to_keep=None, output_attentions=None, output_hidden_states=None,
                                          **state):
            """forward()'s arguments for one step: the tokens the cache has not seen yet (transformers 4.x passes the
            cache as past_key_values, 5.x as cache; the rest of its bookkeeping is not needed here)."""
            cache = state.get(cache_name)
            seen = cache.get_seq_length() if cache is not None else 0
            new = input_ids[:, seen:].to(self.device)
            inputs = {"input_ids": new, cache_name: cache, "use_cache": use_cache,
                      "output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
            if attention_mask is not None:
                inputs["attention_mask"] = attention_mask.to(self.device)
            if position_ids is not None:
                inputs["position_ids"] = position_ids[:, -new.size(1):].to(self.device)
            if logits_to_keep is not None:
                inputs["logits_to_keep"] = logits_to_keep
            return inputs

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, output_attentions=None, output_hidden_states=None,
                    return_dict=True):
            hf_cache = cache if cache is not None else past_key_values
            out = self.lm(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=CacheBridge(hf_cache) if hf_cache is not None else None,
                          logits_to_keep=logits_to_keep, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states)
            return CausalLMOutputWithPast(logits=out.logits, hidden_states=out.hidden_states,
                                          attentions=out.attentions, **{cache_name: hf_cache})

    return TransformersView


def transformers_generate(lm, input_ids, attention_mask, generation_config, seed, **kwargs):
    """transformers' GenerationMixin.generate on `lm` (our GPT2LMHeadModel, LoRA layers and all), under `lm`'s
    generation_config; kwargs are generate()'s as transformers takes them. seed: sampling reproducible, without
    touching the caller's random state (transformers samples from torch's global generator: seeded alike, it draws
    what generation.py's seeded generator draws). Without a seed, the draws come from the global generator and
    advance it, as transformers' do (a pipeline's successive prompts then get different draws)."""
    view = view_class()(lm, lm.generation_config)
    device = lm.device
    rng = contextlib.nullcontext() if seed is None else torch.random.fork_rng(
        devices=[] if device.type == "cpu" else [device], device_type="cuda" if device.type == "cpu" else device.type)
    with rng, eval_mode(lm):
        if seed is not None:
            torch.manual_seed(seed)
        return view.generate(input_ids, attention_mask=attention_mask, generation_config=generation_config, **kwargs)
