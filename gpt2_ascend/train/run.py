"""A training run assembled from a TrainJob, in named steps:

    start            the launcher's choices (accelerate's precision, data parallel over the world: launcher.py), the
                     device, or torchrun's process group and mesh (one device: every degree 1)
    prepare_output   lock OUTPUT_DIR and decide where to start (nothing on disk changes yet)
    check_inputs     every input read and checked from its small files (start weights, data paths, tokenizer) and
                     the training memory budgeted, before anything expensive (tokenizing, building the model)
    load_data        the datasets (files, `datasets` sources or in memory), as the model's keyword arguments
    build_model      build or load the model (on the meta device when large), parallelize it (one device: compile)
    build_trainer    loader, schedule, optimizer, checkpointer and Trainer; resume; the report_to trackers
    train            the loop, under the signal handlers
    finish           export OUTPUT_DIR/final/ (HF format), the last evaluation, loss curve and summary.json

`run_training(recipe_or_job)` is what train.py and a notebook call. Under torchrun every rank runs it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

import torch

from .. import checkpoints as ckpt
from .. import device as dev
from ..budget import parameter_count
from ..config import GenerationConfig
from ..data.loader import StepLoader, checked_columns, model_inputs
from ..fileio import write_json
from ..loading import inspect_model, load_model, recipe_shape
from ..lora import unwrap_model
from ..model import model_class
from ..parallel.mesh import vocab_multiple
from ..parallel.parallelize import ParallelDims, ParallelModel, init_parallel, parallelize
from . import rundir
from .checkpoint import FileCheckpointer, ShardedCheckpointer
from .interrupt import Interrupted, StopOnSignal, TrainingInterrupted
from .job import DataSplit, ModelSpec, TrainJob, job_from_recipe, resolve_path
from .metrics import MetricsLogger, flops_per_token, peak_flops, plot_loss_curve
from .launcher import apply_launcher
from .optim import build_optimizer
from .trackers import open_trackers, require_trackers
from .trainer import Trainer, seed_everything

# Parameters above this are built on the meta device and materialised already sharded (torchrun).
META_INIT_PARAMS = 2_000_000_000


def run_training(recipe_or_job, overwrite: bool = False, log=print) -> dict:
    """Train: build from the job (or a recipe: job_from_recipe), resume, train, evaluate, export final/. Returns a
    summary dict (also written to OUTPUT_DIR/summary.json); with output_dir None, nothing is written and the
    summary holds the metrics (`history`). Under torchrun with use_parallel every rank runs this; the other ranks
    return {}.

    The output directory is locked for the whole run (a second run into it fails at once, naming this one's
    pid), and nothing in it changes until the data, model, layout and resume point have all been checked.
    SIGINT / SIGTERM in the loop stop after the step with a checkpoint (TrainingInterrupted). overwrite: start over
    in an output directory that holds an earlier run."""
    job = recipe_or_job if isinstance(recipe_or_job, TrainJob) else job_from_recipe(recipe_or_job)
    with contextlib.ExitStack() as scope:  # the lock and the signal handlers, released however it ends
        job, dims, stop, log = start(job, scope, log)
        resume_path = prepare_output(job, dims, overwrite, scope, log)
        check_inputs(job, dims)
        seed_everything(job.seed, dims.device)
        train_data, eval_data = load_data(job, dims)
        pm, model, train_data, eval_data = build_model(job, dims, train_data, eval_data, log)
        trainer, metrics = build_trainer(job, pm, model, train_data, eval_data, resume_path, log)
        last, seconds, start_step = train(job, trainer, metrics, stop)
        return finish(job, trainer, metrics, last, seconds, start_step)


# ---------------------------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------------------------
def start(job: TrainJob, scope: contextlib.ExitStack, log):
    """(the job with the launcher's choices, ParallelDims, the signal handlers, the log: silent on ranks other than
    0), after the job's checks."""
    if job.run_mode in ("predict", "eval"):
        function = "predict_recipe" if job.run_mode == "predict" else "evaluate_recipe"
        raise ValueError(f"run_mode {job.run_mode} is not training: run train.py --run_mode {job.run_mode}, or "
                         f"call gpt2_ascend.train.run_modes.{function}(recipe)")
    if job.run_mode == "finetune" and not (isinstance(job.model, ModelSpec) and job.model.load_checkpoint):
        raise ValueError(f"run_mode finetune starts from trained weights: pass {job.names.load_checkpoint} PATH (an "
                         f"HF-format GPT-2 directory or a MindFormers .ckpt) or use {job.names.run_mode_train}")
    check_trackers(job)
    job = apply_launcher(job, log=log)
    dims = init_dims(job)
    stop = scope.enter_context(StopOnSignal(notify=None if dims.is_main else (lambda text: None)))
    if dims.distributed and not dims.is_main:
        log = lambda *a, **k: None  # noqa: E731 - rank 0 speaks for the run
    if job.compile:
        dev.require_compile_backend(dims.device.type)  # before any data or model work
    return job, dims, stop, log


def check_trackers(job: TrainJob):
    """report_to's trackers are known and installed, and have an output_dir to write in (one line, before anything
    changes). TensorBoard, the default, is skipped without one."""
    require_trackers(job.report_to)
    needs_dir = [name for name in job.report_to if name in ("wandb", "mlflow")]
    if needs_dir and job.output_dir is None:
        raise ValueError(f"report_to names {needs_dir[0]}, whose files go in the run's {job.names.output_dir}: pass "
                         f"one, or drop {needs_dir[0]} from report_to")


