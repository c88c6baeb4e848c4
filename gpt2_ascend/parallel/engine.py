"""Distributed training: what the trainer does differently under torchrun.

`init_parallel` starts the process group and the (pp, dp, tp) mesh; `parallelize` turns the model into
what each rank runs, in torchtitan's order: pipeline split -> tensor parallel -> recompute (already set on
the blocks) -> compile -> FSDP2 / DDP; `ParallelTrainer` runs one optimizer step through it (the pipeline
schedule when there are stages), clips across shards and stages, and writes sharded DCP checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import device as dev
from ..train import checkpoint as ckpt
from ..train.trainer import Trainer
from . import checkpoint as sharded
from .clip import clip_grad_norm
from .data_parallel import apply_ddp, apply_fsdp
from .mesh import ParallelConfig, build_mesh, init_distributed, vocab_multiple
from .pipeline import PipelineStageModule, TiedEmbeddingSync, build_schedule, pipeline_step
from .tensor_parallel import apply_tensor_parallel, to_per_head_qkv

# Parameters above this are built on the meta device and materialised already sharded.
META_INIT_PARAMS = 2_000_000_000


@dataclass
class ParallelContext:
    """One rank's view of the layout. `rank` / `world_size` for the data loader are the data-parallel ones."""
    pc: ParallelConfig
    mesh: object
    device: torch.device
    global_rank: int
    global_world: int
    parallel: bool = True

    @property
    def rank(self) -> int:  # the data loader's slice
        return self.mesh["dp"].get_local_rank()

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
        return self.mesh["pp"].get_group()

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()


def parallel_config(recipe) -> ParallelConfig:
    p = recipe.parallel
    return ParallelConfig(data_parallel=p.data_parallel, model_parallel=p.model_parallel,
                          pipeline_stage=p.pipeline_stage, micro_batch_num=p.micro_batch_num,
                          optimizer_shard=p.optimizer_shard, recompute=p.recompute,
                          sequence_parallel=p.sequence_parallel, pipeline_schedule=p.pipeline_schedule)


def init_parallel(recipe) -> ParallelContext:
    """Process group + mesh from torchrun's environment and the recipe's parallel section."""
    pc = parallel_config(recipe)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mc = recipe.model.model_config
    pc.validate(world_size=world, n_head=mc.num_heads, n_layer=mc.num_layers)
    if pc.pipeline_stage > 1 and recipe.runner_config.batch_size % pc.micro_batch_num:
        raise ValueError(f"runner_config.batch_size {recipe.runner_config.batch_size} does not split into "
                         f"parallel.micro_batch_num={pc.micro_batch_num} equal micro-batches: make it a multiple")
    if recipe.model.model_config.pet_config.pet_type == "lora" and (pc.model_parallel > 1 or pc.pipeline_stage > 1
                                                                    or pc.uses_fsdp):
        raise ValueError("LoRA with tensor / pipeline parallel or optimizer_shard is not supported: use "
                         "data_parallel only (DDP), or one device")
    device = init_distributed(recipe.device)
    mesh = build_mesh(pc, device)
    return ParallelContext(pc=pc, mesh=mesh, device=device, global_rank=dist.get_rank(),
                           global_world=dist.get_world_size())


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_main(fn):
    """Run fn on rank 0 and hand its result to every rank; an error there is raised on every rank
    (with its one-line message) instead of leaving the others waiting."""
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


def config_overrides(ctx: ParallelContext, base_multiple: int) -> dict:
    """The internal vocab padding every rank builds with (a multiple of 64 and of the TP degree)."""
    return dict(pad_vocab_size_multiple=vocab_multiple(ctx.pc, base_multiple))


