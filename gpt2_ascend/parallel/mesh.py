"""Process group start-up, the (pp, dp, tp) device mesh and the parallel layout's checks."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import device as dev

RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "gpipe")


@dataclass
class ParallelConfig:
    """MindFormers' parallel section: data x model (tensor) x pipeline must equal the world size."""
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    optimizer_shard: bool = False
    recompute: str = "none"
    sequence_parallel: bool = False
    pipeline_schedule: str = "1f1b"
    # Vocab rows padded to a multiple of this in distributed runs: independent of the TP degree (for
    # T in 1, 2, 4, ... 64), so a checkpoint reshards between layouts.
    vocab_multiple: int = 64

    def validate(self, world_size: int | None = None, n_head: int | None = None, n_layer: int | None = None):
        for name in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"parallel.recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.pipeline_schedule not in SCHEDULES:
            raise ValueError(f"parallel.pipeline_schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.pipeline_schedule!r}")
        size = self.devices
        if world_size is not None and size != world_size:
            raise ValueError(f"data_parallel x model_parallel x pipeline_stage = {self.data_parallel} x "
                             f"{self.model_parallel} x {self.pipeline_stage} = {size}, but the world size is "
                             f"{world_size}: make the product equal the number of processes")
        if n_head is not None and n_head % self.model_parallel:
            raise ValueError(f"model_parallel={self.model_parallel} does not divide n_head={n_head}: "
                             f"use a divisor of the head count")
        if n_layer is not None and self.pipeline_stage > n_layer:
            raise ValueError(f"pipeline_stage={self.pipeline_stage} is more than n_layer={n_layer}: "
                             f"each stage needs at least one layer")
        if self.pipeline_stage > 1 and self.micro_batch_num < self.pipeline_stage and self.pipeline_schedule == "1f1b":
            raise ValueError(f"the 1f1b schedule needs micro_batch_num >= pipeline_stage "
                             f"({self.micro_batch_num} < {self.pipeline_stage}): raise micro_batch_num")
        return self

    @property
    def devices(self) -> int:
        """The processes the layout takes: data x model x pipeline."""
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    def describe(self, shard: bool = True) -> str:
        """The layout in one phrase, for logs and messages (shard: with optimizer_shard when it is on)."""
        return (f"data_parallel {self.data_parallel} x model_parallel {self.model_parallel} x pipeline_stage "
                f"{self.pipeline_stage}" + (", optimizer_shard" if shard and self.optimizer_shard else ""))

    @property
    def uses_fsdp(self) -> bool:
        """FSDP2 shards parameters, gradients and optimizer state over dp when optimizer_shard is on; it is
        also the data-parallel wrapper whenever dp composes with tensor parallel (DDP cannot hold DTensors)
        or with pipeline parallel (DDP's reducer does not support the pipeline's per-microbatch backward)."""
        return self.data_parallel > 1 and (self.optimizer_shard or self.model_parallel > 1 or self.pipeline_stage > 1)

    @property
    def uses_ddp(self) -> bool:
        return self.data_parallel > 1 and not self.uses_fsdp


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def start_process_group(device_name: str = "auto") -> torch.device:
    """Start the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) with the
    device's backend: nccl on CUDA, hccl on NPU, gloo on CPU. Returns this rank's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("distributed training needs torchrun (RANK / WORLD_SIZE are not set): "
                           "launch with `torchrun --nproc_per_node N train.py ... --use_parallel True`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = dev.resolve_device(device_name)
    if device.type in ("cuda", "npu") and device.index is None:
        device = torch.device(device.type, local_rank)
    dev.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=dev.dist_backend(device), **kwargs)
        global _started_here
        _started_here = True
    return device


_started_here = False  # start_process_group started the process group (not the caller)


def started_process_group() -> bool:
    """Whether start_process_group started this process's group (one the caller started is the caller's)."""
    return _started_here and dist.is_initialized()


def ranks_done() -> None:
    """Every rank has finished its run (a barrier), so none leaves while another still talks to it."""
    dist.barrier()


def build_mesh(pc: ParallelConfig, device: torch.device):
    """One (pp, dp, tp) mesh; tp innermost so tensor-parallel peers are neighbours (same node)."""
    from torch.distributed.device_mesh import init_device_mesh
    pc.validate(world_size=dist.get_world_size())
    return init_device_mesh(device.type, (pc.pipeline_stage, pc.data_parallel, pc.model_parallel),
                            mesh_dim_names=("pp", "dp", "tp"))


def vocab_multiple(pc: ParallelConfig, base_multiple: int) -> int:
    """The internal vocab padding for a distributed run: a multiple of the recipe's, of 64 and of T."""
    m = math.lcm(base_multiple, pc.vocab_multiple)
    return math.lcm(m, pc.model_parallel)