def init_dims(job: TrainJob) -> ParallelDims:
    """One process (every degree 1), or torchrun's process group and mesh when the launcher started more (WORLD_SIZE;
    a job without a layout is data parallel over them: apply_launcher); a layout that does not fit is one line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pc, names = job.parallel, job.names
    if not job.use_parallel and world > 1:  # (apply_launcher made such a job data parallel)
        raise ValueError(f"WORLD_SIZE is {world} but use_parallel is false: pass {names.use_parallel}, or run one "
                         f"process")
    if not job.use_parallel or world == 1:
        if job.use_parallel and pc.devices > 1:
            raise ValueError(f"the parallel section asks for {pc.devices} devices ({pc.describe(shard=False)}) but "
                             f"this is one process: launch with torchrun --nproc_per_node {pc.devices}, or set "
                             f"{names.no_parallel}")
        device = dev.resolve_device(job.device)
        dev.set_device(device)
        return ParallelDims.single(device)
    check_layout(job, world)
    return init_parallel(pc, job.device)


def check_layout(job: TrainJob, world: int):
    pc, config = job.parallel, model_shape(job)
    pc.validate(world_size=world, n_head=config.n_head, n_layer=config.n_layer)
    if pc.pipeline_stage > 1 and job.batch_size % pc.micro_batch_num:
        raise ValueError(f"runner_config.batch_size {job.batch_size} does not split into parallel.micro_batch_num="
                         f"{pc.micro_batch_num} equal micro-batches: make it a multiple")
    lora = isinstance(job.model, ModelSpec) and job.model.lora is not None
    if lora and (pc.model_parallel > 1 or pc.pipeline_stage > 1 or pc.uses_fsdp):
        raise ValueError("LoRA with tensor / pipeline parallel or optimizer_shard is not supported: use "
                         "data_parallel only (DDP), or one device")


def model_shape(job: TrainJob):
    """The job's model config: the spec's (a fresh model's; a loaded one keeps its checkpoint's), or the object's."""
    return job.model.config if isinstance(job.model, ModelSpec) else unwrap_model(job.model).config


def seq_length(job: TrainJob) -> int:
    return job.model.seq_length if isinstance(job.model, ModelSpec) else model_shape(job).n_positions


# ---------------------------------------------------------------------------------------------
# prepare_output
# ---------------------------------------------------------------------------------------------
def prepare_output(job: TrainJob, dims: ParallelDims, overwrite: bool, scope: contextlib.ExitStack, log):
    """The checkpoint to resume from (None: a fresh run). Rank 0 locks OUTPUT_DIR and decides, changing nothing;
    the other ranks follow."""
    if job.output_dir is None:
        if job.resume:
            raise ValueError(f"resuming needs the run's {job.names.output_dir}: pass the directory it wrote")
        return None

    def prepare():
        scope.enter_context(rundir.OutputDirLock(job.output_dir))
        return resume_point(job, overwrite, log)
    return dims.on_main(prepare)


def resume_point(job: TrainJob, overwrite: bool, log) -> str | None:
    """The checkpoint to resume from (None: start at step 0), or a one-line error, by the state of OUTPUT_DIR
    (rundir.run_state: empty, started, finished; the table is in docs/reliability.md). A directory that holds a run
    is never started over without overwrite, and no input that the run would delete or replace is used. Changes
    nothing on disk: clearing an earlier run waits until the whole run has been validated (begin_run)."""
    names, out, resume = job.names, job.output_dir, job.resume
    state = rundir.run_state(out)
    if resume and resume != "auto":
        path = resolve_path(resume)
        ckpt.verify_checkpoint(path)  # an explicit path must be good: CheckpointError otherwise
        check_same_start(job, path)
        if state.kind != "empty" and not continues_this_run(job, path) and not overwrite:
            raise ValueError(f"{out} holds {state}, and {path} is a checkpoint of another run: pass "
                             f"{names.overwrite} to replace the run in {out} by its continuation, or another "
                             f"{names.output_dir}")
    elif resume == "auto":
        path = ckpt.find_resume_checkpoint(ckpt.checkpoint_root(out), report=_warn)
        if path is not None:
            check_same_start(job, path)
        elif state.kind != "empty" and not overwrite:  # resuming was asked for: never silently start over
            raise ckpt.CheckpointError(f"{names.resume_auto} has nothing to resume in {out}: it holds {state} but "
                                       f"{rundir.describe_checkpoints(out)}; pass {names.overwrite} to start it again "
                                       f"from step 0, or another {names.output_dir}")
        else:
            log(f"no complete checkpoint in {ckpt.checkpoint_root(out)}: starting from step 0")
    else:
        path = None
        if state.kind != "empty" and not overwrite:
            raise ValueError(f"{out} already holds a training run: pass {names.resume_auto} to continue it, "
                             f"{names.overwrite} to start over, or another {names.output_dir}; it holds {state}")
    refuse_inputs_inside_outputs(job, keep=path, clearing=state.kind != "empty" and clears_outputs(job, path))
    return path


def clears_outputs(job: TrainJob, resume_path: str | None) -> bool:
    """Whether the run deletes what an earlier run wrote into OUTPUT_DIR before its first write (begin_run): when it
    starts at step 0, or continues a checkpoint of another run there (both need overwrite over a run)."""
    return resume_path is None or not continues_this_run(job, resume_path)


def continues_this_run(job: TrainJob, path: str) -> bool:
    """A checkpoint of the run in OUTPUT_DIR itself (in its checkpoint/, followed where it is a symlink)."""
    root = os.path.realpath(ckpt.checkpoint_root(job.output_dir))
    return os.path.realpath(path).startswith(root + os.sep)