def use_meta_init(recipe, overrides: dict) -> bool:
    """parallel.meta_init, or automatically for models above META_INIT_PARAMS."""
    if recipe.parallel.meta_init is not None:
        return recipe.parallel.meta_init
    from ..train.recipe import gpt2_config
    from ..train.trainer import resolve_path
    from ..hf import load_config
    source = resolve_path(recipe.load_checkpoint)
    config = load_config(source) if source and os.path.isfile(os.path.join(source, "config.json")) and \
        not sharded.is_sharded(source) else gpt2_config(recipe)
    from ..model import GPT2LMHeadModel
    with torch.device("meta"):  # counting costs no memory
        return GPT2LMHeadModel(config).num_parameters() > META_INIT_PARAMS


def build_meta_model(recipe, overrides: dict, log):
    """The module tree on the meta device and where its weights will come from (None: a fresh init)."""
    from ..hf import load_config
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel
    from ..train.recipe import gpt2_config, training_overrides
    from ..train.trainer import resolve_path, task_of
    cls = GPT2ForSequenceClassification if task_of(recipe) == "txtcls" else GPT2LMHeadModel
    source = resolve_path(recipe.load_checkpoint)
    if recipe.model.model_config.pet_config.pet_type == "lora":
        raise ValueError("LoRA runs build the whole model on each rank: set parallel.meta_init=false")
    if source and sharded.is_sharded(source):
        config = sharded.GPT2Config.from_hf_dict(sharded.read_meta(source)["model_config"])
        config = config.replace(**dict(training_overrides(recipe), **overrides))
    elif source:
        if not os.path.exists(source):
            raise FileNotFoundError(f"load_checkpoint not found: {source}")
        config = load_config(source, **dict(training_overrides(recipe), **overrides))
    else:
        config = gpt2_config(recipe).replace(**overrides)
    with torch.device("meta"):
        model = cls(config)
    model.set_recompute(recipe.parallel.recompute)
    log(f"building on the meta device ({'from ' + source if source else 'fresh init'}): each rank allocates "
        f"only its shards")
    return model, source or None


def materialize_model(pm: "ParallelModel", config, ctx: "ParallelContext", source: str | None):
    """Allocate and fill this rank's shards (a fresh init, an HF directory, or a sharded checkpoint)."""
    from .materialize import CheckpointTensors, materialize
    if source and sharded.is_sharded(source):
        materialize(pm.core, config, ctx.device, None, pm.tied)
        sharded.load_model_only(source, pm.module)
        return
    tensors = CheckpointTensors(source, config, per_head=True) if source else None
    materialize(pm.core, config, ctx.device, tensors, pm.tied)


@dataclass
class ParallelModel:
    module: nn.Module  # what runs the step (DDP / FSDP / compiled)
    core: nn.Module  # the bare model or pipeline stage: parameters, names, the architecture
    schedule: object = None
    tied: TiedEmbeddingSync | None = None

    @property
    def pipelined(self) -> bool:
        return self.schedule is not None


def parallelize(model: nn.Module, ctx: ParallelContext, compile_blocks: bool = False,
                per_head: bool = True, materialize: bool = True) -> ParallelModel:
    """Split, shard and wrap `model` (built identically on every rank) for this rank. A model on the
    meta device stays there (materialize=False): parallel.materialize gives it its shards afterwards."""
    pc = ctx.pc
    if per_head:  # the distributed c_attn layout, whatever the TP degree (see tensor_parallel.py)
        to_per_head_qkv(model)
    core = model
    if pc.pipeline_stage > 1:
        core = PipelineStageModule(model, ctx.pp_rank, pc.pipeline_stage)
    if materialize:
        core.to(ctx.device)
    if pc.model_parallel > 1:
        apply_tensor_parallel(core, ctx.mesh["tp"], pc.sequence_parallel)
    if compile_blocks:
        dev.require_compile_backend(ctx.device.type)
        for block in _blocks(core):
            block.compile()  # in place: parameter names stay the same
    module = core
    if pc.uses_fsdp:  # fp32 master weights and gradient reduction; autocast sets the compute dtype
        apply_fsdp(core, ctx.mesh["dp"], param_dtype=None, reduce_dtype=torch.float32)
    elif pc.uses_ddp:
        module = apply_ddp(core, ctx.mesh["dp"], ctx.device)
    pm = ParallelModel(module=module, core=core)
    if pc.pipeline_stage > 1:
        pm.schedule = build_schedule(module, core, ctx.pp_rank, pc.pipeline_stage, ctx.pp_group, ctx.device,
                                     pc.micro_batch_num, pc.pipeline_schedule)
        pm.tied = TiedEmbeddingSync(ctx.mesh, core)
    return pm


