"""Training recipes: MindFormers-style YAML files, validated against one schema.

Section and key names follow MindFormers' GPT-2 configs (runner_config, runner_wrapper, optimizer,
lr_schedule, model.model_config, train_dataset, eval_dataset, callbacks, ...) so a MindFormers user
recognises them, but only keys this trainer implements are accepted: an unknown key or a bad value is a
one-line ValueError naming the key and what is valid.

    recipe = load_recipe("configs/gpt2/pretrain_gpt2_tiny.yaml", ["runner_config.batch_size=4"])
    recipe.runner_config.batch_size        # attribute or dict access, both work
    gpt2_config(recipe)                    # -> GPT2Config
    generation_config(recipe)              # -> dict of generation defaults (generate.py reads these)
"""
from __future__ import annotations

import copy

import yaml

from ..config import INIT_STYLES, MIN_TEMPERATURE, MINDFORMERS_ACTIVATIONS, SAMPLING, GPT2Config
from ..data.hf_datasets import TEXT_FORMATS  # issue 16: datasets sources
from ..data.txtcls import DATASETS as TXTCLS_DATASETS  # MindFormers' txtcls_dataset_to_mindrecord.py names
from ..fileio import atomic_write
from ..model import ARCHITECTURES, LANGUAGE_MODEL
from ..recipe_files import recipe_path
from ..schema import MAX_SIZE, SEED_MAX, Key, Record, parse, shown, yaml_load
from .optim import UPDATE_RULES
from .trackers import TRACKERS  # issue 16

COMPUTE_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PRECISION_DTYPES = {v: k for k, v in COMPUTE_DTYPES.items()}  # the trainer's fp16 -> the recipe's float16
SCHEDULE_TYPES = {"polynomial": "polynomial", "PolynomialWithWarmUpLR": "polynomial", "cosine": "cosine",
                  "CosineWithWarmUpLR": "cosine", "constant": "constant", "ConstantWarmUpLR": "constant",
                  "constant_with_warmup": "constant"}
# AdamW is torch's (bias-corrected); MindFormers' names compute MindSpore's AdamWeightDecay rule (no bias
# correction), see train/optim.py UPDATE_RULES. The fused kernel is picked per device by gpt2_ascend.ops.adamw.
OPTIMIZER_TYPES = tuple(UPDATE_RULES)
DEFAULT_INIT_RANGE = {"hf": 0.02, "mindformers": 0.01}  # MindSpore's initializer('normal') draws N(0, 0.01)
# MindFormers' metric names this project computes (run_mode eval, train.py); its others (ADGENMetric, EmF1Metric,
# ...) belong to tasks GPT-2 does not have here and are refused by name.
METRICS = ("PerplexityMetric", "Accuracy")
# runner_wrapper.scale_sense: MindSpore's loss-scale cells (fp16). Fixed: the scale never changes, an overflowing step
# is still skipped (TrainOneStepWithLossScaleCell); a plain number there means the same.
LOSS_SCALE_CELLS = ("DynamicLossScaleUpdateCell", "FixedLossScaleUpdateCell")


class Recipe(Record):
    """A nested dict whose keys also read as attributes (recipe.runner_config.batch_size)."""


def _section(**keys):
    return dict(keys)


def _datasets_keys(split: str) -> dict:
    """A dataset section's keys for a datasets source's columns, protocol and split (data/hf_datasets.py)."""
    return dict(
        text_column=Key(None, "str", nullable=True, doc="datasets sources: the text column; null: text (language "
                                                        "modelling) or sentence (classification)"),
        label_column=Key("label", "str", doc="datasets sources: the label column (classification)"),
        text_format=Key("auto", "choice", TEXT_FORMATS,
                        doc="datasets sources: wikitext (rows are WikiText lines: MindFormers' cleaning), text (a row "
                            "is a document) or auto (wikitext when the first row is a ' = Heading = ')"),
        split=Key(split, "str", doc="datasets sources: the split of a hub id or a DatasetDict folder"),
    )


