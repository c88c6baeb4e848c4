"""Tensor parallel with DTensor's parallelize_module (Megatron-style splits).

Per block: `attn.c_attn` and `mlp.c_fc` column-wise, `attn.c_proj` and `mlp.c_proj` row-wise, so each rank
owns whole attention heads and a slice of the MLP, with one all-reduce after each row-wise layer. The
embedding and the tied LM head are split over the vocabulary (padded internally to a multiple of the TP
degree). With sequence parallel the layer norms and dropouts work on a slice of the sequence and the
all-reduces become reduce-scatter + all-gather pairs.

The fused `c_attn` holds [q | k | v] for all heads; a plain column split would give rank 0 all of q. The
distributed model therefore stores c_attn in a per-head layout [q0 k0 v0 | q1 k1 v1 | ...] (independent of
the TP degree, so checkpoints reshard freely between layouts); hf.convert_qkv_state converts back for export.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..hf import per_head_order

def to_per_head_qkv(model: nn.Module):
    """Permute every c_attn to the per-head layout in place (weights need data: call before sharding)."""
    config = model.config
    order = per_head_order(config.n_embd, config.n_head)
    for module in model.modules():
        if hasattr(module, "qkv_per_head") and not module.qkv_per_head:
            with torch.no_grad():
                if not module.c_attn.weight.is_meta:
                    idx = order.to(module.c_attn.weight.device)
                    module.c_attn.weight.copy_(module.c_attn.weight.index_select(0, idx))
                    module.c_attn.bias.copy_(module.c_attn.bias.index_select(0, idx))
            module.qkv_per_head = True
    return model


def replicate_parallel():
    """A ParallelStyle for modules that stay whole on every TP rank (position embedding, unsplit norms,
    the classifier head): parameters become Replicate DTensors, so one optimizer (foreach/fused) sees only
    DTensors, while the module still takes and returns plain local tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateParallel(ParallelStyle):
        def _apply(self, module, device_mesh):
            def inputs_to_dtensor(_module, inputs, mesh):
                return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                             if torch.is_tensor(t) and not isinstance(t, DTensor) else t for t in inputs)

            def output_to_local(_module, output, _mesh):
                return output.to_local() if isinstance(output, DTensor) else output

            return distribute_module(module, device_mesh, input_fn=inputs_to_dtensor, output_fn=output_to_local)

    return ReplicateParallel()


def tp_plan(sequence_parallel: bool) -> tuple[dict, dict]:
    """(model-level plan, per-block plan) for parallelize_module."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel)
    if not sequence_parallel:
        top = {
            "transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "transformer.wpe": replicate_parallel(),
            "transformer.ln_f": replicate_parallel(),
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
            "score": replicate_parallel(),
        }
        block = {
            "ln_1": replicate_parallel(),
            "ln_2": replicate_parallel(),
            "attn.c_attn": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(),
        }
        return top, block
    # Sequence parallel: the residual stream lives as a DTensor sharded on the sequence dim (Shard(1)).
    top = {
        "transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "transformer.wpe": replicate_parallel(),
        "score": replicate_parallel(),
        "transformer.drop": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                use_local_output=False),
        "transformer.ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    block = {
        "ln_1": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                   desired_input_layouts=(Replicate(), None, None, None)),
        "attn.c_attn": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ln_2": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    return top, block


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool):
    """Shard `model` (an LM or classifier, or a pipeline stage holding some of its parts) over tp_mesh."""
    from torch.distributed.tensor.parallel import parallelize_module
    config = model.config
    tp = tp_mesh.size()
    if config.n_head % tp:
        raise ValueError(f"model_parallel={tp} does not divide n_head={config.n_head}: pick a divisor of n_head")
    if config.padded_vocab_size % tp:
        raise ValueError(f"internal vocab size {config.padded_vocab_size} is not a multiple of model_parallel={tp}: "
                         f"build the model with parallel.config_for_parallel()")
    to_per_head_qkv(model)
    top, block_plan = tp_plan(sequence_parallel)
    body = model.transformer
    # The sequence-parallel norms need inputs on a sequence that splits evenly; a head that pools one position (the
    # classifier's) needs the full sequence after ln_f.
    pools = model.pools_last_token
    if sequence_parallel and pools:
        from torch.distributed.tensor.parallel import SequenceParallel
        top = {k: v for k, v in top.items() if k != "lm_head"}
        top["transformer.ln_f"] = SequenceParallel(use_local_output=False)
    present = {k: v for k, v in top.items() if _has_module(model, k)}
    tied = getattr(model, "lm_head", None) is not None and _has_module(model, "transformer.wte") and \
        model.lm_head.weight is body.wte.weight
    if present:
        parallelize_module(model, tp_mesh, present)
    if tied:  # parallelize_module gave each its own DTensor; both are Shard(0) on the vocab: share one again
        model.lm_head.weight = body.wte.weight
    for _, block in body.blocks():
        parallelize_module(block, tp_mesh, block_plan)
    if sequence_parallel and pools and _has_module(model, "transformer.ln_f"):
        _gather_sequence_before_pooling(body.ln_f)
    return model


def _gather_sequence_before_pooling(ln_f: nn.Module):
    """The classifier pools the hidden state of one position: hand it the whole (replicated) sequence."""
    from torch.distributed.tensor import DTensor, Replicate

    def hook(_module, _inputs, output):
        return output.redistribute(placements=[Replicate()]).to_local() if isinstance(output, DTensor) else output
    ln_f.register_forward_hook(hook)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return module is not None
