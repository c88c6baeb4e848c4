"""The trainer: one optimizer step at a time, metrics, periodic evaluation, checkpoints, exact resume.

`Trainer` holds the loop and knows nothing about recipes or command lines: give it a model, an optimizer, an
LRSchedule and a StepLoader (whose batches are the model's keyword arguments: the model computes its own loss).
One device and many are the same loop: a ParallelModel (parallel/parallelize.py) brings the pipeline schedule,
the tied head of a pipeline and the process groups; with every degree 1 there are none. A Checkpointer
(train/checkpoint.py) saves and restores it. train/run.py assembles all of it from a TrainJob.

The step is written so an accelerator never waits on the host: `train_step` does the micro-batches,
autocast, loss scaling, clipping, optimizer and schedule without reading a value back; its losses stay
device tensors until `flush` turns every `log_interval` steps of them into metrics.jsonl lines at once.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoints as ckpt
from .. import device as dev
from ..data.loader import StepLoader
from ..eval.perplexity import EvaluationStopped
from ..parallel.clip import clip_by_global_norm, clip_grad_norm
from ..parallel.parallelize import ParallelDims, ParallelModel
from ..parallel.pipeline import pipeline_step
from .interrupt import StopOnSignal, signal_name
from .metrics import MetricsLogger
from .optim import LRSchedule, set_lr


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite loss, too many overflowing steps); the message is one line."""