def _blocks(core):
    h = core.transformer.h
    return list(h.values()) if isinstance(h, nn.ModuleDict) else list(h)


def architecture_of(model: nn.Module) -> str:
    return getattr(model, "hf_architecture", None) or (
        "GPT2ForSequenceClassification" if hasattr(model, "score") else "GPT2LMHeadModel")


class ParallelTrainer(Trainer):
    """The trainer's loop with a distributed step and sharded checkpoints."""

    def __init__(self, pm: ParallelModel, ctx: ParallelContext, model_meta: dict, **kwargs):
        super().__init__(pm.module, raw_model=pm.core, **kwargs)
        self.pm, self.ctx, self.model_meta = pm, ctx, model_meta
        if self.scaler is not None:
            s = self.settings  # every rank must agree on an overflow: the scaler all-reduces found_inf
            self.scaler = dev.grad_scaler(ctx.device.type, sharded=True, init_scale=s.loss_scale,
                                          growth_factor=s.scale_factor, backoff_factor=1.0 / s.scale_factor,
                                          growth_interval=s.scale_window)

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """The step's gradients through the pipeline schedule or the wrapped model; returns the global
        batch's mean loss (averaged over data-parallel ranks) on every rank."""
        n = len(micro_batches)
        total_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if self.pm.pipelined:
                total_loss += self._pipeline_loss(batch).detach() / n
            else:
                with self._no_sync(i < n - 1), dev.autocast(self.device, self.amp_dtype):
                    loss = self.compute_loss(batch) / n
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                total_loss += loss.detach()
        if self.pm.pipelined and n > 1:
            for p in self.params:  # each schedule step averaged its micro-batches; average the steps too
                if p.grad is not None:
                    p.grad.div_(n)
        if self.pm.tied is not None:
            self.pm.tied()
        if self.ctx.pc.data_parallel > 1:
            dist.all_reduce(total_loss, op=dist.ReduceOp.SUM, group=self.ctx.dp_group)
            total_loss /= self.ctx.pc.data_parallel
        return total_loss

    def clip_gradients(self) -> torch.Tensor:
        """One norm over shards (DTensor placements) and pipeline stages, the tied head's copy counted once."""
        duplicates = self.pm.tied.duplicates if self.pm.tied is not None else ()
        return clip_grad_norm(self.params, self.settings.max_grad_norm or 0.0, self.ctx.pp_group, duplicates,
                              rule=self.settings.step_rule)

    def _pipeline_loss(self, batch: dict) -> torch.Tensor:
        if self.scaler is not None:
            raise ValueError("fp16 loss scaling with pipeline_stage > 1 is not supported: use bf16")
        core = self.pm.core
        with dev.autocast(self.device, self.amp_dtype):  # the schedule runs the forward in this thread
            if self.settings.task == "txtcls":
                return pipeline_step(self.pm.schedule, core, batch["input_ids"], batch["labels"],
                                     batch["attention_mask"], self.ctx.pp_group)
            tokens = batch["input_ids"]  # (B, T+1): read T tokens, predict the next T
            return pipeline_step(self.pm.schedule, core, tokens[:, :-1], tokens[:, 1:], None, self.ctx.pp_group)

    def _no_sync(self, skip: bool):
        """DDP: reduce gradients once per optimizer step, not per micro-batch."""
        import contextlib
        if skip and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def stop_signal(self) -> int:
        """A signal reaches the ranks at different moments: they all stop after the first step at which any of
        them had one (a CPU all-reduce per step, so the device is not waited for)."""
        local = super().stop_signal()
        if self.stop is None:  # no handlers on any rank (the Python API without run_training)
            return local
        flag = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group())
        return int(flag.item())

    def _cpu_group(self):
        if not hasattr(self, "_gloo_group"):  # created on every rank at the same (first) step
            self._gloo_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._gloo_group

    # ---- checkpoints: the weights and optimizer in DCP shards, the loop's state one file per rank ----

    def save_checkpoint(self) -> str:
        root = ckpt.checkpoint_root(self.output_dir)
        path = os.path.join(root, ckpt.step_dir_name(self.step))
        meta = dict(self.model_meta, step=self.step, layout=dict(
            data_parallel=self.ctx.pc.data_parallel, model_parallel=self.ctx.pc.model_parallel,
            pipeline_stage=self.ctx.pc.pipeline_stage))
        sharded.save_sharded(path, self.model, self.optimizer, self.trainer_state(), meta,
                             manifest_meta=dict(self.settings.checkpoint_meta, step=self.step, sharded=True))
        if self.ctx.is_main and self.settings.keep_checkpoints:
            ckpt.prune(root, self.settings.keep_checkpoints)
        barrier()
        self.last_saved_step = self.step
        return path

    def load_checkpoint(self, path: str):
        self.load_trainer_state(sharded.load_sharded(path, self.model, self.optimizer))

    def evaluate(self) -> dict:
        if self.pm.pipelined:
            return {}  # a pipeline stage cannot run the whole model: the merged final model is evaluated
        return super().evaluate()


