"""Gradient norm and clipping across any mix of plain tensors and DTensors, and across pipeline stages."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..train.optim import clip_coefficient


def _local_sq_norm(grad) -> torch.Tensor:
    """This rank's share of ||grad||^2, summed over the mesh dims the gradient is sharded on."""
    from torch.distributed.tensor import DTensor, Replicate
    if not isinstance(grad, DTensor):
        return grad.detach().float().pow(2).sum()
    if any(p.is_partial() for p in grad.placements):  # pending sums: finish them first
        grad = grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])
    sq = grad.to_local().detach().float().pow(2).sum()
    for dim, placement in enumerate(grad.placements):
        if not placement.is_replicate():  # Shard, or FSDP-over-TP's _StridedShard: pieces add up
            dist.all_reduce(sq, group=grad.device_mesh.get_group(dim))
    return sq


def clip_grad_norm(parameters, max_norm: float, pp_group=None, duplicates=(), rule: str = "torch") -> torch.Tensor:
    """Total L2 norm of all gradients (each element counted once), clipped to max_norm. Replicated
    copies (Replicate placements, identical plain tensors on TP peers) are counted once; pipeline stages
    each hold different parameters, so their squares are summed over pp_group; `duplicates` (the tied
    head's copy on the last pipeline stage) are clipped but not counted; `rule` picks the clipping formula
    (train.optim.clip_coefficient). No host sync."""
    parameters = list(parameters)
    skip = {id(p) for p in duplicates}
    counted = [p.grad for p in parameters if p.grad is not None and id(p) not in skip]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    total_sq = torch.stack([_local_sq_norm(g).to(device) for g in counted]).sum()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm and max_norm > 0:
        coef = clip_coefficient(total, max_norm, rule)
        for g in grads:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.device))
    return total
