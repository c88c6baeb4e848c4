"""Where a run stands among its processes (ParallelDims), and the model each rank runs (parallelize).

One device is a layout with every degree 1: ParallelDims.single() needs no process group, and parallelize() then
only compiles. Under torchrun, init_parallel starts the process group and the (pp, dp, tp) mesh, and parallelize
turns the model (built identically on every rank) into this rank's part, in torchtitan's order: pipeline split ->
tensor parallel -> recompute (already set on the blocks) -> compile -> FSDP2 / DDP. Nothing here reads a recipe:
the layout is a ParallelConfig.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import device as dev
from .data_parallel import apply_ddp, apply_fsdp
from .mesh import ParallelConfig, build_mesh, start_process_group
from .pipeline import TiedEmbeddingSync, build_schedule, pipeline_stage
from .tensor_parallel import apply_tensor_parallel, to_per_head_qkv


@dataclass
class ParallelDims:
    """One rank's view of the layout. `rank` / `world_size` for the data loader are the data-parallel ones."""
    pc: ParallelConfig
    mesh: object
    device: torch.device
    global_rank: int = 0
    global_world: int = 1

    @classmethod
    def single(cls, device: torch.device) -> "ParallelDims":
        """One process on one device: every degree 1, no process group."""
        return cls(pc=ParallelConfig(), mesh=None, device=device)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def rank(self) -> int:  # the data loader's slice
        return self.mesh["dp"].get_local_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return self.pc.data_parallel

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.distributed else None

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def on_main(self, fn):
        """Run fn on rank 0 and hand its result to every rank; an error there is raised on every rank (with its
        one-line message) instead of leaving the others waiting. One process: fn()."""
        if not self.distributed:
            return fn()
        box = [None]
        if dist.get_rank() == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                box[0] = ("error", (type(e).__name__, str(e)))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            kind, message = value
            raise (ValueError if kind != "FileNotFoundError" else FileNotFoundError)(message)
        return value


def init_parallel(pc: ParallelConfig, device_name: str) -> ParallelDims:
    """Process group + mesh from torchrun's environment (RANK, WORLD_SIZE, ...) for the layout `pc`."""
    device = start_process_group(device_name)
    mesh = build_mesh(pc, device)
    return ParallelDims(pc=pc, mesh=mesh, device=device, global_rank=dist.get_rank(),
                        global_world=dist.get_world_size())


@dataclass
class ParallelModel:
    module: nn.Module  # what runs the step (DDP / FSDP / compiled)
    core: nn.Module  # the bare model or pipeline stage: parameters, names, the architecture
    dims: ParallelDims
    schedule: object = None
    tied: TiedEmbeddingSync | None = None

    @property
    def pipelined(self) -> bool:
        return self.schedule is not None


def parallelize(model: nn.Module, dims: ParallelDims, compile: bool = False, compile_scope: str = "model",
                per_head: bool = True, fill=None) -> ParallelModel:
    """What this rank runs of `model` (built identically on every rank). One device: the model, compiled when asked
    (compile_scope: compile_model's). Distributed: split, shard and wrap it, blocks compiled one by one. fill: for a
    model on the meta device, fill(core, tied) allocates and fills this rank's shards (parallel.materialize); it
    runs once the layout is applied, so each rank allocates only its shards, and before DDP, which broadcasts real
    weights."""
    if not dims.distributed:
        return ParallelModel(module=compile_model(model, compile_scope) if compile else model, core=model, dims=dims)
    pc = dims.pc
    if per_head:  # the distributed c_attn layout, whatever the TP degree (see tensor_parallel.py)
        to_per_head_qkv(model)
    core = pipeline_stage(model, dims.pp_rank, pc.pipeline_stage) if pc.pipeline_stage > 1 else model
    if fill is None:
        core.to(dims.device)
    if pc.model_parallel > 1:
        apply_tensor_parallel(core, dims.mesh["tp"], pc.sequence_parallel)
    if compile:
        dev.require_compile_backend(dims.device.type)
        for _, block in core.transformer.blocks():
            block.compile()  # in place: parameter names stay the same
    if pc.uses_fsdp:  # fp32 master weights and gradient reduction; autocast sets the compute dtype
        apply_fsdp(core, dims.mesh["dp"], param_dtype=None, reduce_dtype=torch.float32)
    tied = TiedEmbeddingSync(dims.mesh, core) if pc.pipeline_stage > 1 else None
    if fill is not None:
        fill(core, tied)
    module = apply_ddp(core, dims.mesh["dp"], dims.device) if pc.uses_ddp else core
    pm = ParallelModel(module=module, core=core, dims=dims, tied=tied)
    if pc.pipeline_stage > 1:
        pm.schedule = build_schedule(module, core, dims.pp_rank, pc.pipeline_stage, dims.pp_group, dims.device,
                                     pc.micro_batch_num, pc.pipeline_schedule)
    return pm


def compile_model(model: nn.Module, scope: str = "model") -> nn.Module:
    """torch.compile the whole model (one graph: fusions across blocks, the longest compile), or the
    per-block step with its recompute (GPT2Model.compile_blocks: one compilation shared by identical blocks;
    the model object and its parameter names do not change)."""
    dev.require_compile_backend("npu" if any(dev.is_npu_tensor(p) for p in model.parameters()) else "other")
    if scope == "model":
        return torch.compile(model)
    if scope != "blocks":
        raise ValueError(f"unknown compile scope {scope!r}: use model or blocks")
    model.base_model_body().compile_blocks()
    return model