def _resume_value(value):
    """resume_training: false, true / auto (the newest complete checkpoint), or a checkpoint path."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value is True:
        return "auto"
    if value is False or value == "":
        return False
    if not isinstance(value, str):
        raise ValueError("false, true, auto or a checkpoint path")
    return value


STEPS = "-1 (the run's length) or an integer >= 1"


def _steps(value: int) -> int:
    if value != -1 and value < 1:
        raise ValueError(STEPS)
    return value


CALLBACKS = {
    "MFLossMonitor": _section(
        per_print_times=Key(10, "int", minimum=1, doc="pull losses from the device and write metrics every N steps"),
    ),
    "CheckpointMonitor": _section(
        prefix=Key("gpt2", "str", doc="name recorded in the checkpoint manifest"),
        save_checkpoint_steps=Key(500, "int", minimum=1),
        keep_checkpoint_max=Key(3, "int", minimum=1),
    ),
}

SCHEMA = _section(
    seed=Key(0, "int", minimum=0, maximum=SEED_MAX),
    run_mode=Key("train", "choice", ("train", "finetune", "predict", "eval"),
                 doc="train: from scratch (or from load_checkpoint); finetune: from load_checkpoint"),
    output_dir=Key("./output", "str"),
    load_checkpoint=Key("", "str", doc="HF-format directory or one of our checkpoint directories"),
    src_strategy_path_or_dir=Key("", "str", doc="the strategy of a MindFormers distributed load_checkpoint "
                                                "(output/strategy/); empty: none, or output/ holding strategy/"),
    resume_training=Key(False, "any", convert=_resume_value, expects="false, true, auto or a checkpoint path",
                        doc="false, true/auto (newest complete checkpoint) or a checkpoint path"),
    device=Key("auto", "str", doc="auto | cpu | cuda[:N] | npu[:N]"),
    use_parallel=Key(False, "bool"),
    do_eval=Key(False, "bool", doc="evaluate on eval_dataset every eval_step_interval steps"),
    eval_step_interval=Key(100, "int", minimum=1),
    tokenizer=Key("", "str", doc="tokenizer directory; empty = $GPT2_DATA_DIR/gpt2"),
    data_cache_dir=Key("", "str", doc="where raw datasets prepared on the fly are cached; empty = OUTPUT_DIR/data_cache"),
    # issue 16: the HF workflow (datasets sources, experiment trackers)
    preprocessing_num_workers=Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True,
                                  doc="processes that tokenize a datasets source (Dataset.map num_proc); null: one"),
    report_to=Key(["tensorboard"], "names", doc="experiment trackers: tensorboard, wandb, mlflow, or none "
                                               "(metrics.jsonl is always written)"),
    runner_config=_section(
        epochs=Key(1, "int", minimum=1, maximum=MAX_SIZE),
        batch_size=Key(4, "int", minimum=1, maximum=MAX_SIZE, doc="per device and micro-batch"),
        gradient_accumulation_steps=Key(1, "int", minimum=1, maximum=MAX_SIZE),
        global_batch_size=Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True,
                              doc="rows per optimizer step over all devices; the trainer accumulates gradients "
                                  "to keep it on fewer devices (null: batch_size x accumulation x data-parallel "
                                  "ranks)"),
        max_steps=Key(-1, "int", convert=_steps, expects=STEPS,
                      doc="stop after N optimizer steps (-1: epochs x steps per epoch)"),
        compile=Key(False, "bool", doc="wrap the model with torch.compile"),
        compile_scope=Key("model", "choice", ("model", "blocks"),
                          doc="model: one graph for the whole step (fastest for small models); blocks: the "
                              "per-block step and its recompute compiled once for all blocks (minutes less for "
                              "deep models; distributed runs always compile per block)"),
        loss_chunk_size=Key(0, "int", minimum=0, maximum=MAX_SIZE,
                            doc="tokens per chunk of the fused LM head + cross-entropy (0: plain logits)"),
        progress_bar=Key(True, "bool"),
    ),
    runner_wrapper=_section(
        type=Key("MFTrainOneStepCell", "choice", ("MFTrainOneStepCell",),
                 doc="MindFormers' one-step cell: loss scaling, overflow skip, global-norm clipping"),
        use_clip_grad=Key(True, "bool"),
        max_grad_norm=Key(1.0, "float", above=0.0),
        max_consecutive_skips=Key(100, "int", minimum=1,
                                  doc="fp16: stop when this many steps in a row overflow"),
        scale_sense=_section(  # a number is MindFormers' fixed scale: FixedLossScaleUpdateCell with that value
            type=Key("DynamicLossScaleUpdateCell", "choice", LOSS_SCALE_CELLS),
            loss_scale_value=Key(2.0 ** 32, "float", minimum=1.0, maximum=2.0 ** 64),
            scale_factor=Key(2.0, "float", above=1.0, maximum=2.0 ** 64),  # torch's GradScaler needs > 1
            scale_window=Key(1000, "int", minimum=1),
        ),
    ),
    parallel=_section(
        data_parallel=Key(1, "int", minimum=1, maximum=MAX_SIZE),
        model_parallel=Key(1, "int", minimum=1, maximum=MAX_SIZE),
        pipeline_stage=Key(1, "int", minimum=1, maximum=MAX_SIZE),
        micro_batch_num=Key(1, "int", minimum=1, maximum=MAX_SIZE),
        optimizer_shard=Key(False, "bool"),
        recompute=Key("none", "choice", ("none", "selective", "full")),
        sequence_parallel=Key(False, "bool"),
        pipeline_schedule=Key("1f1b", "choice", ("1f1b", "gpipe")),
        meta_init=Key(None, "bool", nullable=True,
                      doc="build on the meta device and give each rank only its shards; null: above 2B parameters"),
    ),
    model=_section(
        arch=_section(type=Key(LANGUAGE_MODEL, "choice", ARCHITECTURES)),
        model_config=_section(
            seq_length=Key(1024, "int", minimum=2, maximum=MAX_SIZE),
            max_position_embeddings=Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True, doc="null = seq_length"),
            vocab_size=Key(50257, "int", minimum=1, maximum=MAX_SIZE),
            hidden_size=Key(768, "int", minimum=1, maximum=MAX_SIZE),
            num_layers=Key(12, "int", minimum=1, maximum=MAX_SIZE),
            num_heads=Key(12, "int", minimum=1, maximum=MAX_SIZE),
            expand_ratio=Key(4, "int", minimum=1, maximum=MAX_SIZE),
            hidden_act=Key("gelu", "choice", tuple(MINDFORMERS_ACTIVATIONS)),
            hidden_dropout_rate=Key(0.1, "float", minimum=0.0, below=1.0),
            attention_dropout_rate=Key(0.1, "float", minimum=0.0, below=1.0),
            layer_norm_epsilon=Key(1e-5, "float", above=0.0),
            init_style=Key("hf", "choice", INIT_STYLES,
                           doc="a fresh model's init: hf (GPT-2's, residual projections scaled) or mindformers "
                               "(N(0, initializer_range) for every weight)"),
            initializer_range=Key(None, "float", minimum=0.0, nullable=True,
                                  doc="init std; null: 0.02 (hf) or 0.01 (mindformers)"),
            num_labels=Key(2, "int", minimum=1, maximum=MAX_SIZE),
            eos_token_id=Key(50256, "int", minimum=0, below=MAX_SIZE),
            pad_token_id=Key(50256, "int", minimum=0, below=MAX_SIZE),
            compute_dtype=Key("float32", "choice", tuple(COMPUTE_DTYPES)),
            attn_implementation=Key("auto", "choice", ("auto", "eager", "sdpa", "npu")),
            pad_vocab_size_multiple=Key(1, "int", minimum=1, maximum=MAX_SIZE),
            # generation defaults (generate.py)
            max_decode_length=Key(1024, "int", minimum=1, maximum=MAX_SIZE),
            top_k=SAMPLING["top_k"].but(default=5),
            top_p=SAMPLING["top_p"],
            temperature=SAMPLING["temperature"],
            do_sample=Key(False, "bool"),
            repetition_penalty=SAMPLING["repetition_penalty"],
            use_past=Key(True, "bool"),
            pet_config=_section(
                pet_type=Key("none", "choice", ("none", "lora")),
                lora_rank=Key(64, "int", minimum=1, maximum=MAX_SIZE),
                lora_alpha=Key(128.0, "float", above=0.0),
                lora_dropout=Key(0.1, "float", minimum=0.0, below=1.0),
                target_modules=Key(["c_attn"], "names", doc="module names: c_attn, c_proj, c_fc"),
            ),
        ),
    ),
    lr_schedule=_section(
        type=Key("polynomial", "choice", SCHEDULE_TYPES),
        learning_rate=Key(1e-4, "float", above=0.0),
        lr_end=Key(1e-5, "float", minimum=0.0),
        warmup_steps=Key(0, "int", minimum=0),
        warmup_lr_init=Key(0.0, "float", minimum=0.0),
        power=Key(1.0, "float", minimum=0.0),
        total_steps=Key(-1, "int", convert=_steps, expects=STEPS, doc="-1: steps per epoch x epochs (or max_steps)"),
        warmup_ratio=Key(None, "float", minimum=0.0, maximum=1.0, nullable=True,
                         doc="replaces warmup_steps: int(total_steps x warmup_ratio), as MindFormers"),
        num_cycles=Key(0.5, "float", minimum=0.0, doc="cosine: waves of the cosine (0.5: one half-cosine)"),
        decay_steps=Key(None, "int", minimum=1, nullable=True,
                        doc="cosine: lr_end from this step on; polynomial: the decay's length (null: MindFormers' "
                            "defaults, total_steps and total_steps - warmup)"),
    ),
    optimizer=_section(
        type=Key("AdamW", "choice", OPTIMIZER_TYPES,
                 doc="AdamW: torch's rule; FusedAdamWeightDecay / FP32StateAdamWeightDecay / AdamWeightDecay: "
                     "MindSpore's (no bias correction)"),
        beta1=Key(0.9, "float", minimum=0.0, below=1.0),
        beta2=Key(0.95, "float", minimum=0.0, below=1.0),
        eps=Key(1e-8, "float", above=0.0),
        weight_decay=Key(0.1, "float", minimum=0.0),
    ),
    train_dataset=_section(
        data_loader=_section(dataset_dir=Key("", "str"), shuffle=Key(True, "bool")),
        dataset_name=Key("sst_2", "choice", TXTCLS_DATASETS,
                         doc="raw text-classification files: the layout of MindFormers' preprocessing script"),
        mindformers_compat=Key(False, "bool", doc="raw WikiText-2: drop the last passage as MindFormers does"),
        max_samples=Key(None, "int", minimum=1, nullable=True, doc="use only the first N rows (null = all)"),
        **_datasets_keys("train"),  # issue 16
    ),
    eval_dataset=_section(
        data_loader=_section(dataset_dir=Key("", "str"), shuffle=Key(False, "bool")),
        dataset_name=Key("sst_2", "choice", TXTCLS_DATASETS),
        batch_size=Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True, doc="null = runner_config.batch_size"),
        mindformers_compat=Key(False, "bool"),
        max_samples=Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True,
                        doc="evaluate the first N rows (null: all, or in a run that max_steps ends, as many as it "
                            "trains on unless max_batches is set)"),
        max_batches=Key(None, "int", minimum=1, maximum=MAX_SIZE, nullable=True,
                        doc="a training run's evaluations stop after N batches (null: no bound of their own)"),
        compute_dtype=Key(None, "choice", tuple(COMPUTE_DTYPES), nullable=True,
                          doc="a training run's evaluations (null: the run's compute_dtype on GPU / NPU, float32 on "
                              "the CPU, as evaluate.py)"),
        **_datasets_keys("validation"),  # issue 16
    ),
    callbacks=CALLBACKS,
    metric=_section(
        type=Key(None, "choice", METRICS, nullable=True,
                 doc="run_mode eval: PerplexityMetric (MindFormers' mean of per-batch losses) or Accuracy; "
                     "null: by model.arch"),
        eval_type=Key("classification", "choice", ("classification",), doc="Accuracy's kind (MindFormers' key)"),
    ),
)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_recipe(path: str | None = None, overrides=(), base: dict | None = None, flags: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base` / the defaults), apply `section.key=value` overrides,
    validate everything and fill in defaults. flags: {dotted key: the command-line flag that set it}, so that an
    error about a value a flag gave names the flag (train.py's --batch_size), not the file."""
    raw = {}
    source = "defaults"
    if path:
        source = path
        raw = read_yaml(path)
    elif base is not None:
        raw = copy.deepcopy(dict(base))
    raw = _normalise_callbacks(raw, source)
    origins = {}  # dotted key -> the flag or override that set it
    for item in overrides or ():
        before = raw.get("callbacks")
        key = apply_override(raw, item)
        origins[key] = f"the flag {flags[key]}" if flags and key in flags else f"the override {shown(item)}"
        # the list form as an override (callbacks=[{type: MFLossMonitor, per_print_times: 5}]) changes only
        # the keys it gives, like callbacks.MFLossMonitor.per_print_times=5 would
        raw = _normalise_callbacks(raw, origins[key], base=before if isinstance(before, dict) else None)
    raw = _normalise_scale_sense(raw)
    recipe = parse(raw, SCHEMA, lambda name: _origin(name, origins, source), lax=True, record=Recipe)
    check_consistency(recipe, source)
    recipe.given = frozenset(origins)  # the keys a flag or override set (a .ckpt takes its heads from those)
    return recipe


