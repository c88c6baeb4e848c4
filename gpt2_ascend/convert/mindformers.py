"""HF GPT-2 checkpoints <-> MindFormers GPT-2 `.ckpt` files, one tensor in memory at a time."""
from __future__ import annotations

import math
import os

import torch

from ..config import GPT2Config
from ..hf import (atomic_model_dir, is_conv1d, load_config, normalize_hf_name, parse_dtype, resolve_model_path,
                  weight_files, write_hf_weights, write_json)
from ..mindspore_io.ckpt import CHUNK_BYTES, CkptWriter
from ..mindspore_io.mapping import (HF_LAYER, check_shapes, hf_shapes, hf_to_mindformers, layer_count, shape_line,
                                   skipped_summary)
from ..mindspore_io.source import MindFormersSource
from .shards import WeightIndex


# ---------------------------------------------------------------------------------------------
# HF -> MindSpore
# ---------------------------------------------------------------------------------------------
def find_config(path: str) -> GPT2Config | None:
    """The config.json of a checkpoint directory, or the one beside a weight file, if any."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    return load_config(directory) if os.path.isfile(os.path.join(directory or ".", "config.json")) else None


class HFSource:
    """An HF GPT-2 checkpoint (any file layout) seen as HF-named, HF-layout tensors.

    Accepts HF's names with or without `transformer.`, and our own nn.Linear layout ([out, in], e.g. a
    torch.save(model.state_dict())), told apart by the shape of c_attn; drops causal-mask buffers, a tied
    lm_head and our internal vocab padding.
    """

    def __init__(self, path: str):
        self.path = resolve_model_path(path)
        self.index = WeightIndex(weight_files(self.path))
        self.config = find_config(self.path)
        self.names, self.skipped = {}, []
        for name in self.index.where:
            key = normalize_hf_name(name)
            if key is None:
                self.skipped.append(name)
            else:
                self.names[key] = name
        self.linear_layout = self._detect_layout()
        self._drop_tied_head()

    def _detect_layout(self) -> bool:
        key = "transformer.h.0.attn.c_attn.weight"
        if key not in self.names:
            return False  # reported as a missing tensor by the shape check
        rows, cols = self.index.shape(self.names[key])
        if cols == 3 * rows:
            return False
        if rows == 3 * cols:
            return True
        raise ValueError(f"{self.path}: {key} has shape {(rows, cols)}, neither HF's [hidden, 3*hidden] nor [3*hidden, hidden]")

    def _drop_tied_head(self):
        if "lm_head.weight" not in self.names:
            return
        tied = self.config.tie_word_embeddings if self.config else True
        if tied and torch.equal(self.load("lm_head.weight"), self.load("transformer.wte.weight")):
            self.skipped.append(self.names.pop("lm_head.weight"))
            return
        raise ValueError(f"{self.path} has an lm_head.weight that differs from the word embedding; MindFormers' "
                         f"GPT-2 ties its head to the embedding table, so this model cannot be converted")

    @property
    def vocab_size(self) -> int:
        rows = self.index.shape(self.names["transformer.wte.weight"])[0]
        return min(rows, self.config.vocab_size) if self.config else rows

    def shape(self, key: str) -> tuple:
        shape = tuple(self.index.shape(self.names[key]))
        if self.linear_layout and is_conv1d(key):
            shape = shape[::-1]
        if key in ("transformer.wte.weight", "lm_head.weight"):
            shape = (self.vocab_size, *shape[1:])
        return shape

    def load(self, key: str) -> torch.Tensor:
        tensor = self.index.load(self.names[key])
        if self.linear_layout and is_conv1d(key):
            tensor = tensor.t()
        if key in ("transformer.wte.weight", "lm_head.weight") and self.config:
            tensor = tensor[: self.config.vocab_size]  # our internal vocab padding
        return tensor


def check_config_matches(config: GPT2Config, weights: GPT2Config, n_layer: int, path: str):
    """The config.json beside HF weights must describe them: a MindSpore .ckpt keeps only the tensors, so a
    disagreement would otherwise be settled silently in the weights' favour."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    found = dict(n_layer=n_layer, n_embd=weights.n_embd, n_positions=weights.n_positions, n_inner=weights.inner_dim)
    said = dict(n_layer=config.n_layer, n_embd=config.n_embd, n_positions=config.n_positions, n_inner=config.inner_dim)
    for key, value in found.items():
        if said[key] != value:
            raise ValueError(f"{os.path.join(directory, 'config.json')} says {key}={said[key]} but the weights have "
                             f"{value}: fix config.json (or remove it) so it describes these weights")
    if config.vocab_size > weights.vocab_size:
        raise ValueError(f"{os.path.join(directory, 'config.json')} says vocab_size={config.vocab_size} but the "
                         f"word embedding has {weights.vocab_size} rows: fix config.json so it describes these weights")


