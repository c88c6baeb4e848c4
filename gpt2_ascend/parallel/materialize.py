"""Large models under torchrun: build on the meta device, shard, then give each rank only its pieces.

A 13B model in fp32 is 52 GB; eight ranks of a node each building it on the host would need 400+ GB.
Instead every rank builds the module tree on `meta` (no memory), applies the parallel layout, allocates
its own shards on its device (`to_empty`) and then fills them: with a fresh GPT-2 init (DTensor random
ops, so each rank draws its part of one consistent tensor), or tensor by tensor from a checkpoint, each
full tensor read once (memory-mapped) and cut to this rank's shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoints import is_sharded
from ..config import GPT2Config
from ..hf import is_conv1d, normalize_hf_name, per_head_order, weight_files
from ..model import init_std
from .checkpoint import load_model_only


def local_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The piece of `full` (the whole logical tensor) this rank holds for `param` (a DTensor or not)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return full
    # src_data_rank=None: every rank has the full tensor and cuts its own piece, no communication
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None).to_local()


def fill_(param: torch.Tensor, full: torch.Tensor):
    target = param.to_local() if hasattr(param, "to_local") else param
    with torch.no_grad():
        target.copy_(local_part(full.to(target.dtype), param))


def init_sharded(core: nn.Module, config: GPT2Config):
    """GPT-2's init on (possibly sharded) parameters, the stds of model.init_std (config.init_style), zero
    biases, unit norms. Every rank draws with the same seed, so DTensor's random ops give one consistent
    logical tensor whatever the layout (not the same draws as one process)."""
    with torch.no_grad():
        for name, module in core.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, init_std(config, name))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def zero_vocab_padding(core: nn.Module, config: GPT2Config):
    """Zero the embedding's (and a separate head's) rows past vocab_size, as one process does
    (GPT2PreTrainedModel.init_weights): they only pad the vocabulary to an aligned width and hold no token."""
    if config.padded_vocab_size == config.vocab_size:
        return
    for name, param in core.named_parameters():
        if not name.endswith(("wte.weight", "lm_head.weight")):
            continue
        target = param.to_local() if hasattr(param, "to_local") else param
        rows = torch.arange(param.size(0), device=target.device)
        # an expanded view: the mask costs one row of memory whatever the layout cuts out of it
        keep = (rows < config.vocab_size).to(target.dtype)[:, None].expand(param.shape)
        with torch.no_grad():
            target.mul_(local_part(keep, param))


class CheckpointTensors:
    """Our parameter name -> the full tensor in our layout, read lazily from an HF-format checkpoint
    (safetensors memory-mapped; .bin files through torch.load(mmap=True))."""

    def __init__(self, path: str, config: GPT2Config, per_head: bool):
        self.config, self.per_head = config, per_head
        self.where = {}
        self.bins = {}
        for file in weight_files(path):
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                handle = safe_open(file, framework="pt")
                for name in handle.keys():
                    self._add(name, lambda n=name, h=handle: h.get_tensor(n))
            else:
                from ..hf import load_torch_file
                state = load_torch_file(file)
                self.bins[file] = state
                for name in state:
                    self._add(name, lambda n=name, s=state: s[n])

    def _add(self, hf_name: str, getter):
        ours = normalize_hf_name(hf_name)
        if ours is not None:
            self.where[ours] = getter

    def __contains__(self, name: str) -> bool:
        return self._source_name(name) in self.where

    def _source_name(self, name: str) -> str:
        if name == "lm_head.weight" and self.config.tie_word_embeddings and name not in self.where:
            return "transformer.wte.weight"
        return name

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._source_name(name)
        if source not in self.where:
            raise ValueError(f"checkpoint has no tensor for {name!r}")
        t = self.where[source]()
        if is_conv1d(source):
            t = t.t()
        if source in ("transformer.wte.weight", "lm_head.weight") and t.size(0) < self.config.padded_vocab_size:
            padded = t.new_zeros(self.config.padded_vocab_size, t.size(1))
            padded[: t.size(0)] = t
            t = padded
        if self.per_head and source.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            t = t.index_select(0, per_head_order(self.config.n_embd, self.config.n_head))
        return t.float().contiguous()


def materialize(core: nn.Module, config: GPT2Config, device: torch.device, source: CheckpointTensors | None,
                tied_sync=None):
    """Allocate this rank's shards on `device` and fill them (fresh init, or from `source`)."""
    body = core.transformer
    tied = getattr(core, "lm_head", None) is not None and body.wte is not None and core.lm_head.weight is body.wte.weight
    core.to_empty(device=device)
    if tied:  # to_empty gives each module a new Parameter where it cannot swap data in place (plain tensors)
        core.lm_head.weight = body.wte.weight
    if source is None:
        init_sharded(core, config)
        zero_vocab_padding(core, config)
    else:
        for name, param in core.named_parameters():
            if name in source:
                fill_(param, source[name])
            elif name == "score.weight":  # an LM checkpoint as a classifier's start: a fresh head
                with torch.no_grad():
                    param.normal_(0.0, config.initializer_range)
            else:
                raise ValueError(f"checkpoint has no tensor for {name!r}: is it a GPT-2 of this shape?")
    if tied_sync is not None and tied_sync.param is not None:
        # the pipeline's last stage keeps its own copy of the tied embedding: make it the first stage's
        local = tied_sync.param.to_local() if hasattr(tied_sync.param, "to_local") else tied_sync.param
        first = min(dist.get_process_group_ranks(tied_sync.group))
        with torch.no_grad():
            dist.broadcast(local.data, src=first, group=tied_sync.group)


def filler(config: GPT2Config, device: torch.device, source: str | None):
    """parallelize()'s fill for a model built on the meta device: this rank's shards allocated on `device` and
    filled with a fresh init (source None), an HF directory's tensors, or a sharded checkpoint's (any layout)."""
    def fill(core: nn.Module, tied_sync=None):
        if source and is_sharded(source):
            materialize(core, config, device, None, tied_sync)
            load_model_only(source, core)
            return
        tensors = CheckpointTensors(source, config, per_head=True) if source else None
        materialize(core, config, device, tensors, tied_sync)
    return fill