def _origin(name: str, origins: dict, source: str) -> str:
    """Where a dotted key's value came from: the override that set it or a section above it, else the file."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:end]))
        if found:
            return found
    return source


def read_yaml(path: str) -> dict:
    path = recipe_path(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml_load(f.read(), path)  # bounded: an alias bomb is one line, in milliseconds
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise ValueError(f"{path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save "
                             f"it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(raw: dict, item: str) -> str:
    """`section.key=value` (value parsed as YAML: 1e-4, true, [a, b], null); returns the dotted key."""
    if "=" not in item:
        raise ValueError(f"bad override {item!r}: use section.key=value, e.g. runner_config.batch_size=8")
    dotted, text = item.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ValueError(f"bad override {item!r}: the key is empty")
    try:
        value = yaml_load(text, f"the override {item[:80]!r}") if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return ".".join(parts)


def _normalise_callbacks(raw: dict, source: str, base: dict | None = None) -> dict:
    """MindFormers writes callbacks as a list of {type: ..., ...}; we key them by type (each entry's keys
    update `base`'s, when given)."""
    callbacks = raw.get("callbacks")
    if isinstance(callbacks, list):
        mapping = copy.deepcopy(base or {})
        for entry in callbacks:
            if not isinstance(entry, dict) or "type" not in entry:
                raise ValueError(f"bad callbacks entry {entry!r} in {source}: each needs a type "
                                 f"({', '.join(CALLBACKS)})")
            entry = dict(entry)
            kind = entry.pop("type")
            mapping[kind] = {**(mapping.get(kind) or {}), **entry}
        raw = {**raw, "callbacks": mapping}
    return raw


def _normalise_scale_sense(raw: dict) -> dict:
    """MindFormers takes runner_wrapper.scale_sense as a number (a fixed loss scale) or a cell's section; the
    number becomes FixedLossScaleUpdateCell's section (whose scale_factor and scale_window go unused)."""
    wrapper = raw.get("runner_wrapper")
    sense = wrapper.get("scale_sense") if isinstance(wrapper, dict) else None
    if isinstance(sense, (int, float)) and not isinstance(sense, bool):
        return {**raw, "runner_wrapper": {**wrapper, "scale_sense": dict(type="FixedLossScaleUpdateCell",
                                                                         loss_scale_value=sense)}}
    return raw


def check_consistency(recipe: Recipe, source: str):
    """Rules that involve several keys."""
    mc = recipe.model.model_config
    if mc.hidden_size % mc.num_heads:
        raise ValueError(f"bad model_config in {source}: hidden_size {mc.hidden_size} is not divisible by "
                         f"num_heads {mc.num_heads}")
    if mc.max_position_embeddings is not None and mc.seq_length > mc.max_position_embeddings:
        raise ValueError(f"bad model_config in {source}: seq_length {mc.seq_length} exceeds "
                         f"max_position_embeddings {mc.max_position_embeddings}")
    if mc.do_sample and mc.temperature < MIN_TEMPERATURE:
        raise ValueError(f"bad value {mc.temperature!r} for 'model.model_config.temperature' in {source}: expected a "
                         f"number in [{MIN_TEMPERATURE:g}, 1e+06] when do_sample is true (greedy decoding is the limit "
                         f"of a small temperature)")
    if mc.expand_ratio * mc.hidden_size > MAX_SIZE:
        raise ValueError(f"bad model_config in {source}: expand_ratio {mc.expand_ratio} x hidden_size "
                         f"{mc.hidden_size} is more than {MAX_SIZE} (the largest size a model here may have)")
    lr = recipe.lr_schedule
    if lr.type == "polynomial" and lr.lr_end > lr.learning_rate:
        raise ValueError(f"bad lr_schedule in {source}: lr_end {lr.lr_end:g} is larger than learning_rate "
                         f"{lr.learning_rate:g}")
    if lr.type != "cosine" and lr.num_cycles != 0.5:
        raise ValueError(f"bad key 'lr_schedule.num_cycles' in {source}: it shapes CosineWithWarmUpLR only")
    if lr.type == "constant" and lr.decay_steps is not None:
        raise ValueError(f"bad key 'lr_schedule.decay_steps' in {source}: a constant schedule does not decay")
    check_report_to(recipe.report_to, source)


def check_report_to(names: list, source: str):
    """report_to names known trackers, or is [none] (issue 16)."""
    unknown = [n for n in names if n not in TRACKERS + ("none",)]
    if unknown or ("none" in names and len(names) > 1):
        raise ValueError(f"bad value {names!r} for 'report_to' in {source}: expected some of {', '.join(TRACKERS)}, "
                         f"or none alone")


# ---------------------------------------------------------------------------------------------
# what the rest of the library reads from a recipe
# ---------------------------------------------------------------------------------------------
def gpt2_config(recipe: Recipe) -> GPT2Config:
    """The model shape the recipe describes, in GPT2Config terms."""
    mc = recipe.model.model_config
    return GPT2Config(
        vocab_size=mc.vocab_size, n_positions=mc.max_position_embeddings or mc.seq_length,
        n_embd=mc.hidden_size, n_layer=mc.num_layers, n_head=mc.num_heads,
        n_inner=mc.expand_ratio * mc.hidden_size, activation=MINDFORMERS_ACTIVATIONS[mc.hidden_act],
        layer_norm_epsilon=mc.layer_norm_epsilon, embd_pdrop=mc.hidden_dropout_rate,
        attn_pdrop=mc.attention_dropout_rate, resid_pdrop=mc.hidden_dropout_rate,
        **init_settings(recipe), num_labels=mc.num_labels, pad_token_id=mc.pad_token_id,
        eos_token_id=mc.eos_token_id, bos_token_id=mc.eos_token_id,
        attn_implementation=mc.attn_implementation, pad_vocab_size_multiple=mc.pad_vocab_size_multiple,
    )


def training_overrides(recipe: Recipe) -> dict:
    """GPT2Config fields a recipe sets on a model loaded from a checkpoint (the shape comes from the
    checkpoint; dropout, labels, the attention kernel and the init of a fresh classifier head from the recipe)."""
    mc = recipe.model.model_config
    return dict(embd_pdrop=mc.hidden_dropout_rate, attn_pdrop=mc.attention_dropout_rate,
                resid_pdrop=mc.hidden_dropout_rate, num_labels=mc.num_labels,
                attn_implementation=mc.attn_implementation, **init_settings(recipe))


def init_settings(recipe: Recipe) -> dict:
    """init_style and initializer_range (null -> the style's default) for a fresh model or a fresh head."""
    mc = recipe.model.model_config
    std = mc.initializer_range if mc.initializer_range is not None else DEFAULT_INIT_RANGE[mc.init_style]
    return dict(init_style=mc.init_style, initializer_range=std)


def generation_config(recipe: Recipe) -> dict:
    """Generation defaults under MindFormers' names (max_decode_length counts prompt + new tokens)."""
    mc = recipe.model.model_config
    return dict(max_decode_length=mc.max_decode_length, top_k=mc.top_k, top_p=mc.top_p,
                temperature=mc.temperature, do_sample=mc.do_sample,
                repetition_penalty=mc.repetition_penalty, use_past=mc.use_past,
                eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id)


def precision(recipe: Recipe) -> str:
    """fp32 | fp16 | bf16, from model_config.compute_dtype."""
    return COMPUTE_DTYPES[recipe.model.model_config.compute_dtype]


def lora_settings(recipe: Recipe) -> dict | None:
    pet = recipe.model.model_config.pet_config
    if pet.pet_type != "lora":
        return None
    return dict(rank=pet.lora_rank, alpha=pet.lora_alpha, dropout=pet.lora_dropout,
                target_modules=tuple(pet.target_modules))


def dump_recipe(recipe: dict, path: str):
    """Write the resolved recipe (every key, defaults filled in; a Recipe or its to_dict()) as YAML, atomically."""
    text = yaml.safe_dump(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, sort_keys=False).encode("utf-8")
    atomic_write(path, lambda f: f.write(text), size=len(text))