def run_inputs(job: TrainJob) -> list[tuple[str, str]]:
    """(how the error names it, path) of every file or folder the run reads: start weights (and an adapter's base),
    data files, tokenizer, data cache, resume checkpoint."""
    names, found = job.names, []
    if isinstance(job.model, ModelSpec) and job.model.source:
        found.append((names.load_checkpoint, job.model.source))
        if continues_adapter(job.model.source):
            from ..lora import adapter_base
            found.append((f"the base model of the adapter {job.model.source}", adapter_base(job.model.source)))
    for what, split in (("the training data", job.train_data), ("the evaluation data", job.eval_data)):
        if isinstance(split, DataSplit) and isinstance(split.path, str):
            found.append((what, resolve_path(split.path)))
    found += [("tokenizer", resolve_path(job.tokenizer)), ("data_cache_dir", resolve_path(job.data_cache_dir))]
    if job.resume and job.resume != "auto":
        found.append(("the checkpoint to resume", resolve_path(job.resume)))
    return [(what, path) for what, path in found if path and os.path.exists(path)]


def refuse_inputs_inside_outputs(job: TrainJob, keep: str | None, clearing: bool):
    """No input may lie inside OUTPUT_DIR's run outputs (checkpoint/, final/, ...): this run deletes them first
    (clearing: starting over with overwrite) or replaces them as it goes (final/ at the end, old checkpoints
    pruned), and a LoRA run would lose its base model. keep: the checkpoint this run resumes (its own, by design)."""
    out = job.output_dir
    for what, path in run_inputs(job):
        name = rundir.output_holding(path, out)
        if name is None or (keep and os.path.realpath(path) == os.path.realpath(keep)):
            continue
        fate = f"which {job.names.overwrite} deletes before this run starts" if clearing else \
            "which this run replaces as it goes"
        raise ValueError(f"{what} {path} lies inside {os.path.join(out, name)}, {fate}: copy it out of {out} "
                         f"first, or pass another {job.names.output_dir}")


def check_same_start(job: TrainJob, path: str):
    """A resumed run continues from the weights it started from: a LoRA checkpoint holds only adapters, so
    other start weights would silently pair them with a different base."""
    started = ckpt.read_manifest(path).get("meta", {}).get("load_checkpoint") or ""
    now = job.model.load_checkpoint if isinstance(job.model, ModelSpec) else ""
    if started and now and os.path.abspath(resolve_path(started)) != os.path.abspath(resolve_path(now)):
        raise ValueError(f"the run in {os.path.dirname(os.path.dirname(path))} started from {started}, not {now}: "
                         f"resume with {job.names.load_checkpoint} {started}, or start a new run in another "
                         f"{job.names.output_dir}")


def _warn(text: str):
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# check_inputs
# ---------------------------------------------------------------------------------------------
def check_inputs(job: TrainJob, dims: ParallelDims):
    """Every input the run reads, checked before anything expensive (tokenizing the data, building or loading the
    model): the start weights from their small files (loading.inspect_model: present, of a known kind, whole, their
    shape; seq_length within their context), the data paths, the tokenizer of raw data, and the training memory.
    Rank 0 checks, and its error is every rank's."""
    def check():
        if isinstance(job.model, ModelSpec):
            config = start_config(job.model, build_overrides(job, dims))
            if job.model.seq_length > config.n_positions:
                raise ValueError(f"model_config.seq_length {job.model.seq_length} exceeds the model's n_positions "
                                 f"{config.n_positions} ({job.model.source or 'model_config'}): set "
                                 f"model.model_config.seq_length={config.n_positions}")
        raw = False
        for what, split in (("training data", job.train_data), ("evaluation data", job.eval_data)):
            if isinstance(split, DataSplit) and isinstance(split.path, str):
                from ..data import hf_datasets
                if not hf_datasets.is_datasets_source(split.path):
                    fetch_if_missing(split.path)
                raw = raw or not split.path.endswith((".npy", ".npz"))
        if raw or job.tokenizer:
            from ..data.tokenizer import check_tokenizer
            check_tokenizer(job.tokenizer or None)
        require_training_memory(job, dims, build_overrides(job, dims))
    dims.on_main(check)


def build_overrides(job: TrainJob, dims: ParallelDims) -> dict:
    """Config fields the layout sets on the model a run builds: a distributed run's vocab padding."""
    if not dims.distributed:
        return {}
    return dict(pad_vocab_size_multiple=vocab_multiple(dims.pc, model_shape(job).pad_vocab_size_multiple))


# ---------------------------------------------------------------------------------------------
# load_data
# ---------------------------------------------------------------------------------------------
def load_data(job: TrainJob, dims: ParallelDims):
    """(training data, evaluation data or None): token blocks of seq_length + 1 (train) and seq_length (eval) for a
    language model, input_ids / attention_mask / labels for a classifier. Rank 0 prepares (and caches) raw files
    first, the other ranks then read its cache."""
    if job.train_data is None:
        raise ValueError(f"no training data: pass {job.names.train_data} (a prepared .npy / .npz, a raw "
                         f"wiki.*.tokens / .txt / .tsv file, or a datasets source)")
    if dims.distributed and not dims.is_main:
        dims.barrier()
    train_data = read_split(job, job.train_data, training=True)
    eval_data = read_split(job, job.eval_data, default_split="validation")
    if dims.distributed and dims.is_main:
        dims.barrier()
    return train_data, eval_data


