"""The trainer: one optimizer step at a time, metrics, periodic evaluation, checkpoints, exact resume.

`Trainer` holds the loop and knows nothing about recipes: give it a model, an optimizer, an LRSchedule
and a StepLoader. `run_training(recipe)` (what train.py calls) builds those from a recipe, resumes,
trains and exports OUTPUT_DIR/final/.

The step is written so an accelerator never waits on the host: `train_step` does the micro-batches,
autocast, loss scaling, clipping, optimizer and schedule without reading a value back; its losses stay
device tensors until `flush` turns every `log_interval` steps of them into metrics.jsonl lines at once.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import device as dev
from ..data.loader import StepLoader
from . import checkpoint as ckpt, rundir
from .interrupt import StopOnSignal, TrainingInterrupted
from .metrics import MetricsLogger, flops_per_token, peak_flops, plot_loss_curve
from .optim import (UPDATE_RULES, LRSchedule, build_optimizer, build_schedule, clip_by_global_norm,
                    resolve_total_steps, set_lr)


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite loss, too many overflowing steps); the message is one line."""


@dataclass
class TrainSettings:
    total_steps: int
    task: str = "lm"  # lm: next-token loss on (B, T+1) blocks | txtcls: the classifier's loss
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 adds dynamic loss scaling)
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    # torch | mindspore: the clipping formula (optim.clip_coefficient) and, for fp16, whether the loss scale stays
    # >= 1 as MindSpore's DynamicLossScaleUpdateCell keeps it. Recipes naming MindFormers' optimizers use mindspore.
    step_rule: str = "torch"
    log_interval: int = 10
    save_steps: int | None = None
    keep_checkpoints: int = 3
    eval_interval: int | None = None
    loss_scale: float = 2.0 ** 32
    scale_factor: float = 2.0
    scale_window: int = 1000
    max_consecutive_skips: int = 100
    progress: bool = True
    checkpoint_meta: dict = field(default_factory=dict)
    json_files: dict = field(default_factory=dict)  # extra files in every checkpoint (config.json)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model, optimizer, schedule: LRSchedule, loader: StepLoader, device: torch.device,
                 settings: TrainSettings, output_dir: str | None = None, evaluate=None, raw_model=None,
                 log=print):
        self.model = model  # what runs the step (compiled / wrapped)
        self.raw_model = raw_model if raw_model is not None else model  # what is saved and evaluated
        self.optimizer = optimizer
        self.schedule = schedule
        self.loader = loader
        self.device = device
        self.settings = settings
        self.output_dir = output_dir
        self.evaluate_fn = evaluate
        self.log = log
        self.amp_dtype = dev.autocast_dtype(device, settings.precision)
        self.scaler = None
        if settings.precision == "fp16":
            self.scaler = grad_scaler(device, init_scale=settings.loss_scale, growth_factor=settings.scale_factor,
                                      backoff_factor=1.0 / settings.scale_factor,
                                      growth_interval=settings.scale_window)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.step = 0  # steps run (batches consumed), what max_steps and checkpoints count
        self.updates = 0  # updates applied (an fp16 overflow skips one), what the lr schedule counts
        optimizer.register_step_post_hook(self._count_update)
        self.consecutive_skips = 0
        self.pending: list[dict] = []
        self.last_eval: dict | None = None
        self.last_saved_step: int | None = None
        self.metrics: MetricsLogger | None = None
        self.stop: StopOnSignal | None = None  # run_training's signal handlers: polled after each step
        self.stopped_by = 0  # the signal the loop stopped for (0: it ran to total_steps)
        self._interval_start = time.perf_counter()

    # ---- one optimizer step ----
    def train_step(self, micro_batches: list[dict]) -> dict:
        """Forward/backward over the micro-batches, then clip, step and advance the schedule. Returns
        device tensors (loss, grad_norm[, loss_scale]); nothing is read back to the host."""
        self.model.train()
        out = dict(loss=self.forward_backward(micro_batches))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            out["loss_scale"] = self.scaler._get_scale_async().detach().clone()
        out["grad_norm"] = self.clip_gradients()
        set_lr(self.optimizer, self.schedule(self.updates))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the unscaled gradients hold inf/nan
            self.scaler.update()
            if self.settings.step_rule == "mindspore":
                keep_loss_scale_at_least_one(self.scaler)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return out

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Accumulate the gradients of the step's micro-batches; returns their mean loss (a device tensor)."""
        n = len(micro_batches)
        total_loss = torch.zeros((), device=self.device)
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with dev.autocast(self.device, self.amp_dtype):
                loss = self.compute_loss(batch) / n
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total_loss += loss.detach()
        return total_loss

    def clip_gradients(self) -> torch.Tensor:
        """The total gradient norm, after clipping to max_grad_norm (when set) by the step rule's formula."""
        return clip_by_global_norm(self.params, self.settings.max_grad_norm, self.settings.step_rule)

    def _count_update(self, optimizer, args, kwargs):
        self.updates += 1

    def compute_loss(self, batch: dict) -> torch.Tensor:
        if self.settings.task == "txtcls":
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        tokens = batch["input_ids"]  # (B, T+1): the model reads T tokens and predicts the next T
        return self.model(input_ids=tokens[:, :-1], targets=tokens[:, 1:]).loss

    def tokens_per_step(self, micro_batches: list[dict]) -> int:
        ids = micro_batches[0]["input_ids"]
        width = ids.size(1) - 1 if self.settings.task == "lm" else ids.size(1)
        return len(micro_batches) * ids.size(0) * width

    # ---- the run ----
    def train(self, metrics: MetricsLogger | None = None) -> dict:
        """Run until settings.total_steps; returns the last step record."""
        self.metrics = metrics
        s = self.settings
        self._interval_start = time.perf_counter()
        last = None
        try:
            while self.step < s.total_steps:
                micro_batches = next(self.loader)
                lr = self.schedule(self.updates)
                out = self.train_step(micro_batches)
                self.pending.append(dict(step=self.step, lr=lr, tokens=self.tokens_per_step(micro_batches),
                                         epoch=self.step / self.loader.steps_per_epoch, out=out))
                if metrics is not None:
                    metrics.advance()
                at_end = self.step == s.total_steps
                self.stopped_by = 0 if at_end else self.stop_signal()
                do_eval = self.evaluate_fn is not None and (
                    at_end or (s.eval_interval and self.step % s.eval_interval == 0))
                do_save = self.output_dir is not None and (
                    at_end or self.stopped_by or (s.save_steps and self.step % s.save_steps == 0))
                if do_eval or do_save or at_end or self.stopped_by or self.step % s.log_interval == 0:
                    records = self.flush()
                    problem = self.divergence(records)
                    if problem:
                        self._write(records)
                        raise TrainingStopped(problem)
                    if do_eval:
                        records[-1].update(self.evaluate())
                    self._write(records)
                    last = records[-1]
                    if do_save:
                        self.save_checkpoint()
                    self._interval_start = time.perf_counter()  # eval / save time is not training time
                if self.stopped_by:
                    break
        finally:
            if self.pending:  # an exception mid-interval: keep what was measured
                try:
                    self._write(self.flush())
                except Exception:
                    pass
        return last or {}

    def stop_signal(self) -> int:
        """The signal (SIGINT / SIGTERM) that asked the run to stop after this step, else 0."""
        return self.stop.signum if self.stop is not None else 0

    def flush(self) -> list[dict]:
        """Read the pending steps' device values back (one sync) and turn them into records."""
        if not self.pending:
            return []
        keys = [k for k in ("loss", "grad_norm", "loss_scale") if k in self.pending[0]["out"]]
        stacked = {k: torch.stack([p["out"][k].float() for p in self.pending]).tolist() for k in keys}
        elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
        tokens_per_s = sum(p["tokens"] for p in self.pending) / elapsed
        records = []
        for i, p in enumerate(self.pending):
            record = dict(step=p["step"], loss=stacked["loss"][i], lr=p["lr"], tokens_per_s=tokens_per_s,
                          grad_norm=stacked["grad_norm"][i], epoch=round(p["epoch"], 6))
            if "loss_scale" in stacked:
                record["loss_scale"] = stacked["loss_scale"][i]
                record["skipped"] = not math.isfinite(record["grad_norm"])
            if self.metrics is not None and self.metrics.mfu(tokens_per_s) is not None:
                record["mfu"] = self.metrics.mfu(tokens_per_s)
            records.append(record)
        self.pending = []
        self._interval_start = time.perf_counter()
        return records

    def _write(self, records: list[dict]):
        if self.metrics is not None and records:
            self.metrics.write(records)

    def divergence(self, records: list[dict]) -> str | None:
        """Why training must stop, or None: a non-finite loss without loss scaling, or fp16 steps that
        overflowed max_consecutive_skips times in a row (each one skipped and the scale lowered)."""
        for r in records:
            if self.scaler is not None:
                self.consecutive_skips = self.consecutive_skips + 1 if r["skipped"] else 0
                if self.consecutive_skips >= self.settings.max_consecutive_skips:
                    return (f"{self.consecutive_skips} steps in a row overflowed in fp16 (the last at step "
                            f"{r['step']}, loss scale {r['loss_scale']:g}): training stopped{self._last_good()}; "
                            f"lower the learning rate or use bf16")
            elif not math.isfinite(r["loss"]) or not math.isfinite(r["grad_norm"]):
                what, value = ("loss", r["loss"]) if not math.isfinite(r["loss"]) else ("gradient norm", r["grad_norm"])
                return (f"the {what} became {value} at step {r['step']}: training stopped{self._last_good()}; "
                        f"lower the learning rate, check the data, or use fp16 with loss scaling")
        return None

    def _last_good(self) -> str:
        if self.last_saved_step is None:
            return " (no checkpoint was saved yet)"
        return f", the last good checkpoint is step {self.last_saved_step}"

    def evaluate(self) -> dict:
        """Run the evaluation callback; its numbers go into the step's record as eval_*."""
        result = self.evaluate_fn(self.raw_model)
        self.last_eval = dict(step=self.step, **result)
        return {f"eval_{k}": v for k, v in result.items()}

    # ---- checkpoints ----
    def trainer_state(self) -> dict:
        """The loop's own state: step, data position, schedule, RNG states, loss scaler."""
        return dict(step=self.step, updates=self.updates, loader=self.loader.state_dict(),
                    schedule=self.schedule.state_dict(),
                    rng=capture_rng(self.device), consecutive_skips=self.consecutive_skips,
                    scaler=self.scaler.state_dict() if self.scaler is not None else None)

    def load_trainer_state(self, trainer: dict):
        self.step = int(trainer["step"])
        self.updates = int(trainer.get("updates", self.step))  # older checkpoints: no step was skipped
        self.loader.load_state_dict(trainer["loader"])
        self.consecutive_skips = int(trainer.get("consecutive_skips", 0))
        if self.scaler is not None and trainer.get("scaler"):
            self.scaler.load_state_dict(trainer["scaler"])
        restore_rng(self.device, trainer["rng"])
        self.last_saved_step = self.step

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as state dicts (model, optimizer, trainer)."""
        return dict(model=model_state(self.raw_model), optimizer=self.optimizer.state_dict(),
                    trainer=self.trainer_state())

    def load_state_dict(self, states: dict):
        load_model_state(self.raw_model, states["model"])
        self.optimizer.load_state_dict(states["optimizer"])
        self.load_trainer_state(states["trainer"])

    def save_checkpoint(self) -> str:
        root = ckpt.checkpoint_root(self.output_dir)
        path = ckpt.save_checkpoint(root, self.step, self.state_dict(), json_files=self.settings.json_files,
                                    meta=dict(self.settings.checkpoint_meta, step=self.step),
                                    keep=self.settings.keep_checkpoints)
        self.last_saved_step = self.step
        return path


# ---------------------------------------------------------------------------------------------
# state helpers
# ---------------------------------------------------------------------------------------------
def model_state(model: torch.nn.Module) -> dict:
    """The weights to checkpoint: all of them, or only the trainable ones when most are frozen (LoRA)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    if len(trainable) < sum(1 for _ in model.parameters()):
        return {k: v for k, v in state.items() if k in trainable}
    return state


