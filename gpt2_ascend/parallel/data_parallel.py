"""Data parallel: DDP (replicated parameters) or FSDP2 `fully_shard` (ZeRO-style sharded parameters,
gradients and optimizer state, with a mixed-precision policy)."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True):
    """Shard each block, then the root (embeddings, final norm and head, kept together so a tied head
    shares one sharded parameter with the embedding)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = [block for _, block in model.transformer.blocks()]
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by the backward: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, dp_mesh, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [device.index] if device.type in ("cuda", "npu") and device.index is not None else None
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), device_ids=device_ids,
                                   **no_buffer_sync(DistributedDataParallel))


def no_buffer_sync(ddp_class) -> dict:
    """DDP's option for "no buffers to sync before each forward" (the model has none), in the installed torch's
    spelling: forward_sync_buffers=False where it exists (torch >= 2.13 warns, a FutureWarning in every rank's
    output, on broadcast_buffers), else broadcast_buffers=False. The two differ only in syncing buffers once at
    construction, which for a model without buffers is nothing."""
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