def read_split(job: TrainJob, split, training: bool = False, default_split: str = "train"):
    """A DataSplit read from its file or `datasets` source as the job's head reads data (data/sources.load_examples:
    seq_length tokens a row, one more for a language model's training) (its first max_samples rows; default_split:
    the split of a hub id or DatasetDict that names none); a datasets object as DataSplit(it) (or its columns when it
    is already tokenized); other in-memory data as it is."""
    from ..data import hf_datasets
    if hf_datasets.is_datasets_object(split):
        columns = hf_datasets.token_columns(split)
        split = DataSplit(split) if columns is None else columns
    if not isinstance(split, DataSplit):
        return split
    from ..data.sources import load_examples
    path = split.path if hf_datasets.is_datasets_source(split.path) else fetch_if_missing(split.path)
    data = load_examples(model_class(job.architecture).examples, path, seq_length(job), training,
                         tokenizer=job.tokenizer or None, cache_dir=data_cache(job),
                         dataset_name=split.dataset_name, mindformers_compat=split.mindformers_compat,
                         text_column=split.text_column, label_column=split.label_column,
                         text_format=split.text_format, split=split.split or default_split, num_proc=split.num_proc)
    return first_rows(data, split.max_samples)


def data_cache(job: TrainJob) -> str | None:
    """Where raw data prepared on the fly is cached: data_cache_dir, else OUTPUT_DIR/data_cache (never the working
    directory); none for an in-memory run without an output_dir."""
    return job.data_cache_dir or (os.path.join(job.output_dir, "data_cache") if job.output_dir else None)


def fetch_if_missing(path: str) -> str:
    """A missing file of the data directory (GPT2_DATA_DIR) is downloaded, checksum-verified; any other
    missing path is an error."""
    if not path or os.path.exists(path):
        return path
    from ..data.download import dataset_path, default_data_dir
    root = os.path.abspath(default_data_dir())
    if os.path.abspath(path).startswith(root + os.sep):
        return dataset_path(os.path.relpath(os.path.abspath(path), root), root=root)
    raise FileNotFoundError(f"dataset not found: {path}")


def first_rows(data, n: int | None):
    if data is None or n is None:
        return data
    if isinstance(data, dict):
        return {k: v[:n] for k, v in data.items()}
    return data[:n]


def check_data(data, model, what: str) -> dict:
    """The data's columns, checked against the model once up front (data/loader.checked_columns: integers, ids in
    its vocabulary, labels in its classes, 0/1 masks, no row without a token); a bad id would otherwise fail deep
    inside the embedding lookup, a -100 silently drop out of the loss."""
    base = unwrap_model(model)
    return checked_columns(data, base.config.vocab_size, getattr(base, "num_labels", None), what)


# ---------------------------------------------------------------------------------------------
# build_model
# ---------------------------------------------------------------------------------------------
def build_model(job: TrainJob, dims: ParallelDims, train_data, eval_data, log):
    """(ParallelModel, the model as built: a PEFT wrapper for LoRA runs, and the data's columns checked against it:
    check_data). (Its training memory was budgeted by check_inputs, before the data.) Distributed
    runs build on the CPU and parallelize moves this rank's part to its device; above META_INIT_PARAMS (or with
    meta_init) they build on the meta device and each rank allocates and fills only its shards."""
    overrides = build_overrides(job, dims)
    fill = None
    if dims.distributed and isinstance(job.model, ModelSpec) and use_meta_init(job, overrides):
        from ..parallel.materialize import filler
        model, source = build_meta_model(job.model, overrides, log)
        fill = filler(model.config, dims.device, source)
    elif isinstance(job.model, ModelSpec):
        model = model_from_spec(job.model, torch.device("cpu") if dims.distributed else dims.device, log, overrides)
    else:
        model = job.model.to(dims.device)
    base = unwrap_model(model)
    configure_speed(base, job, dims, log)
    train_data = check_data(train_data, model, "training data")
    eval_data = None if eval_data is None else check_data(eval_data, model, "evaluation data")
    pm = parallelize(model, dims, compile=job.compile, compile_scope=job.compile_scope, per_head=not uses_lora(job),
                     fill=fill)
    return pm, model, train_data, eval_data


def model_from_spec(spec: ModelSpec, device: torch.device, log=print, config_overrides: dict | None = None):
    """The model a spec asks for, on `device`: from scratch, or load_checkpoint's weights through loading.load_model
    (any source it takes; a PEFT adapter directory or a MindFormers LoRA .ckpt goes on training its adapters), with
    LoRA adapters when spec.lora says so."""
    from ..lora import apply_lora
    if spec.source:
        model = load_model(spec.source, spec.architecture, dtype=torch.float32, new_head=True, keep_adapters=True,
                           **source_arguments(spec, config_overrides))
        report_source(spec, model, log)
    else:
        model = model_class(spec.architecture)(spec.config.replace(**(config_overrides or {})))
    base = unwrap_model(model)
    if spec.seq_length > base.config.n_positions:
        raise ValueError(f"model_config.seq_length {spec.seq_length} exceeds the model's n_positions "
                         f"{base.config.n_positions}: set model.model_config.seq_length={base.config.n_positions}")
    base.set_recompute(spec.recompute)
    if spec.lora and not hasattr(model, "peft_config"):  # (an adapter directory or a LoRA .ckpt brings its own)
        model = apply_lora(model, **dataclasses.asdict(spec.lora))
    return model.to(device)


def source_arguments(spec: ModelSpec, config_overrides: dict | None = None) -> dict:
    """load_model's / inspect_model's arguments for a spec's load_checkpoint, besides the path: the config fields the
    run sets (dropout, labels, ...), a distributed checkpoint's strategy, what a .ckpt does not store (the heads: the
    recipe's, loading.recipe_shape) and a MindFormers LoRA .ckpt's alpha and dropout (the recipe's pet_config)."""
    config = spec.config
    shape = spec.shape or recipe_shape(config.n_embd, config.n_head, config.activation, "ModelSpec.config")
    lora = dict(lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout) if spec.lora else {}
    return dict(overrides=dict(spec.overrides, **(config_overrides or {})), strategy=spec.strategy or None,
                shape=shape, **lora)