@dataclass
class TrainSettings:
    """The loop's settings. total_steps None: one pass over the data per epoch (the job's epochs)."""
    total_steps: int | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 adds dynamic loss scaling)
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    # torch | mindspore: the clipping formula (parallel.clip.clip_coefficient) and, for fp16, whether the loss scale
    # stays >= 1 as MindSpore's DynamicLossScaleUpdateCell keeps it. Recipes naming MindFormers' optimizers use
    # mindspore.
    step_rule: str = "torch"
    log_interval: int = 10
    save_steps: int | None = None
    eval_interval: int | None = None
    loss_scale: float = 2.0 ** 32
    scale_factor: float = 2.0
    scale_window: int = 1000
    loss_scale_fixed: bool = False  # MindSpore's FixedLossScaleUpdateCell: overflows skip the step, the scale stays
    max_consecutive_skips: int = 100
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model, optimizer, schedule: LRSchedule, loader: StepLoader, device: torch.device,
                 settings: TrainSettings, *, evaluate=None, raw_model=None, log=print,
                 parallel: ParallelModel | None = None, checkpointer=None):
        """model: what runs the step (compiled / wrapped); raw_model: the bare model, saved and evaluated
        (default: model). parallel: the ParallelModel the step runs through (its module and core are then model
        and raw_model). evaluate: model -> dict of metrics. checkpointer: FileCheckpointer / ShardedCheckpointer
        (None: no checkpoints)."""
        if parallel is not None:
            model, raw_model = parallel.module, parallel.core
        self.parallel = parallel
        self.dims = parallel.dims if parallel is not None else ParallelDims.single(device)
        self.model = model  # what runs the step (compiled / wrapped)
        self.raw_model = raw_model if raw_model is not None else model  # what is saved and evaluated
        self.optimizer = optimizer
        self.schedule = schedule
        self.loader = loader
        self.device = device
        self.settings = settings
        self.checkpointer = checkpointer
        self.evaluate_fn = evaluate
        self.log = log
        self.amp_dtype = dev.autocast_dtype(device, settings.precision)
        self.scaler = None
        if settings.precision == "fp16":  # distributed: every rank must agree on an overflow (found_inf all-reduced)
            self.scaler = dev.grad_scaler(device.type, sharded=self.dims.distributed, init_scale=settings.loss_scale,
                                          growth_factor=settings.scale_factor,
                                          backoff_factor=1.0 / settings.scale_factor,
                                          growth_interval=settings.scale_window)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.step = 0  # steps run (batches consumed), what max_steps and checkpoints count
        self.updates = 0  # updates applied (an fp16 overflow skips one), what the lr schedule counts
        optimizer.register_step_post_hook(self._count_update)
        self.consecutive_skips = 0
        self.pending: list[dict] = []
        self.last_eval: dict | None = None
        self.last_saved_step: int | None = None  # (every checkpoint saved holds finite values only)
        self._finite_at: int | None = None  # the step whose state was last found finite
        self.metrics: MetricsLogger | None = None
        self.stop: StopOnSignal | None = None  # run_training's signal handlers: polled after each step
        self.stopped_by = 0  # the signal the loop stopped for (0: it ran to total_steps)
        self._interval_start = time.perf_counter()

    @property
    def pipelined(self) -> bool:
        return self.parallel is not None and self.parallel.pipelined

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
            self.scaler.update(self.settings.loss_scale if self.settings.loss_scale_fixed else None)
            if self.settings.step_rule == "mindspore":
                keep_loss_scale_at_least_one(self.scaler)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return out

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Accumulate the gradients of the step's micro-batches (through the pipeline schedule when there is
        one); returns their mean loss, over data-parallel ranks too (a device tensor, on every rank)."""
        n = len(micro_batches)
        total_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if self.pipelined:
                total_loss += self.pipeline_loss(batch).detach() / n
                continue
            with self.no_sync(i < n - 1), dev.autocast(self.device, self.amp_dtype):
                loss = self.compute_loss(batch) / n
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total_loss += loss.detach()
        if self.pipelined:  # each schedule step summed its pipeline micro-batches: average over all of them
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(n * self.dims.pc.micro_batch_num)
        if self.parallel is not None and self.parallel.tied is not None:
            self.parallel.tied()
        if self.dims.pc.data_parallel > 1:
            dist.all_reduce(total_loss, op=dist.ReduceOp.SUM, group=self.dims.dp_group)
            total_loss /= self.dims.pc.data_parallel
        return total_loss

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """The batch is the model's keyword arguments (input_ids and targets, or input_ids, attention_mask and
        labels): the model computes its own loss."""
        return self.model(**batch).loss

    def pipeline_loss(self, batch: dict) -> torch.Tensor:
        if self.scaler is not None:
            raise ValueError("fp16 loss scaling with pipeline_stage > 1 is not supported: use bf16")
        target = batch["labels"] if "labels" in batch else batch["targets"]
        with dev.autocast(self.device, self.amp_dtype):  # the schedule runs the forward in this thread
            return pipeline_step(self.parallel.schedule, self.parallel.core, batch["input_ids"], target,
                                 batch.get("attention_mask"), self.dims.pp_group)

    def no_sync(self, skip: bool):
        """DDP: reduce gradients once per optimizer step, not per micro-batch."""
        if skip and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor:
        """The total gradient norm, after clipping to max_grad_norm (when set) by the step rule's formula; under
        torchrun one norm over shards (DTensor placements) and pipeline stages, a tied head's copy counted once."""
        s = self.settings
        if not self.dims.distributed:
            return clip_by_global_norm(self.params, s.max_grad_norm, s.step_rule)
        tied = self.parallel.tied if self.parallel is not None else None
        return clip_grad_norm(self.params, s.max_grad_norm or 0.0, self.dims.pp_group,
                              tied.duplicates if tied is not None else (), rule=s.step_rule)

    def _count_update(self, optimizer, args, kwargs):
        self.updates += 1

    def tokens_per_step(self, micro_batches: list[dict]) -> int:
        ids = micro_batches[0]["input_ids"]
        return len(micro_batches) * ids.size(0) * ids.size(1)

    # ---- the run ----
    @property
    def total_steps(self) -> int:
        """settings.total_steps, or one epoch of the loader's data."""
        return self.settings.total_steps or self.loader.steps_per_epoch

    def train(self, metrics: MetricsLogger | None = None) -> dict:
        """Run until total_steps; returns the last step record."""
        self.metrics = metrics
        s = self.settings
        total_steps = self.total_steps
        self._interval_start = time.perf_counter()
        last = None
        try:
            while self.step < total_steps:
                micro_batches = next(self.loader)
                lr = self.schedule(self.updates)
                out = self.train_step(micro_batches)
                self.pending.append(dict(step=self.step, lr=lr, tokens=self.tokens_per_step(micro_batches),
                                         epoch=self.step / self.loader.steps_per_epoch, out=out))
                if metrics is not None:
                    metrics.advance()
                at_end = self.step == total_steps
                self.stopped_by = 0 if at_end else self.stop_signal()
                do_eval = self.evaluate_fn is not None and not self.stopped_by and (
                    at_end or (s.eval_interval and self.step % s.eval_interval == 0))
                do_save = self.checkpointer is not None and (
                    at_end or self.stopped_by or (s.save_steps and self.step % s.save_steps == 0))
                if do_eval or do_save or at_end or self.stopped_by or self.step % s.log_interval == 0:
                    records = self.flush()
                    problem = self.divergence(records)
                    if problem:
                        self._write(records)
                        raise TrainingStopped(problem)
                    if do_eval:
                        records[-1].update(self.evaluate())  # a signal during it: stopped_by, the step is saved
                    self._write(records)
                    last = records[-1]
                    if do_save or (self.stopped_by and self.checkpointer is not None):
                        self.save_checkpoint()
                    self._interval_start = time.perf_counter()  # eval / save time is not training time
                if self.stopped_by:
                    break
            self.require_finite_state()  # the run's result (an in-memory run has no checkpoint that checks it)
        finally:
            if self.pending:  # an exception mid-interval: keep what was measured
                try:
                    self._write(self.flush())
                except Exception:
                    pass
        return last or {}

    def stop_signal(self) -> int:
        """The signal (SIGINT / SIGTERM) that asked the run to stop after this step, else 0. Under torchrun a signal
        reaches the ranks at different moments: they all stop after the first step at which any of them had one (a
        CPU all-reduce per step, so the device is not waited for)."""
        local = self.stop.signum if self.stop is not None else 0
        if not self.dims.distributed or self.stop is None:  # (no handlers on any rank: the Python API)
            return local
        flag = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group())
        return int(flag.item())

    def _cpu_group(self):
        if not hasattr(self, "_gloo_group"):  # created on every rank at the same (first) step
            self._gloo_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._gloo_group

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
        """Run the evaluation callback; its numbers go into the step's record as eval_*. (A pipeline stage cannot
        run the whole model: run.py evaluates the merged final model instead.) A signal during it is honoured as
        between steps: the evaluation ends after its batch, unrecorded, and the loop stops after this step
        (stopped_by), saving it; the ranks of a torchrun run agree after each batch (stop_signal)."""
        if self.pipelined:
            return {}
        try:
            result = self.evaluate_fn(self.raw_model, stop=self.stop_signal if self.stop is not None else None)
        except EvaluationStopped as e:
            self.stopped_by = e.signum
            self.log(f"evaluation stopped after {e.done} of {e.total} batches ({signal_name(e.signum)}): not recorded")
            return {}
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
        """Save this step, if its weights and optimizer states are finite (else TrainingStopped: no checkpoint
        is ever written with a NaN / inf, so the last one saved is a good one)."""
        self.require_finite_state()
        path = self.checkpointer.save(self)
        self.last_saved_step = self.step
        return path

    def load_checkpoint(self, path: str):
        """Continue from a checkpoint directory (the checkpointer's kind): weights, optimizer, loop state."""
        self.checkpointer.load(self, path)
        problem = self.nonfinite_state()
        if problem:
            raise ckpt.CheckpointError(f"checkpoint {path} holds non-finite values ({problem}): it was written by a "
                                       f"run that diverged; resume from an older checkpoint (--resume PATH)")
        self._finite_at = self.step

    # ---- finite weights ----
    def require_finite_state(self):
        """TrainingStopped when a weight or optimizer state holds NaN / inf (a learning rate, weight decay or clip
        norm that overflowed the update): the run ends here and nothing is written with them."""
        if self._finite_at == self.step:
            return
        problem = self.nonfinite_state()
        if problem:
            raise TrainingStopped(f"the model's weights or optimizer states became non-finite by step {self.step} "
                                  f"({problem}): training stopped and no checkpoint or final/ was written with them"
                                  f"{self._last_good()}; lower the learning rate, or check weight_decay and "
                                  f"max_grad_norm")
        self._finite_at = self.step

    def nonfinite_state(self) -> str | None:
        """Which parameter or optimizer state holds NaN / inf (on this rank; under torchrun any rank's counts, so
        every rank gives the same verdict), else None. One pass over the tensors and one read back."""
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        tensors = [(n, p) for n, p in self.raw_model.named_parameters()]
        tensors += [(f"{key} of {names.get(id(p), 'a parameter')}", value) for p, state in self.optimizer.state.items()
                    for key, value in state.items() if isinstance(value, torch.Tensor) and value.is_floating_point()]
        local = [t.to_local() if hasattr(t, "to_local") else t for _, t in tensors]
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in local]) if local else torch.ones(0, dtype=torch.bool)
        bad = (~finite).sum()
        if self.dims.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.SUM)
        if int(bad) == 0:
            return None
        first = next((i for i, ok in enumerate(finite.tolist()) if not ok), None)
        if first is None:
            return "on another rank"
        name, value = tensors[first][0], local[first]
        return f"{name} holds {'NaN' if bool(torch.isnan(value).any()) else 'inf'}"


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
