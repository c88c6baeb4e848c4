"""HF GPT-2 checkpoints <-> MindFormers GPT-2 `.ckpt` files, one tensor in memory at a time."""
from __future__ import annotations

import math
import os

import torch

from ..config import GPT2Config
from ..hf import (atomic_model_dir, hf_to_ours, is_conv1d, load_config, model_from_state, normalize_hf_name,
                  parse_dtype, resolve_model_path, weight_files, write_hf_weights, write_json)
from ..model import CLASSIFIER, LANGUAGE_MODEL, model_class
from .mapping import (HF_LAYER, MS_LORA, check_shapes, classify_ms_name, hf_shapes, hf_to_mindformers,
                      infer_config, layer_count, mindformers_to_hf, ms_sources, read_recipe_shape, shape_line,
                      skipped_summary)
from .mindspore_ckpt import CHUNK_BYTES, CkptError, CkptReader, CkptWriter
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
# MindSpore -> HF
# ---------------------------------------------------------------------------------------------
class MindFormersSource:
    """A MindFormers GPT-2 .ckpt seen as HF-named, HF-layout tensors, plus the config its shapes imply."""

    def __init__(self, path: str, n_head: int | None = None, activation: str | None = None, verify_crc: bool = True,
                 recipe: str | None = None):
        recipe_shape = read_recipe_shape(recipe) if recipe else None
        self.reader = CkptReader(path, verify_crc=verify_crc)
        try:
            self._read_index(path, n_head, activation, recipe, recipe_shape)
        except BaseException:  # any refusal closes the file it opened
            self.reader.close()
            raise

    def _read_index(self, path, n_head, activation, recipe, recipe_shape):
        self.skipped = {"optimizer": [], "bookkeeping": [], "buffer": []}
        self.lora_names = []  # unmerged LoRA tensors: see lora_adapters()
        shapes = {}
        for name, entry in self.reader.entries.items():
            kind = "bookkeeping" if entry.is_map else classify_ms_name(name)
            if kind == "model" and (entry.dtype is None or not entry.dtype.is_floating_point):
                raise CkptError(f"{path}: {name!r} has type {entry.tensor_type}, but GPT-2 weights are floating "
                                f"point (a damaged checkpoint, or not a MindFormers GPT-2 one)")
            if kind == "model":
                shapes[name] = entry.shape
            elif kind == "lora":
                self.lora_names.append(name)
            else:
                self.skipped[kind].append(name)
        self.config, self.classifier, self.heads_from = infer_config(shapes, n_head, activation, recipe_shape,
                                                                     recipe or "--config")
        self.hf_shapes = hf_shapes(self.config, self.classifier)
        check_shapes(shapes, {n: s for hf in self.hf_shapes for n, s in self._ms_shapes(hf)}, path)
        self.dtype = self.reader.entries[ms_sources("transformer.wte.weight")[0]].dtype

    def _ms_shapes(self, hf_name):
        meta = torch.empty(self.hf_shapes[hf_name], device="meta")
        return [(n, tuple(t.shape)) for n, t in hf_to_mindformers(hf_name, meta)]

    @property
    def architecture(self) -> str:
        return CLASSIFIER if self.classifier else LANGUAGE_MODEL

    def load(self, hf_name: str) -> torch.Tensor:
        return mindformers_to_hf(hf_name, [self.reader.load(n) for n in ms_sources(hf_name)])

    def refuse_lora(self):
        """A plain conversion would drop the adapters: say how to keep them."""
        if self.lora_names:
            raise ValueError(f"{self.reader.path}: unexpected tensor '{self.lora_names[0]}' (LoRA weights: merge them "
                             f"first with convert/merge_lora.py --base {self.reader.path} --lora_alpha A)")

    def lora_adapters(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """{(layer, MindFormers cell e.g. 'attention.dense1'): (lora_a [rank, in], lora_b [out, rank])}."""
        pairs = {}
        for name in self.lora_names:
            layer, cell, which = MS_LORA.fullmatch(name).groups()
            pairs.setdefault((int(layer), cell), {})[which.lower()] = self.reader.load(name)
        incomplete = [key for key, pair in pairs.items() if set(pair) != {"a", "b"}]
        if incomplete:
            layer, cell = incomplete[0]
            raise ValueError(f"{self.reader.path}: backbone.blocks.{layer}.{cell} has a LoRA lora_a or lora_b but not "
                             f"both: the checkpoint is incomplete")
        return {key: (pair["a"], pair["b"]) for key, pair in sorted(pairs.items())}

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def mindspore_to_hf(mindspore_path: str, output_dir: str, n_head: int | None = None, activation: str | None = None,
                    dtype=None, max_shard_size=None, verify_crc: bool = True, progress=None, recipe: str | None = None,
                    log=None) -> dict:
    """Write a MindFormers GPT-2 .ckpt as an HF directory (config.json + model.safetensors). Shapes come from
    the tensors; heads from n_head, the MindFormers recipe `recipe` (model.model_config.num_heads), or the
    preset of the same width; log(shape_line) before anything is written. Optimizer states and bookkeeping
    entries are skipped (listed in the summary)."""
    dtype = parse_dtype(dtype)
    with MindFormersSource(mindspore_path, n_head, activation, verify_crc, recipe) as source:
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


def load_mindspore_model(mindspore_path: str, n_head: int | None = None, activation: str | None = None,
                         dtype=None, device=None, verify_crc: bool = True, recipe: str | None = None, cls=None,
                         lora_base: bool = False, **config_overrides):
    """A MindFormers GPT-2 .ckpt as our GPT2LMHeadModel / GPT2ForSequenceClassification (the class the
    checkpoint holds, or `cls`: an LM checkpoint as a classifier gets a fresh head), in eval mode. Heads come
    from n_head or the MindFormers recipe `recipe` when the tensors cannot tell. config_overrides replace
    GPT2Config fields the tensors do not fix (dropout, labels, init). LoRA tensors are refused unless lora_base
    (then only the base is loaded: convert.lora.load_mindformers_lora adds them)."""
    with MindFormersSource(mindspore_path, n_head, activation, verify_crc, recipe) as source:
        if not lora_base:
            source.refuse_lora()
        config = source.config.replace(**config_overrides)
        state = hf_to_ours({name: source.load(name) for name in source.hf_shapes}, config)
        if cls is None:
            cls = model_class(source.architecture)
        return model_from_state(cls, config, state, source=mindspore_path, dtype=dtype, device=device)