def report_source(spec: ModelSpec, model, log):
    """What a run starting from a checkpoint should know: a continued adapter and its base, a MindFormers LoRA
    checkpoint's adapters, a shape that is the checkpoint's rather than the recipe's."""
    base = unwrap_model(model)
    if continues_adapter(spec.source):
        log(f"continuing the adapter in {spec.source} on its base model {base.name_or_path}")
    if hasattr(model, "lora_layout"):
        rank, targets = model.lora_layout
        log(f"LoRA adapters from {spec.source}: rank {rank} on {', '.join(targets)} (alpha {spec.lora.alpha:g} from "
            f"the recipe)")
    want, have = spec.config, base.config
    if (want.n_layer, want.n_embd, want.n_head, want.vocab_size) != (have.n_layer, have.n_embd, have.n_head,
                                                                      have.vocab_size):
        log(f"note: the model shape comes from {spec.source} ({have.n_layer} layers, hidden {have.n_embd}, "
            f"{have.n_head} heads, vocab {have.vocab_size}), not from the recipe's model_config")


def require_source(source: str):
    """A load_checkpoint path that is not there, named as the recipe key (a hub id is left to the loader)."""
    if not os.path.exists(source) and (source.startswith((".", "/", "~")) or source.count("/") > 1
                                       or source.endswith(".ckpt")):
        raise FileNotFoundError(f"load_checkpoint not found: {source}; pass an HF-format GPT-2 directory, "
                                f"OUTPUT_DIR/checkpoint/step_N or a MindFormers .ckpt file")


def continues_adapter(source: str) -> bool:
    """load_checkpoint is a PEFT adapter directory (ours or one trained on transformers' GPT-2): a LoRA run."""
    from ..lora import is_adapter_dir
    return bool(source) and os.path.isdir(source) and is_adapter_dir(source)


def uses_lora(job: TrainJob) -> bool:
    if isinstance(job.model, ModelSpec):
        return job.model.lora is not None or continues_adapter(job.model.source)
    return hasattr(job.model, "peft_config")


def use_meta_init(job: TrainJob, overrides: dict) -> bool:
    """meta_init, or automatically for models above META_INIT_PARAMS."""
    if job.meta_init is not None:
        return job.meta_init
    return parameter_count(start_config(job.model, overrides)) > META_INIT_PARAMS


def start_config(spec: ModelSpec, overrides: dict | None = None):
    """The config of the model a spec builds, read without any weight: the spec's own for a fresh model, or its
    load_checkpoint's (loading.inspect_model: every source, checked as it will be loaded)."""
    if not spec.source:
        return spec.config.replace(**(overrides or {}))
    require_source(spec.source)
    return inspect_model(spec.source, spec.architecture, new_head=True, **source_arguments(spec, overrides))


def require_training_memory(job: TrainJob, dims: ParallelDims, overrides: dict):
    """Before the model is built: what training it certainly holds on this rank's device (weights, gradients and
    AdamW's two moments, 16 bytes a parameter, + the 16-bit copies of mixed precision: parallel/memory.py's estimate
    for the layout, activations left out) fits that device's free memory, and its whole fp32 weights fit the CPU's,
    where it is built first (unless on the meta device). LoRA runs train adapters only: the loader and apply_lora
    budget theirs. MemoryBudgetError, one line, otherwise."""
    if not isinstance(job.model, ModelSpec) or uses_lora(job):
        return
    config = start_config(job.model, overrides)
    from ..budget import model_bytes, require_memory, shape_of
    from ..parallel.memory import GIB, estimate
    precision = job.settings.precision
    plan = estimate(config, dims.pc, job.batch_size, seq_length(job), precision)
    nbytes = int((plan["model_states_gib"] + plan["weight_copies_gib"]) * GIB)
    per_device = " per device" if dims.distributed else ""
    what = (f"training the model ({shape_of(config)}: {plan['params_per_device']:,.0f} parameters{per_device} x 16 "
            f"bytes of weights, gradients and AdamW states{' + 16-bit copies' if precision != 'fp32' else ''})")
    fix = "use a smaller model, a device with more memory, or split it over devices (parallel.optimizer_shard, " \
          "model_parallel, pipeline_stage)"
    require_memory(nbytes, what, dims.device, fix)
    if not (dims.distributed and use_meta_init(job, overrides)):
        require_memory(model_bytes(config, 4), f"building the model ({shape_of(config)}) in fp32", "cpu", fix)


def build_meta_model(spec: ModelSpec, overrides: dict, log):
    """The module tree on the meta device and where its weights will come from (None: a fresh init)."""
    if spec.lora is not None:
        raise ValueError("LoRA runs build the whole model on each rank: set parallel.meta_init=false")
    config = start_config(spec, overrides)
    with dev.on_meta_device():
        model = model_class(spec.architecture)(config)
    model.set_recompute(spec.recompute)
    log(f"building on the meta device ({'from ' + spec.source if spec.source else 'fresh init'}): each rank "
        f"allocates only its shards")
    return model, spec.source or None


def configure_speed(base, job: TrainJob, dims: ParallelDims, log):
    """Speed settings that keep the numbers: TF32 for what stays fp32 on CUDA, and the chunked head +
    cross-entropy (loss_chunk_size) where the head is not split by tensor / pipeline parallel."""
    if dims.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if job.loss_chunk_size:  # (read by a language model's head alone)
        if dims.pc.model_parallel > 1 or dims.pc.pipeline_stage > 1:
            log("note: runner_config.loss_chunk_size is ignored under tensor / pipeline parallel")
        else:
            base.config.loss_chunk_size = job.loss_chunk_size