def hf_to_mindspore(torch_path: str, mindspore_path: str, layers: int | None = None, dtype=None, crc: bool = True,
                    chunk_bytes: int = CHUNK_BYTES, progress=None) -> dict:
    """Write an HF GPT-2 checkpoint (directory, .safetensors/.bin file, sharded, or ours) as a MindFormers
    GPT-2 .ckpt. `layers` (MindFormers' --layers) is checked against the checkpoint. Returns a summary."""
    dtype = parse_dtype(dtype)
    source = HFSource(torch_path)
    n_layer = layer_count(source.names, HF_LAYER)
    if layers is not None and layers != n_layer:
        raise ValueError(f"--layers {layers} but {source.path} has {n_layer} layers (transformer.h.0 to "
                         f"h.{n_layer - 1}); pass --layers {n_layer} or leave it out")
    classifier = "score.weight" in source.names
    if "transformer.wte.weight" not in source.names or "transformer.h.0.mlp.c_fc.weight" not in source.names:
        raise ValueError(f"{source.path} is not a GPT-2 checkpoint (no transformer.wte.weight or h.0.mlp.c_fc.weight)")
    vocab, n_embd = source.shape("transformer.wte.weight")
    inner = source.shape("transformer.h.0.mlp.c_fc.weight")[1]
    sizes = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_head=1, n_layer=max(n_layer, 1), n_inner=inner,
                       n_positions=source.shape("transformer.wpe.weight")[0],
                       num_labels=source.shape("score.weight")[0] if classifier else 2)
    expected = hf_shapes(sizes, classifier)
    check_shapes({k: source.shape(k) for k in source.names}, expected, source.path)
    if source.config is not None:
        check_config_matches(source.config, sizes, n_layer, source.path)

    written = 0
    size = sum(math.prod(shape) * (dtype or source.index.dtype(source.names[name])).itemsize
               for name, shape in expected.items())
    with CkptWriter(mindspore_path, crc=crc, chunk_bytes=chunk_bytes, size=size) as writer:
        for hf_name in progress(list(expected)) if progress else expected:
            tensor = source.load(hf_name)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            for ms_name, part in hf_to_mindformers(hf_name, tensor):
                writer.write(ms_name, part)
                written += part.numel() * part.element_size()
    return {"path": mindspore_path, "layers": n_layer, "hidden": n_embd, "vocab": vocab, "classifier": classifier,
            "tensors": len(writer.names), "bytes": written, "skipped": source.skipped, "crc": crc}


# ---------------------------------------------------------------------------------------------
# MindSpore -> HF (reading: mindspore_io.source)
# ---------------------------------------------------------------------------------------------
def mindspore_to_hf(mindspore_path: str, output_dir: str, n_head: int | None = None, activation: str | None = None,
                    dtype=None, max_shard_size=None, verify_crc: bool = True, progress=None, recipe: str | None = None,
                    log=None, strategy: str | None = None) -> dict:
    """Write a MindFormers GPT-2 .ckpt, or a distributed checkpoint (output/, or output/checkpoint with `strategy`:
    its slices merged tensor by tensor), as an HF directory (config.json + model.safetensors). Shapes come from
    the tensors; heads from n_head, the MindFormers recipe `recipe` (model.model_config.num_heads), or the
    preset of the same width; log(shape_line) before anything is written. Optimizer states and bookkeeping
    entries are skipped (listed in the summary)."""
    dtype = parse_dtype(dtype)
    with MindFormersSource(mindspore_path, n_head, activation, verify_crc, recipe, strategy) as source:
        source.refuse_lora()
        if log is not None:
            log(shape_line(source.config, source.heads_from))
        target = dtype or source.dtype
        specs = {name: (target, shape) for name, shape in source.hf_shapes.items()}
        hf_config = source.config.to_hf_dict(source.architecture)
        hf_config["torch_dtype"] = str(target).replace("torch.", "")
        size = sum(math.prod(shape) * target.itemsize for shape in source.hf_shapes.values())
        with atomic_model_dir(output_dir, size=size) as tmp:
            write_json(hf_config, os.path.join(tmp, "config.json"))
            files = write_hf_weights(tmp, specs, lambda n: source.load(n).to(target), max_shard_size, progress=progress)
        return {"output_dir": output_dir, "config": source.config, "architecture": source.architecture,
                "heads_from": source.heads_from, "dtype": target, "files": files,
                "skipped": source.skipped, "skipped_line": skipped_summary(source.skipped)}
