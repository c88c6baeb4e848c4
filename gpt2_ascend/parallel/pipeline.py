"""Pipeline parallel with torch.distributed.pipelining.

Each pipeline rank keeps one contiguous slice of the blocks, the embeddings on the first stage and the
final norm + head on the last: the model itself, pruned (pipeline_stage), under the full model's parameter names
(`transformer.h.7.attn...`), so checkpoints are layout-independent. A tied LM head lives on the last stage as its
own copy of the embedding; its gradient is summed with the embedding's (first stage) every step, so both stay
equal, as in Megatron.
Classifiers pass the attention mask down the pipe, since every block and the pooling need it.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn



def split_layers(n_layer: int, stages: int) -> list[range]:
    """Contiguous layer ranges, the first stages taking one extra layer when it does not divide."""
    base, extra = divmod(n_layer, stages)
    bounds, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


def pipeline_stage(model: nn.Module, stage: int, stages: int) -> nn.Module:
    """The part of a GPT2LMHeadModel / GPT2ForSequenceClassification that one stage runs: the same model class,
    pruned. A shallow copy sharing the blocks and parameters of `model` (which stays whole): its transformer.h is a
    ModuleDict of this stage's blocks under their layer index, so every parameter keeps its name; the embeddings
    are None past the first stage, the final norm and the head None before the last. Its forward takes and returns
    tensors (the model's pipeline_stage mode). A tied head on a last stage that is not also the first is a copy of
    the embedding, kept equal by TiedEmbeddingSync."""
    layers = split_layers(model.config.n_layer, stages)[stage]
    is_first, is_last = stage == 0, stage == stages - 1
    part = _shallow_copy(model)
    body = part.transformer = _shallow_copy(model.transformer)
    body.h = nn.ModuleDict({str(i): model.transformer.h[i] for i in layers})
    if not is_first:
        body.wte = body.wpe = body.drop = None
    if not is_last:
        body.ln_f = None
        setattr(part, part.head_name, None)
    elif ties_head(model) and not is_first:
        # the first stage owns the embedding; this stage keeps an equal copy as its head
        part.lm_head = _shallow_copy(model.lm_head)
        part.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    part.pipeline_stage = (stage, stages)
    return part


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing `module`'s submodules, parameters and attributes; its own
    registries, so pruning it leaves `module` whole."""
    clone = copy.copy(module)
    clone._modules, clone._parameters, clone._buffers = dict(module._modules), dict(module._parameters), \
        dict(module._buffers)
    return clone


def ties_head(model: nn.Module) -> bool:
    """The model's head is its word embedding (a tied LM head; a classifier's score head never is)."""
    return model.head_name == "lm_head" and model.config.tie_word_embeddings


def is_first_stage(part: nn.Module) -> bool:
    return part.transformer.wte is not None


def is_last_stage(part: nn.Module) -> bool:
    return part.transformer.ln_f is not None


def build_schedule(submodule, stage_module: nn.Module, stage: int, stages: int, pp_group, device,
                   micro_batches: int, kind: str):
    """`submodule` is what runs (the stage, possibly wrapped by FSDP); `stage_module` the bare one.

    scale_grads=False: the schedule sums its microbatches' gradients and the trainer divides once by all the
    microbatches of the optimizer step. torch's scaling divides every gradient the stage holds at the end of each
    schedule step, so under gradient accumulation it divided the earlier steps' gradients again."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    pipe_stage = PipelineStage(submodule, stage, stages, device, group=pp_group)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind]
    # the head's own per-microbatch loss (losses.py; a language model's target is already the next token at each
    # position, the loader's targets)
    return cls(pipe_stage, n_microbatches=micro_batches, loss_fn=stage_module.stage_loss, scale_grads=False)


def pipeline_step(schedule, stage_module: nn.Module, input_ids, labels, attention_mask, pp_group):
    """Forward + backward of one batch through the pipe. Returns the mean microbatch loss on every rank."""
    losses = []
    inputs = (input_ids, attention_mask) if attention_mask is not None else (input_ids,)
    first, last = is_first_stage(stage_module), is_last_stage(stage_module)
    if first:
        schedule.step(*inputs, target=labels if last else None, losses=losses if last else None)
    elif last:
        schedule.step(target=labels, losses=losses)
    else:
        schedule.step()
    loss = torch.stack(losses).mean() if losses else torch.zeros((), device=input_ids.device)
    dist.all_reduce(loss, group=pp_group)  # only the last stage holds it; the others add zero
    return loss


class TiedEmbeddingSync:
    """Sum the gradients of the embedding (first stage) and its tied head copy (last stage)."""

    def __init__(self, mesh, stage_module: nn.Module):
        self.param, self.is_copy = None, False
        pp = mesh["pp"].size()
        first, last = is_first_stage(stage_module), is_last_stage(stage_module)
        if pp == 1 or not ties_head(stage_module):
            return
        groups = {}
        full = mesh.mesh  # (pp, dp, tp) rank ids; every rank must create every group, in the same order
        for d in range(full.size(1)):
            for t in range(full.size(2)):
                ranks = [int(full[0, d, t]), int(full[pp - 1, d, t])]
                groups[(d, t)] = dist.new_group(ranks)
        me = dist.get_rank()
        for (d, t), group in groups.items():
            if me in (int(full[0, d, t]), int(full[pp - 1, d, t])):
                self.group = group
        self.is_copy = last and not first
        if first:
            self.param = stage_module.transformer.wte.weight
        elif last:
            self.param = stage_module.lm_head.weight

    @property
    def duplicates(self) -> list:
        """The last stage's copy: its gradient equals the embedding's after the sync, count it once."""
        return [self.param] if self.is_copy else []

    def __call__(self):
        if self.param is None or self.param.grad is None:
            return
        grad = self.param.grad
        if hasattr(grad, "placements") and grad.placements != self.param.placements:
            # a vocab-parallel embedding's backward yields a replicated gradient; match the head's shard
            grad = self.param.grad = grad.redistribute(self.param.device_mesh, self.param.placements)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self.group)
