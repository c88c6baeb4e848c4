"""MindFormers' unmerged LoRA checkpoints (mindpet's lora_a / lora_b tensors beside the base weights, in a .ckpt or a
distributed checkpoint) as one of our LoRA (peft) models: loading.load_model reads them (a LoRA recipe's lora_alpha
scales them, which the checkpoint does not store), convert/lora.py folds them into an HF directory."""
from __future__ import annotations

import torch

from ..lora import QKV, apply_lora
from .source import MindFormersSource, load_mindspore_model

# MindFormers' LoRA cell -> (our module under transformer.h.{i}, its part of the fused c_attn)
MINDFORMERS_LORA_CELLS = {"attention.dense1": ("attn.c_attn", "q"), "attention.dense2": ("attn.c_attn", "k"),
                          "attention.dense3": ("attn.c_attn", "v"), "attention.projection": ("attn.c_proj", None),
                          "output.mapping": ("mlp.c_fc", None), "output.projection": ("mlp.c_proj", None)}


def mindformers_lora_layout(adapters: dict) -> tuple[int, tuple[str, ...]]:
    """(rank, our target_modules) of MindFormersSource.lora_adapters(): every layer must adapt the same cells with
    one rank; attention.projection and output.projection only together (both are our c_proj)."""
    ranks = {a.shape[0] for a, _ in adapters.values()}
    if len(ranks) != 1:
        raise ValueError(f"the checkpoint's LoRA adapters have ranks {sorted(ranks)}: one rank is supported")
    cells_per_layer = {}
    for layer, cell in adapters:
        cells_per_layer.setdefault(layer, set()).add(cell)
    cells = next(iter(cells_per_layer.values()))
    if any(c != cells for c in cells_per_layer.values()):
        raise ValueError("the checkpoint's layers adapt different cells: only the same LoRA targets in every layer "
                         "are supported")
    if ("attention.projection" in cells) != ("output.projection" in cells):
        raise ValueError("LoRA on only one of attention.projection / output.projection is not supported (both are "
                         "c_proj here)")
    targets = [f"c_attn.{MINDFORMERS_LORA_CELLS[c][1]}" for c in sorted(cells) if c.startswith("attention.dense")]
    targets += ["c_proj"] if "attention.projection" in cells else []
    targets += ["c_fc"] if "output.mapping" in cells else []
    return ranks.pop(), tuple(targets)


def copy_mindformers_adapters(peft_model, adapters: dict, rank: int):
    """Put MindFormers' (lora_a, lora_b) pairs into our LoRA model (built by apply_lora with their layout): q / k / v
    adapters side by side in the fused c_attn adapter, B block-diagonal."""
    grouped = {}
    for (layer, cell), pair in adapters.items():
        module, part = MINDFORMERS_LORA_CELLS[cell]
        grouped.setdefault((layer, module), {})[part] = pair
    with torch.no_grad():
        for (layer, module), parts in grouped.items():
            target = peft_model.get_submodule(f"base_model.model.transformer.h.{layer}.{module}")
            lora_a, lora_b = target.lora_A["default"].weight, target.lora_B["default"].weight
            if None in parts:  # one adapter on the whole module
                lora_a.copy_(parts[None][0])
                lora_b.copy_(parts[None][1])
                continue
            order = [p for p in QKV if p in parts]
            width = lora_b.size(0) // 3
            lora_a.copy_(torch.cat([parts[p][0] for p in order]))
            lora_b.zero_()
            for j, p in enumerate(order):
                row = QKV.index(p) * width
                lora_b[row:row + width, j * rank:(j + 1) * rank] = parts[p][1]


def load_mindformers_lora(path: str, lora_alpha: float, n_head: int | None = None, activation: str | None = None,
                          cls=None, lora_dropout: float = 0.0, verify_crc: bool = True, strategy: str | None = None,
                          **config_overrides):
    """A MindFormers LoRA .ckpt (base weights + lora_a / lora_b; or a distributed checkpoint of one, with its
    `strategy`) as our peft LoRA model (fp32), with `lora_layout` = (rank, target_modules) set on it. lora_alpha is
    not in the checkpoint: pass the recipe's (pet_config.lora_alpha; MindFormers' GPT-2 LoRA recipes use 128)."""
    with MindFormersSource(path, n_head, activation, verify_crc, strategy=strategy) as source:
        adapters = source.lora_adapters()
    if not adapters:
        raise ValueError(f"{path} holds no LoRA tensors (lora_a / lora_b): load it as a plain model")
    base = load_mindspore_model(path, n_head, activation, dtype=torch.float32, verify_crc=False, cls=cls,
                                lora_base=True, strategy=strategy, **config_overrides)
    rank, targets = mindformers_lora_layout(adapters)
    model = apply_lora(base, rank=rank, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets,
                       fuse_qkv=False)  # q, k and v each keep the checkpoint's rank-r adapter
    copy_mindformers_adapters(model, adapters, rank)
    model.lora_layout = (rank, targets)
    return model
