"""LoRA through peft, on our HF-named modules.

Targets: `c_attn` (q, k and v together), `c_proj` (attention and MLP output projections), `c_fc`, and
`c_attn.q` / `c_attn.k` / `c_attn.v` for MindFormers' separate projections (its GPT-2 recipes adapt dense1 = q
and dense3 = v). GPT-2 fuses q, k and v into one `c_attn`, so n of them are one peft adapter of rank n·r (alpha
n·alpha: the same scale alpha / r) whose B matrix is kept block-diagonal: each part's rows of B see only that
part's r columns of A, and a gradient mask keeps every other entry of B at zero, so it trains exactly as n separate
rank-r adapters (one dropout mask is shared by the parts where MindFormers draws one per adapter).
`mindformers_targets` maps MindFormers' target_modules regex ('.*dense1.*|.*dense3.*') to these names.
Adapters are PEFT's own files (adapter_config.json + adapter_model.safetensors), HF GPT-2 tensor names.
"""
from __future__ import annotations

import os
import pickle
import re

import torch

from ..safe_pickle import refused

OUR_TARGETS = ("c_attn", "c_proj", "c_fc", "c_attn.q", "c_attn.k", "c_attn.v")
QKV = ("q", "k", "v")
# MindFormers' GPT-2 Linear cells (their local names, which its target_modules regex is matched against) -> ours
MINDFORMERS_CELLS = {"dense1": "c_attn.q", "dense2": "c_attn.k", "dense3": "c_attn.v", "projection": "c_proj",
                     "mapping": "c_fc"}


def mindformers_targets(patterns) -> tuple[str, ...]:
    """Our target names for a target_modules list: our own names pass through; the other entries are MindFormers'
    regex (its 'a|b' string, split into a list by the recipe), matched as one (re.match, as MindFormers does)
    against its cells dense1/2/3, projection, mapping."""
    targets = [p for p in patterns if p in OUR_TARGETS]
    regex = "|".join(p for p in patterns if p not in OUR_TARGETS)
    if regex:
        try:
            found = [ours for cell, ours in MINDFORMERS_CELLS.items() if re.match(regex, cell)]
        except re.error as e:
            raise ValueError(f"lora target_modules {regex!r} is not a valid regex ({e})") from None
        if not found:
            raise ValueError(f"lora target_modules {regex!r} matches no layer: use {', '.join(OUR_TARGETS)} or "
                             f"MindFormers' cell names ({', '.join(MINDFORMERS_CELLS)})")
        targets += [t for t in found if t not in targets]
    if all(f"c_attn.{p}" in targets for p in QKV) or "c_attn" in targets:  # all three: the whole c_attn
        targets = [t for t in targets if not t.startswith("c_attn")] + ["c_attn"]
    return tuple(targets)


def qkv_parts(target_modules) -> list[str]:
    return [p for p in QKV if f"c_attn.{p}" in target_modules]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def apply_lora(model: torch.nn.Module, rank: int = 64, alpha: float = 128, dropout: float = 0.1,
               target_modules=("c_attn",)):
    """Wrap `model` with LoRA adapters; only the adapters (and a classifier's score head) stay trainable."""
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise ValueError(f"lora rank must be a positive integer, got {rank}")
    target_modules = mindformers_targets(target_modules)
    parts = qkv_parts(target_modules)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    modules = sorted({t.split(".")[0] for t in target_modules})
    unknown = [t for t in modules if t not in names]
    if unknown:
        raise ValueError(f"lora target module {unknown[0]!r} is not in the model: use c_attn, c_proj, c_fc")
    # a classifier's head is new (random on an LM base) and tiny: it trains whole, saved in the adapter
    # (PEFT's modules_to_save, as its SEQ_CLS task type does); frozen, it would stay random
    modules_to_save = ["score"] if hasattr(model, "score") else None
    patterns = dict(rank_pattern={"c_attn": rank * len(parts)}, alpha_pattern={"c_attn": alpha * len(parts)}) \
        if parts else {}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                        bias="none", task_type=None, modules_to_save=modules_to_save, **patterns)
    peft_model = get_peft_model(model, config)
    if parts:
        for name, module in peft_model.named_modules():
            if name.endswith("c_attn") and hasattr(module, "lora_B"):
                mask_to_parts(module.lora_B["default"].weight, parts, rank)
    return peft_model


def qkv_block_mask(out_features: int, parts: list[str], rank: int) -> torch.Tensor:
    """1 where B (3E x n·r) may be nonzero: part j's rows of q / k / v times its r columns."""
    width = out_features // 3
    mask = torch.zeros(out_features, rank * len(parts))
    for j, part in enumerate(parts):
        row = QKV.index(part) * width
        mask[row:row + width, j * rank:(j + 1) * rank] = 1.0
    return mask


def mask_to_parts(weight: torch.nn.Parameter, parts: list[str], rank: int):
    """Keep a fused c_attn adapter's B block-diagonal: zero outside the parts' blocks now, and in every gradient."""
    mask = qkv_block_mask(weight.size(0), parts, rank).to(weight.device, weight.dtype)
    with torch.no_grad():
        weight.mul_(mask)
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_adapter(model: torch.nn.Module, adapter_dir: str, merge: bool = True, trainable: bool = False):
    """Attach a saved PEFT adapter to `model`; with merge=True fold it into the base weights and return a
    plain model (same logits, no adapter overhead)."""
    from peft import PeftModel

    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}: pass a directory written by LoRA training "
                                f"(OUTPUT_DIR/final/adapter)")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except pickle.UnpicklingError as e:  # peft reads adapter_model.bin with weights_only=True
        raise refused(os.path.join(adapter_dir, "adapter_model.bin"), e) from None
    except Exception as e:  # peft / safetensors / json errors: one line that names the adapter
        raise ValueError(f"cannot load the LoRA adapter in {adapter_dir}: {_adapter_problem(e)}") from None
    return peft_model.merge_and_unload() if merge else peft_model


def _adapter_problem(error: Exception) -> str:
    """The informative line of peft's error (a shape mismatch names the tensor on its second line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "size mismatch" in str(error):
        detail = next(line for line in lines if "size mismatch" in line)
        return f"{detail} (was it trained on a base of another shape?)"
    if isinstance(error, ValueError) and "Expecting" in lines[0]:
        return f"adapter_config.json is not valid JSON ({lines[0]})"
    return f"{type(error).__name__}: {lines[0]} (is the adapter complete and for this base model?)"


def merge_adapter(peft_model) -> torch.nn.Module:
    """Fold the adapter into the base weights (the merged model's logits equal the adapted model's)."""
    return peft_model.merge_and_unload()
