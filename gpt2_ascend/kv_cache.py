"""The key/value cache of decoding, and eval_mode: a leaf the model and generation both use (generation never
imports the model, the model reaches generation through one lazy import in generate())."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn

from .budget import dtype_bytes, require_memory
from .config import GPT2Config


class KVCache:
    """Keys and values of every layer, (B, H, S, D) each.

    Dynamic by default (grows by concatenation, like HF's DynamicCache). `KVCache.static(...)`
    preallocates `max_length` slots so decoding writes in place; with `fixed_shape=True` every step
    reads the whole buffer under a mask (no shape changes, so a compiled decode step can be captured
    as a CUDA graph). `length` counts the positions filled so far.
    """

    def __init__(self, n_layer: int):
        self.keys: list = [None] * n_layer
        self.values: list = [None] * n_layer
        self.length = 0
        self.max_length: Optional[int] = None
        self.fixed_shape = False
        self.positions: Optional[torch.Tensor] = None  # fixed_shape: where this step writes

    @classmethod
    def static(cls, config: GPT2Config, batch_size: int, max_length: int, device=None, dtype=None,
               fixed_shape: bool = False) -> "KVCache":
        shape = (batch_size, config.n_head, max_length, config.head_dim)
        per = dtype_bytes(dtype or torch.get_default_dtype())
        require_memory(2 * config.n_layer * math.prod(shape) * per,
                       f"the key/value cache of {batch_size} row(s) x {max_length} positions (n_layer="
                       f"{config.n_layer}, n_embd={config.n_embd}, {per}-byte values)", device,
                       "generate fewer rows at a time, or fewer new tokens (max_new_tokens)")
        cache = cls(config.n_layer)
        cache.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        cache.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        cache.max_length = max_length
        cache.fixed_shape = fixed_shape
        return cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values and return everything the step may attend to."""
        if self.max_length is None:
            if self.keys[layer] is not None:
                k = torch.cat([self.keys[layer], k], dim=2)
                v = torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer] = k, v
            return k, v
        if self.fixed_shape:
            self.keys[layer].index_copy_(2, self.positions, k.to(self.keys[layer].dtype))
            self.values[layer].index_copy_(2, self.positions, v.to(self.values[layer].dtype))
            return self.keys[layer], self.values[layer]
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor):
        """Keep only the batch rows in `index` (beam search / dropping finished rows)."""
        self.keys = [k.index_select(0, index) if k is not None else None for k in self.keys]
        self.values = [v.index_select(0, index) if v is not None else None for v in self.values]

    def __len__(self):
        return self.length


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run without dropout and give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
