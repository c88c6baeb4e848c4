"""Pipeline parallel with torch.distributed.pipelining.

Each pipeline rank keeps one contiguous slice of the blocks, the embeddings on the first stage and the
final norm + head on the last, under the full model's parameter names (`transformer.h.7.attn...`), so
checkpoints are layout-independent. A tied LM head lives on the last stage as its own copy of the embedding;
its gradient is summed with the embedding's (first stage) every step, so both stay equal, as in Megatron.
Classifiers pass the attention mask down the pipe, since every block and the pooling need it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..model import build_attention_mask, last_token_index, positions_from_mask, run_block


def split_layers(n_layer: int, stages: int) -> list[range]:
    """Contiguous layer ranges, the first stages taking one extra layer when it does not divide."""
    base, extra = divmod(n_layer, stages)
    bounds, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


class PipelineStageModule(nn.Module):
    """The part of a GPT2LMHeadModel / GPT2ForSequenceClassification that one stage runs."""

    def __init__(self, model: nn.Module, stage: int, stages: int):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        self.is_classifier = hasattr(model, "score")
        self.layers = split_layers(model.config.n_layer, stages)[stage]
        body = model.transformer
        self.transformer = nn.Module()
        if self.is_first:
            self.transformer.wte, self.transformer.wpe, self.transformer.drop = body.wte, body.wpe, body.drop
        self.transformer.h = nn.ModuleDict({str(i): body.h[i] for i in self.layers})
        if self.is_last:
            self.transformer.ln_f = body.ln_f
            if self.is_classifier:
                self.score = model.score
            else:
                self.lm_head = model.lm_head
                if model.config.tie_word_embeddings and not self.is_first:
                    # the first stage owns the embedding; this stage keeps an equal copy as its head
                    self.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        self.recompute = body.recompute

    def forward(self, x, attention_mask=None):
        if self.is_first:
            pos = positions_from_mask(attention_mask) if attention_mask is not None else \
                torch.arange(x.size(1), device=x.device)[None]
            x = self.transformer.drop(self.transformer.wte(x) + self.transformer.wpe(pos))
        mask = build_attention_mask(attention_mask, x.size(1), 0, x.device)
        recompute = self.recompute if self.training else "none"
        for key, block in self.transformer.h.items():
            x = run_block(block, x, mask, None, int(key), recompute)
        if not self.is_last:
            return (x, attention_mask) if attention_mask is not None else x
        x = self.transformer.ln_f(x)
        if self.is_classifier:
            last = last_token_index(x.new_zeros(x.shape[:2], dtype=torch.long), attention_mask, None)
            return self.score(x[torch.arange(x.size(0), device=x.device), last])
        logits = self.lm_head(x)
        return logits[..., : self.config.vocab_size]


def stage_loss_fn(is_classifier: bool):
    """The per-microbatch loss; schedules average it over microbatches (scale_grads=True). For language
    modelling the target is already the next token at each position (the trainer's (B, T+1) blocks)."""
    if is_classifier:
        return lambda logits, labels: F.cross_entropy(logits.float(), labels)
    return lambda logits, targets: F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_schedule(submodule, stage_module: PipelineStageModule, stage: int, stages: int, pp_group, device,
                   micro_batches: int, kind: str):
    """`submodule` is what runs (the stage module, possibly wrapped by DDP); `stage_module` the bare one."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    pipe_stage = PipelineStage(submodule, stage, stages, device, group=pp_group)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind]
    return cls(pipe_stage, n_microbatches=micro_batches, loss_fn=stage_loss_fn(stage_module.is_classifier),
               scale_grads=True)


def pipeline_step(schedule, stage_module: PipelineStageModule, input_ids, labels, attention_mask, pp_group):
    """Forward + backward of one batch through the pipe. Returns the mean microbatch loss on every rank."""
    losses = []
    inputs = (input_ids, attention_mask) if attention_mask is not None else (input_ids,)
    if stage_module.is_first:
        schedule.step(*inputs, target=labels if stage_module.is_last else None,
                      losses=losses if stage_module.is_last else None)
    elif stage_module.is_last:
        schedule.step(target=labels, losses=losses)
    else:
        schedule.step()
    loss = torch.stack(losses).mean() if losses else torch.zeros((), device=input_ids.device)
    dist.all_reduce(loss, group=pp_group)  # only the last stage holds it; the others add zero
    return loss


class TiedEmbeddingSync:
    """Sum the gradients of the embedding (first stage) and its tied head copy (last stage)."""

    def __init__(self, mesh, stage_module: PipelineStageModule):
        self.param, self.is_copy = None, False
        pp = mesh["pp"].size()
        if pp == 1 or not stage_module.config.tie_word_embeddings or stage_module.is_classifier:
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
        self.is_copy = stage_module.is_last and not stage_module.is_first
        if stage_module.is_first:
            self.param = stage_module.transformer.wte.weight
        elif stage_module.is_last:
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