# ---------------------------------------------------------------------------------------------
# build_trainer
# ---------------------------------------------------------------------------------------------
def build_trainer(job: TrainJob, pm: ParallelModel, model, train_data, eval_data, resume_path: str | None, log):
    """The Trainer (resumed from resume_path) and the metrics logger (rank 0); the run's first writes to
    OUTPUT_DIR (clearing an earlier run, recipe.yaml) happen here, once everything has been checked."""
    dims, base = pm.dims, unwrap_model(model)
    accumulation = accumulation_steps(job, dims.world_size, log)
    loader = StepLoader(model_inputs(train_data, base.examples), batch_size=job.batch_size,
                        micro_batches=accumulation, shuffle=job.shuffle, seed=job.seed, rank=dims.rank,
                        world_size=dims.world_size, pin_memory=dims.device.type == "cuda")
    run_steps = job.max_steps or loader.steps_per_epoch * job.epochs
    schedule = job.optimizer.schedule(loader.steps_per_epoch, job.epochs, job.max_steps)
    opt = job.optimizer
    optimizer = build_optimizer(pm.core, schedule(0), betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                weight_decay=opt.weight_decay, device_type=dims.device.type, update_rule=opt.rule)
    settings = dataclasses.replace(job.settings, total_steps=run_steps, step_rule=opt.rule,
                                   progress=job.settings.progress and dims.is_main)
    trained_rows = run_steps * job.batch_size * accumulation * dims.world_size
    evaluator = make_evaluator(job, eval_data, dims, settings.precision, trained_rows, settings.progress, log)
    trainer = Trainer(pm.module, optimizer, schedule, loader, dims.device, settings, parallel=pm, log=log,
                      evaluate=evaluator, checkpointer=make_checkpointer(job, dims, base))
    if resume_path:
        trainer.load_checkpoint(resume_path)
        log(f"resumed from {resume_path} (step {trainer.step})")
        if trainer.step > run_steps:  # a model cannot be un-trained: say so before anything is written
            raise ValueError(f"{resume_path} is at step {trainer.step}, past max_steps {run_steps}: pass a larger "
                             f"{job.names.max_steps} to continue it, or start a new run in another "
                             f"{job.names.output_dir}")
        if trainer.step == run_steps:
            log(f"the run is already at step {run_steps} of {run_steps}: nothing left to train")
    if job.output_dir is not None:  # everything is checked: only now does OUTPUT_DIR change (on rank 0)
        dims.on_main(lambda: begin_run(job, fresh=clears_outputs(job, resume_path)))
    layout = f" on {dims.global_world} processes ({dims.pc.describe()})" if dims.distributed else ""
    log(f"training {base.num_parameters():,} parameters ({_trainable(model):,} trainable) on "
        f"{dev.device_name(dims.device)} ({settings.precision}){layout}: "
        f"{steps_in_words(run_steps, job.batch_size, accumulation, dims.world_size, loader.steps_per_epoch)}")
    metrics = None
    if dims.is_main:
        fpt = flops_per_token(base.num_parameters(), base.config.n_layer, base.config.n_embd, seq_length(job))
        trackers = open_trackers(job.report_to, job.output_dir, run_config(job), resumed=bool(resume_path),
                                 start_step=trainer.step, log=log) if job.output_dir is not None else []
        metrics = MetricsLogger(job.output_dir, trainer.step, run_steps, resumed=bool(resume_path),
                                progress=settings.progress, flops_per_token=fpt,
                                peak=peak_flops(dev.device_name(dims.device), settings.precision), trackers=trackers)
    return trainer, metrics


def run_config(job: TrainJob) -> dict:
    """What the trackers record as the run's config: the resolved recipe it came from, or a job built in Python's
    own settings (its plain fields, the loop's and the optimizer's)."""
    if job.recipe is not None:
        return job.recipe
    plain = (str, int, float, bool, type(None))
    config = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)
              if isinstance(getattr(job, f.name), plain) and f.name != "recipe"}
    return dict(config, architecture=job.architecture, settings=dataclasses.asdict(job.settings),
                optimizer=dataclasses.asdict(job.optimizer), parallel=dataclasses.asdict(job.parallel),
                report_to=list(job.report_to))


def accumulation_steps(job: TrainJob, data_parallel: int, log=print) -> int:
    """Micro-batches per optimizer step. With global_batch_size set, as many as keep that global batch on this many
    data-parallel ranks (MindFormers' recipes state batch_size per device and ran on 8), so the loss curve does not
    depend on the device count; else gradient_accumulation_steps."""
    if job.global_batch_size is None:
        return job.gradient_accumulation_steps
    per_pass = job.batch_size * data_parallel
    steps, rest = divmod(job.global_batch_size, per_pass)
    if rest or steps < 1:
        raise ValueError(f"runner_config.global_batch_size {job.global_batch_size} is not a multiple of batch_size "
                         f"{job.batch_size} x {data_parallel} data-parallel rank(s) = {per_pass}: change one of them")
    if job.gradient_accumulation_steps not in (1, steps):
        raise ValueError(f"runner_config.gradient_accumulation_steps {job.gradient_accumulation_steps} contradicts "
                         f"global_batch_size {job.global_batch_size} (= batch_size {job.batch_size} x "
                         f"{data_parallel} rank(s) x {steps}): set one of them")
    log(f"global batch {job.global_batch_size} = batch_size {job.batch_size} x {data_parallel} data-parallel rank(s) "
        f"x {steps} gradient accumulation step(s)")
    return steps


