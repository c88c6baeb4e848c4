"""A training checkpoint -> one HF-format directory (MindFormers' transform_ckpt.py equivalent): a torchrun run's
sharded checkpoint, in any layout and without its world size or a process group, or one process's step_N."""
from __future__ import annotations

import os

from .. import checkpoints as ckpt
from ..hf import save_pretrained
from ..loading import load_model


def merge_checkpoint(src: str, dst: str, dtype=None, max_shard_size=None):
    """Write the weights of the training checkpoint `src` as an HF directory `dst` (config.json + model.safetensors,
    the internal vocab padding removed). Returns (config, architecture)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if not (ckpt.is_sharded(src) or ckpt.is_training_checkpoint(src)):
        raise ValueError(f"{src} is not a training checkpoint (no manifest.json with DCP files or model.pt): "
                         f"pass OUTPUT_DIR/checkpoint/step_N")
    model = load_model(src, overrides=dict(pad_vocab_size_multiple=1))
    save_pretrained(model, dst, dtype=dtype, max_shard_size=max_shard_size)
    return model.config, model.hf_architecture