def load_model_state(model: torch.nn.Module, state: dict):
    """Load a checkpoint's weights (all, or the trainable ones of a LoRA run); a mismatch is one line."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    partial = set(state) == trainable and trainable != set(model.state_dict())
    try:
        model.load_state_dict(state, strict=not partial)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ckpt.CheckpointError(f"the checkpoint's weights do not fit this recipe's model ({detail}); "
                                   f"resume with the recipe the run was started with") from None


def keep_loss_scale_at_least_one(scaler):
    """MindSpore's DynamicLossScaleUpdateCell never lowers the loss scale below 1; torch's GradScaler would."""
    scale = getattr(scaler, "_scale", None)
    if scale is not None:
        scale.clamp_(min=1.0)


def grad_scaler(device: torch.device, **settings):
    """Dynamic loss scaling for fp16 (torch_npu brings its own scaler class for NPUs: device.grad_scaler)."""
    return dev.grad_scaler(device.type, **settings)


def capture_rng(device: torch.device) -> dict:
    """Python, numpy, torch and device generator states, as weights_only-loadable values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(internal), gauss],
                numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                torch=dev.rng_state(device))


def restore_rng(device: torch.device, state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    dev.set_rng_state(device, state["torch"])


def seed_everything(seed: int, device: torch.device):
    random.seed(seed)
    np.random.seed(seed)
    dev.manual_seed(seed, device)


# ---------------------------------------------------------------------------------------------
# from a recipe: distributed seam, model, data, the whole run
# ---------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(recipe):
    """The process layout: a DistContext for one process, or gpt2_ascend.parallel's ParallelContext when
    the recipe (use_parallel) and the launcher (torchrun's WORLD_SIZE) both ask for more."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = recipe.parallel
    layout = p.data_parallel * p.model_parallel * p.pipeline_stage
    if not recipe.use_parallel:
        if world > 1:
            raise ValueError(f"WORLD_SIZE is {world} but use_parallel is false: pass --use_parallel True, or "
                             f"run one process")
        return DistContext()
    if world == 1:
        if layout > 1:
            raise ValueError(f"the parallel section asks for {layout} devices (data_parallel {p.data_parallel} x "
                             f"model_parallel {p.model_parallel} x pipeline_stage {p.pipeline_stage}) but this is "
                             f"one process: launch with torchrun --nproc_per_node {layout}, or set "
                             f"--use_parallel False")
        return DistContext()
    from ..parallel.engine import init_parallel
    return init_parallel(recipe)


def wrap_model(model: torch.nn.Module, recipe, dist: DistContext) -> torch.nn.Module:
    """The module the step runs on one device: torch.compile'd when runner_config.compile asks for it.
    (Distributed runs are wrapped by gpt2_ascend.parallel.engine.parallelize instead.)"""
    if recipe.runner_config.compile:
        model = compile_model(model, recipe.runner_config.compile_scope)
    return model


def compile_model(model: torch.nn.Module, scope: str = "model") -> torch.nn.Module:
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


def task_of(recipe) -> str:
    return "txtcls" if recipe.model.arch.type == "GPT2ForSequenceClassification" else "lm"


def build_model(recipe, device: torch.device, log=print, config_overrides: dict | None = None) -> torch.nn.Module:
    """The model a recipe asks for, on `device`: from scratch, or from load_checkpoint (an HF-format
    directory, one of our checkpoints, or a PEFT adapter directory, whose training goes on from its base),
    with LoRA adapters when model_config.pet_config says so."""
    from .lora import adapter_base, apply_lora, load_adapter
    from .recipe import gpt2_config, lora_settings

    cls = model_class(recipe)
    source = resolve_path(recipe.load_checkpoint)
    adapter = source if continues_adapter(recipe) else None
    if adapter:
        source = adapter_base(adapter)
        log(f"continuing the adapter in {adapter} on its base model {source}")
    if source:
        model = load_start_weights(cls, recipe, source, config_overrides, log)
    else:
        model = cls(gpt2_config(recipe).replace(**(config_overrides or {})))
    seq = recipe.model.model_config.seq_length
    if seq > model.config.n_positions:
        raise ValueError(f"model_config.seq_length {seq} exceeds the model's n_positions "
                         f"{model.config.n_positions}: set model.model_config.seq_length={model.config.n_positions}")
    model.set_recompute(recipe.parallel.recompute)
    if adapter:  # the adapter's own rank and targets: pet_config's would be a different adapter
        model = load_adapter(model, adapter, merge=False, trainable=True)
    elif lora_settings(recipe) and not hasattr(model, "peft_config"):  # (a MindFormers LoRA .ckpt has its own)
        model = apply_lora(model, **lora_settings(recipe))
    return model.to(device)


def model_class(recipe):
    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel
    return GPT2ForSequenceClassification if task_of(recipe) == "txtcls" else GPT2LMHeadModel


def continues_adapter(recipe) -> bool:
    """load_checkpoint is a PEFT adapter directory (ours or one trained on transformers' GPT-2)."""
    from .lora import is_adapter_dir
    source = resolve_path(recipe.load_checkpoint)
    return bool(source) and os.path.isdir(source) and is_adapter_dir(source)


def uses_lora(recipe) -> bool:
    from .recipe import lora_settings
    return bool(lora_settings(recipe)) or continues_adapter(recipe)


def load_start_weights(cls, recipe, source: str, config_overrides: dict | None, log):
    """The weights a run starts from: an HF-format directory or hub id, one of our (sharded) checkpoints, or a
    MindFormers .ckpt."""
    from ..config import GPT2Config
    from ..hf import model_from_state
    from .recipe import training_overrides

    if not os.path.exists(source) and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"load_checkpoint not found: {source}; pass an HF-format GPT-2 directory, "
                                f"OUTPUT_DIR/checkpoint/step_N or a MindFormers .ckpt file")
    overrides = dict(training_overrides(recipe), **(config_overrides or {}))
    from ..parallel.checkpoint import is_sharded, model_from_sharded
    if os.path.isdir(source) and is_sharded(source):  # a distributed run's checkpoint: gathered into one model
        model = model_from_sharded(cls, source, overrides, dtype=torch.float32)
    elif is_mindspore_checkpoint(source):  # MindFormers' own weights, converted on the fly
        model = model_from_mindspore(cls, source, recipe, overrides, log)
    elif os.path.isdir(source) and ckpt.is_training_checkpoint(source):
        manifest = ckpt.verify_checkpoint(source, ckpt.MODEL_FILES)
        if manifest.get("meta", {}).get("lora"):
            raise ValueError(f"{source} is a LoRA checkpoint (adapters only): load its run's final/adapter "
                             f"directory (training continues from its base) or resume that run with --resume")
        config = GPT2Config.from_json_file(os.path.join(source, "config.json")).replace(**overrides)
        state = ckpt.load_checkpoint(source, ["model"], verify=False)["model"]
        model = model_from_state(cls, config, state, source=source, dtype=torch.float32)
        model.name_or_path = os.path.abspath(source)
    else:  # an HF-format directory, or a hub id
        model = cls.from_pretrained(source, dtype=torch.float32, **overrides)
    _note_shape(recipe, model.config, source, log)
    return model


def is_mindspore_checkpoint(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".ckpt")


def model_from_mindspore(cls, path: str, recipe, overrides: dict, log=print):
    """A MindFormers GPT-2 .ckpt as `cls`: the tensors give the shape, the recipe the heads and activation
    (which a .ckpt does not record). A LoRA checkpoint (lora_a / lora_b beside the base) becomes a LoRA model with
    its adapters, scaled by the recipe's lora_alpha."""
    from ..convert.lora import load_mindformers_lora
    from ..convert.mindformers import MindFormersSource, load_mindspore_model
    from .recipe import HIDDEN_ACT, lora_settings
    mc = recipe.model.model_config
    heads, act = mc.num_heads, HIDDEN_ACT[mc.hidden_act]
    with MindFormersSource(path, heads, act) as source:
        has_lora = bool(source.lora_names)
    if not has_lora:
        return load_mindspore_model(path, n_head=heads, activation=act, cls=cls, dtype=torch.float32,
                                    verify_crc=False, **overrides)
    lora = lora_settings(recipe)
    if not lora:
        raise ValueError(f"{path} holds unmerged LoRA adapters: use a LoRA recipe (model.model_config.pet_config, "
                         f"whose lora_alpha scales them), or merge them first with convert/merge_lora.py")
    model = load_mindformers_lora(path, lora["alpha"], heads, act, cls=cls, lora_dropout=lora["dropout"],
                                  verify_crc=False, **overrides)
    rank, targets = model.lora_layout
    log(f"LoRA adapters from {path}: rank {rank} on {', '.join(targets)} (alpha {lora['alpha']:g} from the recipe)")
    return model


def _note_shape(recipe, config, source: str, log):
    mc = recipe.model.model_config
    wanted = (mc.num_layers, mc.hidden_size, mc.num_heads, mc.vocab_size)
    have = (config.n_layer, config.n_embd, config.n_head, config.vocab_size)
    if wanted != have:
        log(f"note: the model shape comes from {source} ({config.n_layer} layers, hidden {config.n_embd}, "
            f"{config.n_head} heads, vocab {config.vocab_size}), not from the recipe's model_config")


def resolve_path(path: str) -> str:
    """Expand ~ and environment variables; $GPT2_DATA_DIR defaults to the data directory."""
    if not path:
        return ""
    from ..tokenizer import default_data_dir
    for form in ("${GPT2_DATA_DIR}", "$GPT2_DATA_DIR"):
        path = path.replace(form, default_data_dir())
    return os.path.expanduser(os.path.expandvars(path))


def fetch_if_missing(path: str) -> str:
    """A missing file of the data directory (GPT2_DATA_DIR) is downloaded, checksum-verified; any other
    missing path is an error."""
    if not path or os.path.exists(path):
        return path
    from ..tokenizer import default_data_dir
    root = os.path.abspath(default_data_dir())
    if os.path.abspath(path).startswith(root + os.sep):
        from ..data.download import dataset_path
        return dataset_path(os.path.relpath(os.path.abspath(path), root), root=root)
    raise FileNotFoundError(f"dataset not found: {path}")


def load_datasets(recipe, cache_dir: str):
    """(train data, eval data or None) as numpy arrays: token blocks of seq_length + 1 (train) and
    seq_length (eval) for language modelling, dicts of input_ids / attention_mask / labels for txtcls."""
    train_path = resolve_path(recipe.train_dataset.data_loader.dataset_dir)
    if not train_path:
        raise ValueError("no training data: pass --train_dataset_dir PATH (a prepared .npy / .npz, or a raw "
                         "wiki.*.tokens / .txt / .tsv file) or set train_dataset.data_loader.dataset_dir")
    train = load_split(recipe, recipe.train_dataset, train_path, recipe.model.model_config.seq_length + 1, cache_dir)
    return train, load_eval_dataset(recipe, cache_dir)


def load_eval_dataset(recipe, cache_dir: str):
    """The eval_dataset (blocks of seq_length, or classification rows), or None when the recipe names none."""
    path = resolve_path(recipe.eval_dataset.data_loader.dataset_dir)
    if not path:
        return None
    return load_split(recipe, recipe.eval_dataset, path, recipe.model.model_config.seq_length, cache_dir)


def load_split(recipe, section, path: str, width: int, cache_dir: str):
    """One dataset section's rows (its first max_samples): token blocks `width` wide, or classification rows."""
    from ..data import store
    from ..data.hf_datasets import is_datasets_source
    from .recipe import datasets_options
    path = path if is_datasets_source(path) else fetch_if_missing(path)  # issue 16 hook: hub ids are no files
    tokenizer = resolve_path(recipe.tokenizer) or None
    if task_of(recipe) == "txtcls":
        data = store.load_txtcls(path, max_length=recipe.model.model_config.seq_length, tokenizer=tokenizer,
                                 cache_dir=cache_dir, dataset_name=section.dataset_name,
                                 mindformers_compat=section.mindformers_compat,
                                 **datasets_options(recipe, section, "txtcls"))  # issue 16 hook
    else:
        data = store.load_token_blocks(path, max_length=width, tokenizer=tokenizer,
                                       mindformers_compat=section.mindformers_compat, cache_dir=cache_dir,
                                       **datasets_options(recipe, section, "lm"))  # issue 16 hook
    return first_rows(data, section.max_samples)


def check_ranges(data, model_config, what: str):
    """Token ids inside the vocabulary and labels inside num_labels, checked once up front (an id out of
    range would otherwise fail deep inside the embedding lookup)."""
    ids = data["input_ids"] if isinstance(data, dict) else data
    top = int(np.asarray(ids).max()) if len(ids) else 0
    if top >= model_config.vocab_size:
        raise ValueError(f"the {what} holds token id {top} but the model's vocab_size is {model_config.vocab_size}: "
                         f"was it prepared with another tokenizer? (or set model.model_config.vocab_size)")
    if isinstance(data, dict) and "labels" in data and len(data["labels"]):
        labels = np.asarray(data["labels"])
        if labels.min() < 0 or labels.max() >= model_config.num_labels:
            raise ValueError(f"the {what} holds labels {labels.min()}..{labels.max()} but num_labels is "
                             f"{model_config.num_labels}: set model.model_config.num_labels")


def first_rows(data, n: int | None):
    if data is None or n is None:
        return data
    if isinstance(data, dict):
        return {k: v[:n] for k, v in data.items()}
    return data[:n]


def make_evaluator(recipe, eval_data, precision: str):
    """A callable model -> dict(loss, ppl) or dict(accuracy, loss), using gpt2_ascend.eval."""
    if eval_data is None:
        return None
    from ..eval import classification_accuracy, perplexity

    batch_size = recipe.eval_dataset.batch_size or recipe.runner_config.batch_size
    seq = recipe.model.model_config.seq_length
    if task_of(recipe) == "txtcls":
        def evaluate(model):
            r = classification_accuracy(model, eval_data, batch_size=batch_size, precision=precision)
            return dict(loss=r["loss"], accuracy=r["accuracy"])
    else:
        def evaluate(model):
            r = perplexity(model, eval_data, seq, batch_size=batch_size, precision=precision)
            return dict(loss=r["loss"], ppl=r["ppl"])
    return evaluate


def run_training(recipe, overwrite: bool = False, log=print) -> dict:
    """Everything train.py does: build from the recipe, resume, train, evaluate, export final/.
    Returns a summary dict (also written to OUTPUT_DIR/summary.json). Under torchrun with use_parallel
    every rank runs this; gpt2_ascend.parallel supplies the model split, the step and the checkpoints.

    The output directory is locked for the whole run (a second run into it fails at once, naming this one's
    pid), and nothing in it changes until the recipe, data, model, layout and resume point have all been
    checked. SIGINT / SIGTERM in the loop stop after the step with a checkpoint (TrainingInterrupted)."""
    with contextlib.ExitStack() as run_scope:  # the lock and the signal handlers, released however it ends
        return _run_training(recipe, overwrite, log, run_scope)


def _run_training(recipe, overwrite: bool, log, run_scope: contextlib.ExitStack) -> dict:
    from ..data.store import write_json  # atomic
    from .launcher import apply_launcher
    from .recipe import lora_settings, precision
    from .trackers import require_trackers

    recipe = apply_launcher(recipe, log=log)  # issue 16 hook: accelerate's precision / --cpu, data parallel N
    require_trackers(recipe.report_to)  # issue 16 hook: report_to's packages, before anything changes
    if recipe.run_mode in ("predict", "eval"):
        function = "predict_recipe" if recipe.run_mode == "predict" else "evaluate_recipe"
        raise ValueError(f"run_mode {recipe.run_mode} is not training: run train.py --run_mode {recipe.run_mode}, or "
                         f"call gpt2_ascend.train.run_modes.{function}(recipe)")
    if recipe.run_mode == "finetune" and not recipe.load_checkpoint:
        raise ValueError("run_mode finetune starts from trained weights: pass --load_checkpoint PATH (an HF-format "
                         "GPT-2 directory or a MindFormers .ckpt) or use --run_mode train")
    dist = init_distributed(recipe)
    stop = run_scope.enter_context(StopOnSignal(notify=None if dist.is_main else (lambda text: None)))
    if dist.parallel:
        from ..parallel import engine
        device = dist.device
        log = log if dist.is_main else (lambda *a, **k: None)
    else:
        device = dev.resolve_device(recipe.device)
        dev.set_device(device)
    if recipe.runner_config.compile:
        dev.require_compile_backend(device.type)  # before any data or model work
    sync = engine.barrier if dist.parallel else (lambda: None)
    output_dir = os.path.abspath(resolve_path(recipe.output_dir))
    root = ckpt.checkpoint_root(output_dir)
    def prepare_output():  # rank 0 locks the directory and decides (changing nothing); the others follow
        run_scope.enter_context(rundir.OutputDirLock(output_dir))
        return _resume_path(recipe, root, overwrite, output_dir, log)
    resume_path = engine.on_main(prepare_output) if dist.parallel else prepare_output()

    seed_everything(recipe.seed, device)
    cache_dir = resolve_path(recipe.data_cache_dir) or os.path.join(output_dir, "data_cache")
    if dist.parallel and not dist.is_main:
        sync()  # rank 0 prepares and caches the data first
    train_data, eval_data = load_datasets(recipe, cache_dir=cache_dir)
    if dist.parallel and dist.is_main:
        sync()
    overrides = engine.config_overrides(dist, recipe.model.model_config.pad_vocab_size_multiple) \
        if dist.parallel else {}
    meta = dist.parallel and engine.use_meta_init(recipe, overrides)
    if meta:  # large: no full copy anywhere, each rank allocates and fills only its shards
        model, source = engine.build_meta_model(recipe, overrides, log)
    else:
        model = build_model(recipe, torch.device("cpu") if dist.parallel else device, log, config_overrides=overrides)
    base = _base_model(model)
    configure_speed(base, recipe, dist, device, log)
    check_ranges(train_data, base.config, "training data")
    if eval_data is not None:
        check_ranges(eval_data, base.config, "evaluation data")
    if dist.parallel:
        pm = engine.parallelize(model, dist, compile_blocks=recipe.runner_config.compile,
                                per_head=not uses_lora(recipe), materialize=not meta)
        if meta:
            engine.materialize_model(pm, base.config, dist, source)
        raw_model, train_model = pm.core, pm.module
    else:
        raw_model = model
        train_model = wrap_model(model, recipe, dist)
    prec = precision(recipe)
    rc = recipe.runner_config
    accumulation = accumulation_steps(rc, dist.world_size, log)
    loader = StepLoader(train_data, batch_size=rc.batch_size, micro_batches=accumulation,
                        shuffle=recipe.train_dataset.data_loader.shuffle, seed=recipe.seed, rank=dist.rank,
                        world_size=dist.world_size, pin_memory=device.type == "cuda")
    run_steps = rc.max_steps if rc.max_steps > 0 else loader.steps_per_epoch * rc.epochs
    schedule = build_schedule(recipe.lr_schedule, resolve_total_steps(
        recipe.lr_schedule.total_steps, loader.steps_per_epoch, rc.epochs, rc.max_steps))
    opt = recipe.optimizer
    rule = UPDATE_RULES[opt.type]
    optimizer = build_optimizer(raw_model, schedule(0),
                                betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay,
                                device_type=device.type, update_rule=rule)
    wrapper = recipe.runner_wrapper
    callbacks = recipe.callbacks
    lora = uses_lora(recipe)
    settings = TrainSettings(
        total_steps=run_steps, task=task_of(recipe), precision=prec,
        max_grad_norm=wrapper.max_grad_norm if wrapper.use_clip_grad else None, step_rule=rule,
        log_interval=callbacks.MFLossMonitor.per_print_times,
        save_steps=callbacks.CheckpointMonitor.save_checkpoint_steps,
        keep_checkpoints=callbacks.CheckpointMonitor.keep_checkpoint_max,
        eval_interval=recipe.eval_step_interval if recipe.do_eval else None,
        loss_scale=wrapper.scale_sense.loss_scale_value, scale_factor=wrapper.scale_sense.scale_factor,
        scale_window=wrapper.scale_sense.scale_window, max_consecutive_skips=wrapper.max_consecutive_skips,
        progress=rc.progress_bar and dist.is_main,
        checkpoint_meta=dict(prefix=callbacks.CheckpointMonitor.prefix, lora=bool(lora),
                             load_checkpoint=recipe.load_checkpoint, task=task_of(recipe)),
        json_files={"config.json": base.config.to_hf_dict(base.hf_architecture)},
    )
    common = dict(optimizer=optimizer, schedule=schedule, loader=loader, device=device, settings=settings,
                  output_dir=output_dir, evaluate=make_evaluator(recipe, eval_data, prec), log=log)
    if dist.parallel:
        model_meta = dict(model_config=base.config.to_hf_dict(base.hf_architecture),
                          architecture=base.hf_architecture, qkv_layout="hf" if lora else "per_head",
                          task=task_of(recipe), lora=bool(lora))
        trainer = engine.ParallelTrainer(pm, dist, model_meta, **common)
    else:
        trainer = Trainer(train_model, raw_model=raw_model, **common)
    if resume_path:
        if dist.parallel:
            trainer.load_checkpoint(resume_path)
        else:
            trainer.load_state_dict(ckpt.load_checkpoint(resume_path))
        log(f"resumed from {resume_path} (step {trainer.step})")
        if trainer.step > run_steps:  # a model cannot be un-trained: say so before anything is written
            raise ValueError(f"{resume_path} is at step {trainer.step}, past max_steps {run_steps}: pass a "
                             f"larger --max_steps to continue it, or start a new run in another --output_dir")
        if trainer.step == run_steps:
            log(f"the run is already at step {run_steps} of {run_steps}: nothing left to train")
    def begin_run():  # everything is checked: only now does OUTPUT_DIR change (on rank 0)
        _begin_run(recipe, output_dir, fresh=not resume_path)
    engine.on_main(begin_run) if dist.parallel else begin_run()

    layout = f" on {dist.global_world} processes ({_layout(dist.pc)})" if dist.parallel else ""
    log(f"training {base.num_parameters():,} parameters ({_trainable(model):,} trainable) on "
        f"{dev.device_name(device)} ({prec}){layout}: {run_steps} steps of {rc.batch_size} x "
        f"{accumulation} x {dist.world_size} rows, {loader.steps_per_epoch} steps per epoch")
    seq = recipe.model.model_config.seq_length
    fpt = flops_per_token(base.num_parameters(), base.config.n_layer, base.config.n_embd, seq)
    metrics = None
    if dist.is_main:
        from .trackers import open_trackers
        trackers = open_trackers(recipe.report_to, output_dir, recipe.to_dict(), resumed=bool(resume_path),
                                 start_step=trainer.step, log=log)  # issue 16 hook: report_to
        metrics = MetricsLogger(output_dir, trainer.step, run_steps, resumed=bool(resume_path),
                                progress=settings.progress, flops_per_token=fpt,
                                peak=peak_flops(dev.device_name(device), prec), trackers=trackers)
    start = time.perf_counter()
    start_step = trainer.step
    trainer.stop, stop.graceful = stop, True  # a signal now stops the loop after its step
    try:
        last = trainer.train(metrics)
    finally:
        stop.graceful = False
        if metrics is not None:
            metrics.close()
    elapsed = time.perf_counter() - start
    if trainer.last_saved_step != trainer.step:
        trainer.save_checkpoint()
    signum = trainer.stopped_by or (0 if dist.parallel else stop.signum)  # ranks stop only where they agreed
    if signum:
        raise TrainingInterrupted(signum, trainer.step, os.path.join(root, ckpt.step_dir_name(trainer.step)))
    if dist.parallel:
        final_dir = engine.export_final(trainer, recipe, output_dir, dist)
        if trainer.evaluate_fn is not None and trainer.pm.pipelined and dist.is_main:
            engine.evaluate_merged(trainer, final_dir)  # a pipeline stage cannot run the whole model
    if trainer.evaluate_fn is not None and (trainer.last_eval is None or trainer.last_eval["step"] != trainer.step):
        trainer.evaluate()
    if not dist.is_main:
        sync()
        return {}
    curve = plot_loss_curve(metrics.path, os.path.join(output_dir, "loss_curve.png"))
    if not dist.parallel:
        final_dir = export_final(raw_model, recipe, output_dir, lora=bool(lora))
    final_loss = last["loss"] if "loss" in last else last_logged_loss(metrics.path)  # nothing left to train
    summary = dict(steps=trainer.step, steps_this_run=trainer.step - start_step, seconds=round(elapsed, 2),
                   final_loss=final_loss, final=final_dir, loss_curve=curve,
                   metrics=metrics.path, device=dev.device_name(device), precision=prec)
    if trainer.last_eval is not None:
        summary.update({f"eval_{k}": v for k, v in trainer.last_eval.items() if k != "step"})
    write_json(summary, os.path.join(output_dir, "summary.json"))
    sync()
    return summary


def accumulation_steps(runner_config, data_parallel: int, log=print) -> int:
    """Micro-batches per optimizer step. With runner_config.global_batch_size set, as many as keep that global
    batch on this many data-parallel ranks (MindFormers' recipes state batch_size per device and ran on 8), so the
    loss curve does not depend on the device count; else runner_config.gradient_accumulation_steps."""
    rc = runner_config
    if rc.global_batch_size is None:
        return rc.gradient_accumulation_steps
    per_pass = rc.batch_size * data_parallel
    steps, rest = divmod(rc.global_batch_size, per_pass)
    if rest or steps < 1:
        raise ValueError(f"runner_config.global_batch_size {rc.global_batch_size} is not a multiple of batch_size "
                         f"{rc.batch_size} x {data_parallel} data-parallel rank(s) = {per_pass}: change one of them")
    if rc.gradient_accumulation_steps not in (1, steps):
        raise ValueError(f"runner_config.gradient_accumulation_steps {rc.gradient_accumulation_steps} contradicts "
                         f"global_batch_size {rc.global_batch_size} (= batch_size {rc.batch_size} x {data_parallel} "
                         f"rank(s) x {steps}): set one of them")
    log(f"global batch {rc.global_batch_size} = batch_size {rc.batch_size} x {data_parallel} data-parallel rank(s) "
        f"x {steps} gradient accumulation step(s)")
    return steps


def last_logged_loss(metrics_path: str) -> float | None:
    """The newest loss in metrics.jsonl: the final loss of a resumed run that had nothing left to train."""
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path, encoding="utf-8") as f:
        losses = [json.loads(line).get("loss") for line in f if line.strip()]
    return next((loss for loss in reversed(losses) if loss is not None), None)


