"""A MindFormers GPT-2 checkpoint -- one `.ckpt` file, or a distributed checkpoint (every rank's slices and the
run's strategy) -- seen as HF-named, HF-layout tensors, or loaded as our model."""
from __future__ import annotations

import torch

from ..hf import hf_to_ours, model_from_state
from ..model import CLASSIFIER, LANGUAGE_MODEL, model_class
from .ckpt import CkptError
from .distributed import open_mindspore
from .mapping import (CONFIG_FIELDS, MS_LORA, RECIPE_FIELDS, check_shapes, classify_ms_name, hf_shapes,
                      hf_to_mindformers, infer_config, mindformers_to_hf, ms_sources, read_recipe_shape, shape_beside)


class MindFormersSource:
    """A MindFormers GPT-2 checkpoint seen as HF-named, HF-layout tensors, plus the config its shapes imply: a .ckpt,
    or a distributed checkpoint (output/ with checkpoint/ and strategy/ inside, or output/checkpoint and `strategy`),
    whose slices are merged as each tensor is read."""

    def __init__(self, path: str, n_head: int | None = None, activation: str | None = None, verify_crc: bool = True,
                 recipe: str | None = None, strategy: str | None = None, described: dict | None = None,
                 given_as: str = "--n_head"):
        """n_head, activation: given (a flag); recipe: a MindFormers recipe file the checkpoint was trained with (its
        sizes must be the tensors'); else a config.json beside the file; described: a run's recipe model
        ({n_embd, n_head, activation, source}), whose heads count for a checkpoint of its width; else the preset.
        given_as: how messages name a given n_head."""
        recipe_shape, fields = (read_recipe_shape(recipe) if recipe else None), RECIPE_FIELDS
        beside = shape_beside(path) if recipe is None and n_head is None else None
        if beside:  # the config.json of an export or a run beside the .ckpt: its heads and activation
            (recipe_shape, recipe), fields = beside, CONFIG_FIELDS
        self.reader = open_mindspore(path, strategy, verify_crc=verify_crc)
        try:
            self._read_index(path, n_head, activation, recipe, recipe_shape, fields, described, given_as)
        except BaseException:  # any refusal closes the file it opened
            self.reader.close()
            raise

    def _read_index(self, path, n_head, activation, recipe, recipe_shape, fields, described, given_as):
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
                                                                     recipe or "--config", fields, described,
                                                                     given_as)
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
            raise ValueError(f"{self.reader.path}: unexpected tensor '{self.lora_names[0]}' (unmerged LoRA weights: "
                             f"load them with a LoRA recipe, whose model.model_config.pet_config.lora_alpha scales "
                             f"them, or merge them first with convert/merge_lora.py --base {self.reader.path} "
                             f"--lora_alpha A)")

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


def load_mindspore_model(mindspore_path: str, n_head: int | None = None, activation: str | None = None,
                         dtype=None, device=None, verify_crc: bool = True, recipe: str | None = None, cls=None,
                         lora_base: bool = False, strategy: str | None = None, **config_overrides):
    """A MindFormers GPT-2 .ckpt or distributed checkpoint (MindFormersSource; `strategy` for a checkpoint/ folder
    given alone) as our GPT2LMHeadModel / GPT2ForSequenceClassification (the class the
    checkpoint holds, or `cls`: an LM checkpoint as a classifier gets a fresh head), in eval mode. Heads come
    from n_head or the MindFormers recipe `recipe` when the tensors cannot tell. config_overrides replace
    GPT2Config fields the tensors do not fix (dropout, labels, init). LoRA tensors are refused unless lora_base
    (then only the base is loaded: mindspore_io.lora.load_mindformers_lora adds them)."""
    with MindFormersSource(mindspore_path, n_head, activation, verify_crc, recipe, strategy) as source:
        if not lora_base:
            source.refuse_lora()
        return model_from_source(source, cls or model_class(source.architecture), dtype, device, **config_overrides)


def model_from_source(source: MindFormersSource, cls, dtype=None, device=None, **config_overrides):
    """An open MindFormersSource's weights as a model of class `cls` (unmerged LoRA tensors left out: refusing them
    is the caller's choice, source.refuse_lora)."""
    config = source.config.replace(**config_overrides)
    state = hf_to_ours({name: source.load(name) for name in source.hf_shapes}, config)
    return model_from_state(cls, config, state, source=source.reader.path, dtype=dtype, device=device)