def export_final(trainer: ParallelTrainer, recipe, output_dir: str, ctx: ParallelContext) -> str:
    """OUTPUT_DIR/final/ in HF format from the run's last (sharded) checkpoint, merged on rank 0."""
    from ..tokenizer import default_tokenizer_dir, load_tokenizer, save_tokenizer
    from ..train.trainer import export_final as export_single, resolve_path
    final_dir = os.path.join(output_dir, "final")
    if ctx.is_main:
        if trainer.model_meta.get("lora"):  # data parallel only: rank 0 holds the whole adapted model
            export_single(trainer.raw_model, recipe, output_dir, lora=True)
        else:
            path = os.path.join(ckpt.checkpoint_root(output_dir), ckpt.step_dir_name(trainer.step))
            sharded.merge_to_hf(path, final_dir)
            if trainer.model_meta["architecture"] == "GPT2LMHeadModel":
                write_generation_config(recipe, final_dir)
            tokenizer_dir = resolve_path(recipe.tokenizer) or default_tokenizer_dir()
            try:
                save_tokenizer(load_tokenizer(tokenizer_dir), final_dir, source_dir=tokenizer_dir)
            except FileNotFoundError:
                pass
    barrier()
    return final_dir


def write_generation_config(recipe, final_dir: str):
    """The recipe's generation defaults next to the merged weights, as a single-device export has them."""
    from ..config import GPT2Config
    from ..fileio import write_json
    from ..hf import GENERATION_CONFIG
    from ..train.recipe import generation_settings
    config = GPT2Config.from_json_file(os.path.join(final_dir, "config.json"))
    write_json(generation_settings(recipe, config).to_hf_dict(), os.path.join(final_dir, GENERATION_CONFIG))


def evaluate_merged(trainer: ParallelTrainer, final_dir: str):
    """Rank 0 evaluates the exported model (pipeline runs, whose stages cannot run it whole)."""
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel
    cls = GPT2ForSequenceClassification if trainer.model_meta["architecture"] == "GPT2ForSequenceClassification" \
        else GPT2LMHeadModel
    model = cls.from_pretrained(final_dir, device=trainer.device)
    result = trainer.evaluate_fn(model)
    trainer.last_eval = dict(step=trainer.step, **result)
