"""Gradient norm and clipping: on one device (clip_by_global_norm: torch's foreach norm), and across any mix of plain
tensors and DTensors and across pipeline stages (clip_grad_norm); both clip by clip_coefficient's formula."""
from __future__ import annotations

import torch
import torch.distributed as dist


def clip_coefficient(total_norm: torch.Tensor, max_norm: float, rule: str = "torch") -> torch.Tensor:
    """What gradients are multiplied by to clip their global norm to max_norm. torch (clip_grad_norm_):
    min(1, max_norm / (norm + 1e-6)). MindFormers' ClipGradNorm (mindformers/core/clip_grad.py):
    max_norm / (max(norm, max_norm) + 1e-6), which also scales gradients under the limit, by 1 - ~1e-6/max_norm."""
    if rule == "mindspore":
        return max_norm / (torch.clamp(total_norm, min=max_norm) + 1e-6)
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def clip_by_global_norm(params, max_norm: float | None, rule: str = "torch") -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, which are then clipped to max_norm (when set) by
    clip_coefficient's rule. No host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if max_norm and max_norm > 0 and grads:  # 0, None or below: no clipping (as clip_grad_norm)
        torch._foreach_mul_(grads, clip_coefficient(total, max_norm, rule).to(grads[0].device))
    return total


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
    (clip_coefficient). No host sync."""
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
