"""A training job: everything a run needs, typed and resolved, and nothing about where it came from.

    recipe (YAML, recipe.py) --job_from_recipe--> TrainJob --run.run_training--> Trainer (trainer.py) -> model

A TrainJob is frozen dataclasses: the model to build or load (ModelSpec, or a model object a notebook holds), the
data (DataSplit: a file, a `datasets` source or object; or arrays / tensors / a Dataset in memory), the loop's
TrainSettings, the optimizer and its schedule, the batch, the ParallelConfig, the trackers (report_to), and where
outputs go. Paths are resolved here ($GPT2_DATA_DIR, ~).
Below run.py nothing reads a recipe.

    job = TrainJob(model=GPT2LMHeadModel(GPT2Config.from_preset("tiny")), train_data=blocks, batch_size=8,
                   settings=TrainSettings(total_steps=100), optimizer=OptimizerSettings(learning_rate=1e-3))
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

from ..config import GPT2Config
from ..loading import recipe_shape
from ..model import LANGUAGE_MODEL
from ..parallel.mesh import ParallelConfig
from ..schema import Key, check_fields, parse
from .optim import UPDATE_RULES, LRSchedule, resolve_total_steps, warmup_of
from .recipe import COMPUTE_DTYPES, SCHEDULE_TYPES, SCHEMA
from .trainer import TrainSettings


@dataclass(frozen=True)
class ArgumentNames:
    """How an error names what to change: Python's keywords (the default), or train.py's flags (commands/train.py
    passes its own)."""
    overwrite: str = "overwrite=True"
    resume_auto: str = "resume='auto'"
    output_dir: str = "output_dir"
    max_steps: str = "settings.total_steps"
    load_checkpoint: str = "ModelSpec(load_checkpoint=...)"
    train_data: str = "train_data"
    use_parallel: str = "use_parallel=True"
    no_parallel: str = "use_parallel=False"
    run_mode_train: str = "run_mode='train'"
    precision: str = "TrainSettings(precision='{precision}')"  # formatted with precision (fp16) and dtype (float16)
    device_cpu: str = "device='cpu'"
    eval_max_samples: str = "DataSplit(max_samples=...)"
    eval_max_batches: str = "eval_max_batches"


PYTHON_NAMES = ArgumentNames()
# a recipe run from Python: its keys (overwrite is run_training's argument)
RECIPE_NAMES = ArgumentNames(resume_auto="resume_training=auto", max_steps="runner_config.max_steps",
                             load_checkpoint="load_checkpoint", train_data="train_dataset.data_loader.dataset_dir",
                             use_parallel="use_parallel=true", no_parallel="use_parallel=false",
                             run_mode_train="run_mode=train", precision="model.model_config.compute_dtype={dtype}",
                             device_cpu="device=cpu", eval_max_samples="eval_dataset.max_samples",
                             eval_max_batches="eval_dataset.max_batches")


# ---------------------------------------------------------------------------------------------
# what the Python API's settings accept: the recipe's own Keys (one definition of every range), named as Python names
# them (bad value inf for 'learning_rate' in OptimizerSettings: expected a finite number > 0)
# ---------------------------------------------------------------------------------------------
def recipe_key(dotted: str, **changes) -> Key:
    """The Key of a recipe key (lr_schedule.learning_rate), with some settings changed (nullable for a None)."""
    node = SCHEMA
    for part in dotted.split("."):
        node = node[part]
    return node.but(**changes) if changes else node


def python_keys(fields: dict) -> dict:
    """{field: Key} from {field: recipe key, or a Key of its own}."""
    return {name: spec if isinstance(spec, Key) else recipe_key(spec) for name, spec in fields.items()}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.1
    target_modules: tuple = ("c_attn",)

    def __post_init__(self):
        check_fields(self, LORA_KEYS, "LoraSettings")


@dataclass(frozen=True)
class ModelSpec:
    """The model a run builds: a fresh one of `config`, or the weights of `load_checkpoint` (an HF directory or hub
    id, a training checkpoint, a PEFT adapter directory, a MindFormers .ckpt or distributed checkpoint with its
    `strategy`), whose shape is then the checkpoint's
    and whose other config fields are `overrides` (dropout, labels, the attention kernel, a new head's init)."""
    architecture: str = LANGUAGE_MODEL
    config: GPT2Config = field(default_factory=GPT2Config)
    load_checkpoint: str = ""  # as given (recorded in checkpoints); `source` is the resolved path
    strategy: str = ""  # a MindFormers distributed load_checkpoint's strategy (src_strategy_path_or_dir)
    overrides: dict = field(default_factory=dict)
    # what a MindSpore load_checkpoint does not store, its heads and activation (loading.load_model's shape); empty:
    # config's, for a checkpoint of config's width
    shape: dict = field(default_factory=dict)
    seq_length: int = 1024
    lora: LoraSettings | None = None
    recompute: str = "none"  # none | full | selective

    def __post_init__(self):
        check_fields(self, MODEL_KEYS, "ModelSpec")

    @property
    def source(self) -> str:
        return resolve_path(self.load_checkpoint)


@dataclass(frozen=True)
class DataSplit:
    """A dataset: a prepared .npy / .npz, a raw wiki.*.tokens / .txt / .tsv / .csv prepared on the fly, or a
    `datasets` source (a save_to_disk folder, .parquet / .jsonl / .csv / .arrow files, a hub id NAME:CONFIG:SPLIT, or
    a datasets.Dataset / DatasetDict object) tokenized on the fly (data/hf_datasets.py; the fields below `max_samples`
    apply to those only)."""
    path: object  # a path or hub id (str), or a datasets.Dataset / DatasetDict
    dataset_name: str = "sst_2"  # a raw text-classification file's layout (data/txtcls.py)
    mindformers_compat: bool = False
    max_samples: int | None = None  # use the first N rows
    text_column: str | None = None  # None: text (language modelling) / sentence (classification)
    label_column: str | None = None  # None: label
    text_format: str = "auto"  # wikitext | text | auto (wikitext when the first row is a " = Heading = ")
    split: str | None = None  # of a hub id or DatasetDict; None: train for training data, validation for evaluation
    num_proc: int | None = None  # processes that tokenize (Dataset.map num_proc)

    def __post_init__(self):
        check_fields(self, DATA_KEYS, "DataSplit")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW (torch's update) or MindFormers' AdamWeightDecay names (MindSpore's: train/optim.py UPDATE_RULES),
    and the learning-rate schedule (schedule_steps -1: the run's length)."""
    type: str = "AdamW"
    learning_rate: float = 1e-4
    lr_end: float = 1e-5
    lr_schedule: str = "polynomial"  # polynomial | cosine | constant
    warmup_steps: int = 0
    warmup_lr_init: float = 0.0
    power: float = 1.0
    schedule_steps: int = -1
    warmup_ratio: float | None = None  # replaces warmup_steps: int(total * ratio)
    num_cycles: float = 0.5  # cosine
    decay_steps: int | None = None
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self):
        check_fields(self, OPTIMIZER_KEYS, "OptimizerSettings")

    @property
    def rule(self) -> str:
        if self.type not in UPDATE_RULES:
            raise ValueError(f"unknown optimizer type {self.type!r}: use one of {', '.join(UPDATE_RULES)}")
        return UPDATE_RULES[self.type]

    def schedule(self, steps_per_epoch: int, epochs: int, max_steps: int | None) -> LRSchedule:
        total = resolve_total_steps(self.schedule_steps, steps_per_epoch, epochs, max_steps or -1)
        return LRSchedule(type=self.lr_schedule, learning_rate=self.learning_rate, lr_end=self.lr_end,
                          warmup_steps=warmup_of(self.warmup_steps, self.warmup_ratio, total), total_steps=total,
                          power=self.power, warmup_lr_init=self.warmup_lr_init, num_cycles=self.num_cycles,
                          decay_steps=self.decay_steps)


@dataclass(frozen=True)
class TrainJob:
    """One training run. model: a ModelSpec, or a model object (trained in place). train_data / eval_data: a
    DataSplit (a file or a `datasets` source), or in memory: token blocks (rows of T+1 tokens, a numpy array or torch
    tensor) for a language model, input_ids / attention_mask / labels (a dict of arrays, or a Dataset of such dicts)
    for a classifier, or a datasets.Dataset / DatasetDict of text (tokenized as DataSplit(dataset) is; one that
    already has an input_ids column is used as it is).
    output_dir None: no checkpoints, no export, metrics kept in memory (the summary's `history`), no trackers."""
    model: ModelSpec | torch.nn.Module = field(default_factory=ModelSpec)
    train_data: object = None
    eval_data: object = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    batch_size: int = 8  # per device and micro-batch
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None  # rows per optimizer step on all devices: sets the accumulation
    epochs: int = 1
    shuffle: bool = True
    eval_batch_size: int | None = None  # None: batch_size
    # the run's evaluations: at most eval_max_batches batches (None: all; in a run that max_steps ends and whose
    # eval_data sets no max_samples, at most the rows it trains on), at eval_precision (None: the run's precision on
    # GPU / NPU, fp32 on the CPU)
    eval_max_batches: int | None = None
    eval_precision: str | None = None
    seed: int = 0
    device: str = "auto"
    output_dir: str | None = None
    resume: str | bool = False  # "auto" (the newest complete checkpoint in output_dir) or a checkpoint path
    keep_checkpoints: int = 3
    checkpoint_prefix: str = "gpt2"
    tokenizer: str = ""  # for raw data files and the export ("": the data directory's GPT-2 tokenizer)
    data_cache_dir: str = ""  # raw data prepared on the fly is cached here ("": OUTPUT_DIR/data_cache)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    use_parallel: bool = False
    meta_init: bool | None = None  # build on the meta device (None: above META_INIT_PARAMS parameters)
    compile: bool = False
    compile_scope: str = "model"  # model | blocks
    loss_chunk_size: int = 0  # the chunked LM head + cross-entropy (GPT2Config.loss_chunk_size)
    generation: dict = field(default_factory=dict)  # the export's generation_config.json (GenerationConfig fields)
    run_mode: str = "train"
    report_to: tuple = ("tensorboard",)  # experiment trackers: tensorboard, wandb, mlflow (train/trackers.py); () none
    recipe: dict | None = None  # the resolved recipe it came from, written as OUTPUT_DIR/recipe.yaml
    names: ArgumentNames = PYTHON_NAMES

    def __post_init__(self):
        check_fields(self, JOB_KEYS, "TrainJob")
        check_fields(self.settings, SETTINGS_KEYS, "TrainSettings")  # (trainer.py's dataclass, checked here)
        parse(self.generation, GENERATION_KEYS, "TrainJob(generation=...)", defaults=False)

    @property
    def architecture(self) -> str:
        return self.model.architecture if isinstance(self.model, ModelSpec) else self.model.hf_architecture

    @property
    def max_steps(self) -> int | None:
        return self.settings.total_steps


PYTHON_STEPS = Key(None, "int", minimum=1, nullable=True)  # None: the data's length (a recipe's -1)
LORA_KEYS = python_keys(dict(rank="model.model_config.pet_config.lora_rank",
                             alpha="model.model_config.pet_config.lora_alpha",
                             dropout="model.model_config.pet_config.lora_dropout"))
OPTIMIZER_KEYS = python_keys(dict(
    type="optimizer.type", learning_rate="lr_schedule.learning_rate", lr_end="lr_schedule.lr_end",
    lr_schedule=Key("polynomial", "choice", tuple(dict.fromkeys(SCHEDULE_TYPES.values()))),
    warmup_steps="lr_schedule.warmup_steps", warmup_lr_init="lr_schedule.warmup_lr_init", power="lr_schedule.power",
    schedule_steps="lr_schedule.total_steps", warmup_ratio="lr_schedule.warmup_ratio",
    num_cycles="lr_schedule.num_cycles", decay_steps="lr_schedule.decay_steps", beta1="optimizer.beta1",
    beta2="optimizer.beta2", eps="optimizer.eps", weight_decay="optimizer.weight_decay"))
SETTINGS_KEYS = python_keys(dict(
    total_steps=PYTHON_STEPS, precision=Key("fp32", "choice", ("fp32", "bf16", "fp16")),
    max_grad_norm=recipe_key("runner_wrapper.max_grad_norm", nullable=True),  # None: no clipping
    step_rule=Key("torch", "choice", tuple(dict.fromkeys(UPDATE_RULES.values()))),
    log_interval="callbacks.MFLossMonitor.per_print_times",
    save_steps=recipe_key("callbacks.CheckpointMonitor.save_checkpoint_steps", nullable=True),
    eval_interval=recipe_key("eval_step_interval", nullable=True),
    loss_scale="runner_wrapper.scale_sense.loss_scale_value", scale_factor="runner_wrapper.scale_sense.scale_factor",
    scale_window="runner_wrapper.scale_sense.scale_window", max_consecutive_skips="runner_wrapper.max_consecutive_skips",
    progress="runner_config.progress_bar"))
JOB_KEYS = python_keys(dict(
    batch_size="runner_config.batch_size", gradient_accumulation_steps="runner_config.gradient_accumulation_steps",
    global_batch_size="runner_config.global_batch_size", epochs="runner_config.epochs",
    shuffle="train_dataset.data_loader.shuffle", eval_batch_size="eval_dataset.batch_size",
    eval_max_batches="eval_dataset.max_batches",
    eval_precision=Key(None, "choice", ("fp32", "bf16", "fp16"), nullable=True), seed="seed",
    keep_checkpoints="callbacks.CheckpointMonitor.keep_checkpoint_max", use_parallel="use_parallel",
    meta_init="parallel.meta_init", compile="runner_config.compile", compile_scope="runner_config.compile_scope",
    loss_chunk_size="runner_config.loss_chunk_size", run_mode="run_mode"))
MODEL_KEYS = python_keys(dict(seq_length="model.model_config.seq_length", recompute="parallel.recompute"))
DATA_KEYS = python_keys(dict(max_samples="train_dataset.max_samples", num_proc="preprocessing_num_workers"))
GENERATION_KEYS = python_keys(dict(  # the export's generation_config.json, under the recipe's names
    do_sample="model.model_config.do_sample", temperature="model.model_config.temperature",
    top_k="model.model_config.top_k", top_p="model.model_config.top_p",
    repetition_penalty="model.model_config.repetition_penalty",
    max_decode_length="model.model_config.max_decode_length"))


def resolve_path(path: str) -> str:
    """Expand ~ and environment variables; $GPT2_DATA_DIR defaults to the data directory, $GPT2_CACHE to the cache
    home (data/download.py: cache_home)."""
    if not path:
        return ""
    from ..data.download import cache_home, default_data_dir
    for name, default in (("GPT2_DATA_DIR", default_data_dir), ("GPT2_CACHE", cache_home)):
        for form in ("${" + name + "}", "$" + name):
            if form in path:
                path = path.replace(form, default())
    return os.path.expanduser(os.path.expandvars(path))


# ---------------------------------------------------------------------------------------------
# from a recipe
# ---------------------------------------------------------------------------------------------
def job_from_recipe(recipe, names: ArgumentNames = RECIPE_NAMES) -> TrainJob:
    """The TrainJob a MindFormers-style recipe (recipe.load_recipe) describes; its errors name the recipe's keys
    (train.py passes its flags as `names`)."""
    from .recipe import generation_config, gpt2_config, lora_settings, precision, training_overrides
    mc, rc, wrapper, callbacks = (recipe.model.model_config, recipe.runner_config, recipe.runner_wrapper,
                                  recipe.callbacks)
    lora = lora_settings(recipe)
    given = {"model.model_config.num_heads", "model.model_config.hidden_act"} & set(getattr(recipe, "given", ()))
    config = gpt2_config(recipe)
    shape = recipe_shape(config.n_embd, config.n_head, config.activation, "the recipe's model_config", bool(given))
    model = ModelSpec(architecture=recipe.model.arch.type, config=config, shape=shape,
                      load_checkpoint=recipe.load_checkpoint, overrides=training_overrides(recipe),
                      strategy=resolve_path(recipe.src_strategy_path_or_dir) if recipe.src_strategy_path_or_dir else "",
                      seq_length=mc.seq_length, lora=LoraSettings(**lora) if lora else None,
                      recompute=recipe.parallel.recompute)
    opt, lr = recipe.optimizer, recipe.lr_schedule
    rule = UPDATE_RULES[opt.type]
    settings = TrainSettings(
        total_steps=rc.max_steps if rc.max_steps > 0 else None, precision=precision(recipe),
        max_grad_norm=wrapper.max_grad_norm if wrapper.use_clip_grad else None, step_rule=rule,
        log_interval=callbacks.MFLossMonitor.per_print_times,
        save_steps=callbacks.CheckpointMonitor.save_checkpoint_steps,
        eval_interval=recipe.eval_step_interval if recipe.do_eval else None,
        loss_scale=wrapper.scale_sense.loss_scale_value, scale_factor=wrapper.scale_sense.scale_factor,
        scale_window=wrapper.scale_sense.scale_window, max_consecutive_skips=wrapper.max_consecutive_skips,
        loss_scale_fixed=wrapper.scale_sense.type == "FixedLossScaleUpdateCell", progress=rc.progress_bar)
    optimizer = OptimizerSettings(type=opt.type, learning_rate=lr.learning_rate, lr_end=lr.lr_end,
                                  lr_schedule=lr.type, warmup_steps=lr.warmup_steps, warmup_lr_init=lr.warmup_lr_init,
                                  power=lr.power, schedule_steps=lr.total_steps, beta1=opt.beta1, beta2=opt.beta2,
                                  eps=opt.eps, weight_decay=opt.weight_decay, warmup_ratio=lr.warmup_ratio,
                                  num_cycles=lr.num_cycles, decay_steps=lr.decay_steps)
    generation = generation_config(recipe)
    p = recipe.parallel
    return TrainJob(
        model=model, train_data=data_split(recipe.train_dataset, recipe.preprocessing_num_workers),
        eval_data=data_split(recipe.eval_dataset, recipe.preprocessing_num_workers),
        settings=settings, optimizer=optimizer, batch_size=rc.batch_size,
        gradient_accumulation_steps=rc.gradient_accumulation_steps, global_batch_size=rc.global_batch_size,
        epochs=rc.epochs, shuffle=recipe.train_dataset.data_loader.shuffle,
        eval_batch_size=recipe.eval_dataset.batch_size, eval_max_batches=recipe.eval_dataset.max_batches,
        eval_precision=COMPUTE_DTYPES.get(recipe.eval_dataset.compute_dtype), seed=recipe.seed, device=recipe.device,
        output_dir=os.path.abspath(resolve_path(recipe.output_dir)), resume=recipe.resume_training,
        keep_checkpoints=callbacks.CheckpointMonitor.keep_checkpoint_max,
        checkpoint_prefix=callbacks.CheckpointMonitor.prefix, tokenizer=resolve_path(recipe.tokenizer),
        data_cache_dir=resolve_path(recipe.data_cache_dir),
        parallel=ParallelConfig(data_parallel=p.data_parallel, model_parallel=p.model_parallel,
                                pipeline_stage=p.pipeline_stage, micro_batch_num=p.micro_batch_num,
                                optimizer_shard=p.optimizer_shard, recompute=p.recompute,
                                sequence_parallel=p.sequence_parallel, pipeline_schedule=p.pipeline_schedule),
        use_parallel=recipe.use_parallel, meta_init=p.meta_init, compile=rc.compile, compile_scope=rc.compile_scope,
        loss_chunk_size=rc.loss_chunk_size,
        generation=dict(do_sample=generation["do_sample"], temperature=generation["temperature"],
                        top_k=generation["top_k"], top_p=generation["top_p"],
                        repetition_penalty=generation["repetition_penalty"],
                        max_decode_length=generation["max_decode_length"]),
        run_mode=recipe.run_mode, report_to=tuple(n for n in recipe.report_to if n != "none"),
        recipe=recipe.to_dict(), names=names)


def data_split(section, num_proc: int | None = None) -> DataSplit | None:
    """A recipe's train_dataset / eval_dataset section as a DataSplit (None when it names no file)."""
    path = resolve_path(section.data_loader.dataset_dir)
    if not path:
        return None
    return DataSplit(path=path, dataset_name=section.dataset_name, mindformers_compat=section.mindformers_compat,
                     max_samples=section.max_samples, text_column=section.text_column,
                     label_column=section.label_column, text_format=section.text_format, split=section.split,
                     num_proc=num_proc)


def recipe_with(recipe: dict | None, precision: str | None = None, device: str | None = None,
                use_parallel: bool | None = None, parallel: ParallelConfig | None = None) -> dict | None:
    """A copy of a job's recipe record (None: a job built in Python has none) with job settings changed after
    job_from_recipe (the launcher's: train/launcher.py), under the recipe's keys, so that recipe.yaml says what ran."""
    if recipe is None:
        return None
    from .recipe import PRECISION_DTYPES
    out = copy.deepcopy(recipe)
    if precision is not None:
        out["model"]["model_config"]["compute_dtype"] = PRECISION_DTYPES[precision]
    if device is not None:
        out["device"] = device
    if use_parallel is not None:
        out["use_parallel"] = use_parallel
    if parallel is not None:
        out["parallel"].update(data_parallel=parallel.data_parallel, model_parallel=parallel.model_parallel,
                               pipeline_stage=parallel.pipeline_stage, optimizer_shard=parallel.optimizer_shard)
    return out