def make_evaluator(job: TrainJob, eval_data, dims: ParallelDims, precision: str, trained_rows: int,
                   progress: bool, log=print):
    """A callable (model, stop) -> the numbers a run records of its evaluations (the head's metric: eval.runner's
    evaluate and METRICS), or None without evaluation data. Bounded: eval_max_batches batches at most; a run that
    max_steps ends evaluates at most the rows it trains on (max_steps x the global batch) unless the eval data sets
    its max_samples (eval_dataset.max_samples) or eval_max_batches is set. Precision: eval_precision, else the run's
    on GPU / NPU and fp32 on the CPU (evaluate.py's auto). A bar while it runs (progress), and stop(), polled after
    each batch, ends it at a signal (eval.EvaluationStopped, which the trainer turns into a stop after the step)."""
    if eval_data is None:
        return None
    from ..eval.runner import evaluate, metric_of
    batch_size = job.eval_batch_size or job.batch_size
    rows = len(eval_data["input_ids"])  # (columns: check_data)
    limit = eval_rows(job, rows, batch_size, trained_rows)
    metric = metric_of(model_class(job.architecture))
    precision = job.eval_precision or ("fp32" if dims.device.type == "cpu" else precision)
    bound = f" ({eval_bound_reason(job)})" if limit < rows else ""
    log(f"evaluations read {limit} of the {rows} evaluation rows in {precision}{bound}")

    def evaluate_run(model, stop=None) -> dict:
        result = evaluate(model, eval_data, batch_size, precision, max_samples=limit, stop=stop,
                          progress=dict(desc="eval", leave=False) if progress else False)
        return {key: result[key] for key in metric.logged}
    return evaluate_run


def eval_rows(job: TrainJob, rows: int, batch_size: int, trained_rows: int) -> int:
    """How many evaluation rows each of a run's evaluations reads (the rule: make_evaluator)."""
    if job.eval_max_batches is not None:
        return min(rows, job.eval_max_batches * batch_size)
    asked = isinstance(job.eval_data, DataSplit) and job.eval_data.max_samples is not None
    if job.max_steps is None or asked:
        return rows
    return min(rows, trained_rows)


def eval_bound_reason(job: TrainJob) -> str:
    names = job.names
    if job.eval_max_batches is not None:
        return f"{names.eval_max_batches} {job.eval_max_batches}"
    return (f"a run that {names.max_steps} ends evaluates at most the rows it trains on: set {names.eval_max_samples} "
            f"or {names.eval_max_batches} to read more")


def make_checkpointer(job: TrainJob, dims: ParallelDims, base):
    """Where the Trainer's checkpoints go (None without an output_dir): one process's files, or torchrun's shards."""
    if job.output_dir is None:
        return None
    lora = uses_lora(job)
    load_checkpoint = job.model.load_checkpoint if isinstance(job.model, ModelSpec) else ""
    meta = dict(prefix=job.checkpoint_prefix, lora=bool(lora), load_checkpoint=load_checkpoint,
                architecture=base.hf_architecture)
    model_config = base.config.to_hf_dict(base.hf_architecture)
    if not dims.distributed:
        return FileCheckpointer(job.output_dir, job.keep_checkpoints, meta, json_files={"config.json": model_config})
    model_meta = dict(model_config=model_config, architecture=base.hf_architecture,
                      qkv_layout="hf" if lora else "per_head", lora=bool(lora))
    return ShardedCheckpointer(job.output_dir, dims, job.keep_checkpoints, meta, model_meta)


def begin_run(job: TrainJob, fresh: bool):
    """The run's first writes, once everything has been checked: a fresh run removes all an earlier run wrote
    (its checkpoints, metrics, events, final/: they would mix with this run's), then the resolved recipe."""
    if fresh:
        rundir.clear_run_outputs(job.output_dir)
    ckpt.remove_stale_temporaries(ckpt.checkpoint_root(job.output_dir))
    if job.recipe is not None:
        from .recipe import dump_recipe
        dump_recipe(job.recipe, os.path.join(job.output_dir, "recipe.yaml"))


def steps_in_words(steps: int, batch_size: int, accumulation: int, replicas: int, steps_per_epoch: int) -> str:
    """What one optimizer step reads, each factor named: the training line is read by people who never saw a
    recipe ("200 steps of 8 x 1 x 1 rows" left them guessing)."""
    sequences = batch_size * accumulation * replicas
    plural = "s" if replicas != 1 else ""
    return (f"{steps} steps of {sequences} sequences each (batch_size {batch_size} x gradient accumulation "
            f"{accumulation} x {replicas} data-parallel replica{plural}), {steps_per_epoch} steps per epoch")