def configure_speed(base, recipe, dist, device: torch.device, log):
    """Speed settings that keep the numbers: TF32 for what stays fp32 on CUDA, and the chunked head +
    cross-entropy (runner_config.loss_chunk_size) where the head is not split by tensor / pipeline parallel."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    chunk = recipe.runner_config.loss_chunk_size
    if chunk and hasattr(base, "lm_head"):
        if dist.parallel and (dist.pc.model_parallel > 1 or dist.pc.pipeline_stage > 1):
            log("note: runner_config.loss_chunk_size is ignored under tensor / pipeline parallel")
        else:
            base.loss_chunk_size = chunk


def _layout(pc) -> str:
    return (f"data_parallel {pc.data_parallel} x model_parallel {pc.model_parallel} x pipeline_stage "
            f"{pc.pipeline_stage}" + (", optimizer_shard" if pc.optimizer_shard else ""))


def _begin_run(recipe, output_dir: str, fresh: bool):
    """The run's first writes, once everything has been checked: a fresh run removes all an earlier run wrote
    (its checkpoints, metrics, events, final/: they would mix with this run's), then the resolved recipe."""
    from .recipe import dump_recipe
    if fresh:
        rundir.clear_run_outputs(output_dir)
    ckpt.remove_stale_temporaries(ckpt.checkpoint_root(output_dir))
    dump_recipe(recipe, os.path.join(output_dir, "recipe.yaml"))


def _warn(text: str):
    print(text, file=sys.stderr, flush=True)


def _resume_path(recipe, root: str, overwrite: bool, output_dir: str, log) -> str | None:
    """The checkpoint to resume from (None: a fresh run), or a one-line error. Changes nothing on disk:
    clearing an earlier run waits until the whole run has been validated (_begin_run)."""
    resume = recipe.resume_training
    if resume and resume != "auto":
        path = resolve_path(resume)
        ckpt.verify_checkpoint(path)  # an explicit path must be good: CheckpointError otherwise
        _check_same_start(recipe, path)
        return path
    if resume == "auto":
        path = ckpt.find_resume_checkpoint(root, report=_warn)
        if path is None:
            found = ckpt.list_checkpoints(root)
            if found and not overwrite:  # resuming was asked for: do not silently start over on top of them
                raise ckpt.CheckpointError(f"--resume auto found {len(found)} checkpoint(s) in {root} but none is "
                                           f"complete and intact; delete them, or pass --overwrite_output_dir "
                                           f"to start over")
            log(f"no complete checkpoint in {root}: starting from step 0")
        else:
            _check_same_start(recipe, path)
        return path
    if rundir.holds_a_run(output_dir) and not overwrite:
        raise ValueError(f"{output_dir} already holds a training run: pass --resume auto to continue it, "
                         f"--overwrite_output_dir to start over, or another --output_dir")
    return None


def _check_same_start(recipe, path: str):
    """A resumed run continues from the weights it started from: a LoRA checkpoint holds only adapters, so
    another --load_checkpoint would silently pair them with a different base."""
    started = ckpt.read_manifest(path).get("meta", {}).get("load_checkpoint") or ""
    now = recipe.load_checkpoint or ""
    if started and now and os.path.abspath(resolve_path(started)) != os.path.abspath(resolve_path(now)):
        raise ValueError(f"the run in {os.path.dirname(os.path.dirname(path))} started from {started}, not {now}: "
                         f"resume with --load_checkpoint {started}, or start a new run in another --output_dir")


def _base_model(model):
    """Our GPT-2 module under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _trainable(model) -> int:
    """Trainable parameters, without the internal vocab padding rows (as num_parameters counts)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = _base_model(model)
    wte = base.transformer.wte.weight
    if wte.requires_grad:
        n -= (base.config.padded_vocab_size - base.config.vocab_size) * base.config.n_embd
    return n


def export_final(model, recipe, output_dir: str, lora: bool) -> str:
    """OUTPUT_DIR/final/: HF-format config.json + model.safetensors + generation_config.json (the recipe's
    generation defaults) + tokenizer files; for LoRA runs also final/adapter/ (PEFT files naming the base
    model), and the merged weights in final/ itself."""
    from ..tokenizer import default_tokenizer_dir, load_tokenizer, save_tokenizer
    from .lora import merge_adapter, save_adapter
    from .recipe import generation_settings

    final_dir = os.path.join(output_dir, "final")
    if lora:
        adapter_dir = os.path.join(output_dir, "final.adapter.tmp")
        shutil.rmtree(adapter_dir, ignore_errors=True)
        save_adapter(model, adapter_dir, adapter_base_name(recipe))
        model = merge_adapter(model)
    if hasattr(model, "generation_config"):
        model.generation_config = generation_settings(recipe, model.config)
    model.save_pretrained(final_dir)
    if lora:
        target = os.path.join(final_dir, "adapter")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(adapter_dir, target)
    tokenizer_dir = resolve_path(recipe.tokenizer) or default_tokenizer_dir()
    with contextlib.suppress(FileNotFoundError):
        save_tokenizer(load_tokenizer(tokenizer_dir), final_dir, source_dir=tokenizer_dir)
    return final_dir


def adapter_base_name(recipe) -> str | None:
    """What an exported adapter names as its base: the run's load_checkpoint (the continued adapter's own
    base when it was an adapter), as an absolute path, or a hub id as given; None for a run from scratch."""
    from .lora import adapter_base
    source = resolve_path(recipe.load_checkpoint)
    if not source:
        return None
    if continues_adapter(recipe):
        return adapter_base(source)
    return os.path.abspath(source) if os.path.exists(source) else source
