"""LoRA through peft, on our HF-named modules.

MindFormers' GPT-2 LoRA targets the separate Q and V projections; GPT-2 (ours and HF's) fuses q, k and v
into one `c_attn`, so targeting `c_attn` adapts all three. Adapters are PEFT's own files
(adapter_config.json + adapter_model.safetensors) and use the same tensor names as an HF GPT-2 adapter.
"""
from __future__ import annotations

import os
import pickle

import torch

from ..safe_pickle import refused

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def apply_lora(model: torch.nn.Module, rank: int = 64, alpha: float = 128, dropout: float = 0.1,
               target_modules=("c_attn",)):
    """Wrap `model` with LoRA adapters; only adapter parameters stay trainable."""
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise ValueError(f"lora rank must be a positive integer, got {rank}")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in target_modules if t not in names]
    if unknown:
        raise ValueError(f"lora target module {unknown[0]!r} is not in the model: use c_attn, c_proj, c_fc")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type=None)
    return get_peft_model(model, config)


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