def _trainable(model) -> int:
    """Trainable parameters, without the internal vocab padding rows (as num_parameters counts) or the entries of a
    fused q / v adapter that stay zero (lora.mask_to_parts): MindFormers' count."""
    n = sum(getattr(p, "trained_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    base = unwrap_model(model)
    wte = base.transformer.wte.weight
    if wte.requires_grad:
        n -= (base.config.padded_vocab_size - base.config.vocab_size) * base.config.n_embd
    return n


# ---------------------------------------------------------------------------------------------
# train and finish
# ---------------------------------------------------------------------------------------------
def train(job: TrainJob, trainer: Trainer, metrics, stop: StopOnSignal):
    """The loop; a signal in it stops after its step, with a checkpoint (TrainingInterrupted)."""
    start_time, start_step = time.perf_counter(), trainer.step
    trainer.stop, stop.graceful = stop, True  # a signal now stops the loop after its step
    try:
        last = trainer.train(metrics)
    finally:
        stop.graceful = False
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - start_time
    if trainer.checkpointer is not None and trainer.last_saved_step != trainer.step:
        trainer.save_checkpoint()
    signum = trainer.stopped_by or (0 if trainer.dims.distributed else stop.signum)  # ranks stop where they agreed
    if signum and trainer.checkpointer is None:
        raise Interrupted(signum)
    if signum:
        raise TrainingInterrupted(signum, trainer.step, trainer.checkpointer.path(trainer.step))
    return last, seconds, start_step


def finish(job: TrainJob, trainer: Trainer, metrics, last: dict, seconds: float, start_step: int) -> dict:
    """OUTPUT_DIR/final/ (HF format, + the adapter of a LoRA run), the final evaluation, the loss curve and
    summary.json; rank 0 returns the summary, the others {}."""
    dims = trainer.dims
    final_dir = None
    if job.output_dir is not None and dims.distributed:
        final_dir = dims.on_main(lambda: export_final(final_model(job, trainer), job, lora=uses_lora(job)))
        if trainer.evaluate_fn is not None and trainer.pipelined and dims.is_main:
            evaluate_final(trainer, final_dir)  # a pipeline stage cannot run the whole model
    if trainer.evaluate_fn is not None and (trainer.last_eval is None or trainer.last_eval["step"] != trainer.step):
        trainer.evaluate()
    if not dims.is_main:
        dims.barrier()
        return {}
    summary = dict(steps=trainer.step, steps_this_run=trainer.step - start_step, seconds=round(seconds, 2))
    if job.output_dir is None:  # the Python API's in-memory run: the metrics come back, nothing is written
        summary.update(final_loss=last.get("loss"), history=metrics.records,
                       device=dev.device_name(dims.device), precision=trainer.settings.precision)
        summary.update({f"eval_{k}": v for k, v in (trainer.last_eval or {}).items() if k != "step"})
        dims.barrier()  # the other ranks wait here for rank 0
        return summary
    curve = plot_loss_curve(metrics.path, os.path.join(job.output_dir, "loss_curve.png"))
    if not dims.distributed:
        final_dir = export_final(trainer.raw_model, job, lora=uses_lora(job))
    final_loss = last["loss"] if "loss" in last else last_logged_loss(metrics.path)  # nothing left to train
    summary.update(final_loss=final_loss, final=final_dir, loss_curve=curve, metrics=metrics.path,
                   device=dev.device_name(dims.device), precision=trainer.settings.precision)
    if trainer.last_eval is not None:
        summary.update({f"eval_{k}": v for k, v in trainer.last_eval.items() if k != "step"})
    write_json(summary, os.path.join(job.output_dir, "summary.json"))
    dims.barrier()
    return summary


def final_model(job: TrainJob, trainer: Trainer):
    """Rank 0's whole model at the end of a torchrun run: the adapted model itself (LoRA runs are data parallel
    only), else gathered from the run's last sharded checkpoint (any layout), without the run's vocab padding."""
    if uses_lora(job):
        return trainer.raw_model
    from ..loading import load_model
    return load_model(trainer.checkpointer.path(trainer.step), overrides=dict(pad_vocab_size_multiple=1))


def export_final(model, job: TrainJob, lora: bool) -> str:
    """OUTPUT_DIR/final/: HF-format config.json + model.safetensors + generation_config.json (the job's generation
    defaults) + tokenizer files; for LoRA runs also final/adapter/ (PEFT files naming the base model), and the
    merged weights in final/ itself."""
    from ..data.tokenizer import copy_tokenizer, default_tokenizer_dir
    from ..lora import merge_adapter, save_adapter
    final_dir = os.path.join(job.output_dir, "final")
    if lora:
        adapter_dir = os.path.join(job.output_dir, "final.adapter.tmp")
        shutil.rmtree(adapter_dir, ignore_errors=True)
        save_adapter(model, adapter_dir, adapter_base_name(job))
        model = merge_adapter(model)
    if hasattr(model, "generation_config") and job.generation:
        model.generation_config = generation_defaults(job.generation, model.config)
    model.save_pretrained(final_dir)
    if lora:
        target = os.path.join(final_dir, "adapter")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(adapter_dir, target)
    with contextlib.suppress(FileNotFoundError):  # a run without tokenizer files exports the weights alone
        copy_tokenizer(job.tokenizer or default_tokenizer_dir(), final_dir, model.config.n_positions)
    return final_dir


def generation_defaults(generation: dict, config) -> GenerationConfig:
    """A job's generation settings as the generation_config.json written with the export. The length
    (max_decode_length) is not written, as transformers writes none for GPT-2: a max_length in the file made every
    transformers generate(max_new_tokens=...) on the folder warn that both are set. The recipe's length still drives
    run_mode predict and generate.py --config."""
    g = {k: v for k, v in generation.items() if k != "max_decode_length"}
    return GenerationConfig.from_model_config(config, **g)


def adapter_base_name(job: TrainJob) -> str | None:
    """What an exported adapter names as its base: the run's load_checkpoint (the continued adapter's own
    base when it was an adapter), as an absolute path, or a hub id as given; None for a run from scratch."""
    from ..lora import adapter_base
    source = job.model.source if isinstance(job.model, ModelSpec) else ""
    if not source:
        return getattr(unwrap_model(job.model), "name_or_path", None) if not isinstance(job.model, ModelSpec) \
            else None
    if continues_adapter(source):
        return adapter_base(source)
    return os.path.abspath(source) if os.path.exists(source) else source


def evaluate_final(trainer: Trainer, final_dir: str):
    """Rank 0 evaluates the exported model (pipeline runs, whose stages cannot run it whole)."""
    from ..loading import load_model
    model = load_model(final_dir, trainer.raw_model.hf_architecture, device=trainer.device)
    result = trainer.evaluate_fn(model)
    trainer.last_eval = dict(step=trainer.step, **result)


def last_logged_loss(metrics_path: str) -> float | None:
    """The newest loss in metrics.jsonl: the final loss of a resumed run that had nothing left to train."""
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path, encoding="utf-8") as f:
        losses = [json.loads(line).get("loss") for line in f if line.strip()]
    return next((loss for loss in reversed(losses) if loss is not None), None)
