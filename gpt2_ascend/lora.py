"""LoRA through peft, on our HF-named modules, with PEFT's own adapter files both ways.

Targets: `c_attn` (q, k and v together), `c_proj` (attention and MLP output projections), `c_fc`, and
`c_attn.q` / `c_attn.k` / `c_attn.v` for MindFormers' separate projections (its GPT-2 recipes adapt dense1 = q
and dense3 = v). GPT-2 fuses q, k and v into one `c_attn`, so n of them are one peft adapter of rank n·r (alpha
n·alpha: the same scale alpha / r) whose B matrix is kept block-diagonal: each part's rows of B see only that
part's r columns of A, and a gradient mask keeps every other entry of B at zero, so it trains exactly as n separate
rank-r adapters (one dropout mask is shared by the parts where MindFormers draws one per adapter).
`mindformers_targets` maps MindFormers' target_modules regex ('.*dense1.*|.*dense3.*') to these names.
Adapters are PEFT's own files (adapter_config.json + adapter_model.safetensors) with the tensor names of an HF
GPT-2 adapter, so one adapter serves both models: an adapter trained on transformers' GPT-2 (task type
CAUSAL_LM, SEQ_CLS or none) loads here, and ours load in peft on transformers' GPT-2 (`AutoPeftModelForCausalLM`
included).
"""
from __future__ import annotations

import json
import os
import pickle
import re

import torch

from .budget import require_memory
from .safe_pickle import refused
from .schema import EXTRA, MAX_SIZE, Key, parse, read_json

OUR_TARGETS = ("c_attn", "c_proj", "c_fc", "c_attn.q", "c_attn.k", "c_attn.v")
QKV = ("q", "k", "v")
# MindFormers' GPT-2 Linear cells (their local names, which its target_modules regex is matched against) -> ours
MINDFORMERS_CELLS = {"dense1": "c_attn.q", "dense2": "c_attn.k", "dense3": "c_attn.v", "projection": "c_proj",
                     "mapping": "c_fc"}


def mindformers_targets(patterns, fuse_qkv: bool = True) -> tuple[str, ...]:
    """Our target names for a target_modules list: our own names pass through; the other entries are MindFormers'
    regex (its 'a|b' string, split into a list by the recipe), matched as one (re.match, as MindFormers does)
    against its cells dense1/2/3, projection, mapping. q, k and v all adapted are the whole c_attn (one adapter of
    rank r) unless fuse_qkv is False (three rank-r adapters side by side, as a MindFormers checkpoint holds them)."""
    targets = [p for p in patterns if p in OUR_TARGETS]
    regex = "|".join(p for p in patterns if p not in OUR_TARGETS)
    if regex:
        try:
            found = [ours for cell, ours in MINDFORMERS_CELLS.items() if re.match(regex, cell)]
        except re.error as e:
            raise ValueError(f"lora target_modules {regex!r} is not a valid regex ({e})") from None
        if not found:
            raise ValueError(f"lora target_modules {regex!r} matches no layer: use {', '.join(OUR_TARGETS)} or "
                             f"MindFormers' cell names ({', '.join(MINDFORMERS_CELLS)})")
        targets += [t for t in found if t not in targets]
    if "c_attn" in targets or (fuse_qkv and all(f"c_attn.{p}" in targets for p in QKV)):  # the whole c_attn
        targets = [t for t in targets if not t.startswith("c_attn")] + ["c_attn"]
    return tuple(targets)


def qkv_parts(target_modules) -> list[str]:
    return [p for p in QKV if f"c_attn.{p}" in target_modules]

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft reads the first there is
# peft's task type per architecture: CAUSAL_LM wraps in PeftModelForCausalLM; SEQ_CLS in
# PeftModelForSequenceClassification, which also trains and saves the new `score` head (modules_to_save).
TASK_TYPES = {"GPT2LMHeadModel": "CAUSAL_LM", "GPT2ForSequenceClassification": "SEQ_CLS"}
# Where transformers' own classes live: the auto_mapping written into adapter_config.json, so peft resolves
# our adapters to transformers' GPT-2 (peft refuses to import a module outside its allowlist, such as ours).
HF_MODELING_MODULE = "transformers.models.gpt2.modeling_gpt2"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Our GPT-2 under a PEFT wrapper (its LoRA layers stay in the module tree), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def task_type_of(model: torch.nn.Module) -> str:
    return TASK_TYPES[model.hf_architecture]


def apply_lora(model: torch.nn.Module, rank: int = 64, alpha: float = 128, dropout: float = 0.1,
               target_modules=("c_attn",), fuse_qkv: bool = True):
    """Wrap `model` with LoRA adapters (peft's PeftModel for the model's task type); only adapter
    parameters (and a classifier's `score` head) stay trainable. fuse_qkv: see mindformers_targets."""
    from peft import LoraConfig, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:  # peft would build a broken layer
        raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
    target_modules = mindformers_targets(target_modules, fuse_qkv)
    parts = qkv_parts(target_modules)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    modules = sorted({t.split(".")[0] for t in target_modules})
    unknown = [t for t in modules if t not in names]
    if unknown:
        raise ValueError(f"lora target module {unknown[0]!r} is not in the model: use c_attn, c_proj, c_fc")
    # a classifier's head is new (random on an LM base) and tiny: it trains whole, saved in the adapter
    # (PEFT's modules_to_save, as its SEQ_CLS task type does); frozen, it would stay random
    modules_to_save = ["score"] if task_type_of(model) == "SEQ_CLS" else None
    patterns = dict(rank_pattern={"c_attn": rank * len(parts)}, alpha_pattern={"c_attn": alpha * len(parts)}) \
        if parts else {}
    require_adapter_memory(model, rank, modules, f"LoRA adapters of rank {rank} on {', '.join(modules)}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                        bias="none", task_type=task_type_of(model), modules_to_save=modules_to_save, **patterns)
    peft_model = get_peft_model(model, config)
    if parts:
        for name, module in peft_model.named_modules():
            if name.endswith("c_attn") and hasattr(module, "lora_B"):
                mask_to_parts(module.lora_B["default"].weight, parts, rank)
    return peft_model


def qkv_block_mask(out_features: int, parts: list[str], rank: int) -> torch.Tensor:
    """1 where B (3E x n·r) may be nonzero: part j's rows of q / k / v times its r columns."""
    width = out_features // 3
    mask = torch.zeros(out_features, rank * len(parts))
    for j, part in enumerate(parts):
        row = QKV.index(part) * width
        mask[row:row + width, j * rank:(j + 1) * rank] = 1.0
    return mask


def mask_to_parts(weight: torch.nn.Parameter, parts: list[str], rank: int):
    """Keep a fused c_attn adapter's B block-diagonal: zero outside the parts' blocks now, and in every gradient."""
    mask = qkv_block_mask(weight.size(0), parts, rank).to(weight.device, weight.dtype)
    with torch.no_grad():
        weight.mul_(mask)
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    weight.trained_numel = int(mask.sum())  # what trains: MindFormers' separate q / k / v adapters' count


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _names(value):
    """peft's target_modules / modules_to_save: a name (a regex, for target_modules) or a list of names."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError("a module name or a list of module names")


# adapter_config.json: the keys that decide what the adapter computes are checked; peft's other settings (its
# version's additions) are left to peft, which reads them
ADAPTER_CONFIG = {
    "peft_type": Key("LORA", "choice", ("LORA",)),
    "task_type": Key(None, "choice", tuple(TASK_TYPES.values())),
    "r": Key(8, "int", minimum=1, maximum=MAX_SIZE),
    "lora_alpha": Key(8, "float", above=0.0),
    "lora_dropout": Key(0.0, "float", minimum=0.0, below=1.0),
    "target_modules": Key(None, "any", convert=_names, expects="a module name or a list of module names"),
    "modules_to_save": Key(None, "any", convert=_names, expects="a module name or a list of module names"),
    "bias": Key("none", "choice", ("none", "all", "lora_only")),
    "rank_pattern": Key(None, "map", items=Key(None, "int", minimum=1, maximum=MAX_SIZE)),
    "alpha_pattern": Key(None, "map", items=Key(None, "float", above=0.0)),
    "fan_in_fan_out": Key(False, "bool"), "inference_mode": Key(True, "bool"), "use_rslora": Key(False, "bool"),
    "use_dora": Key(False, "bool"),
    "base_model_name_or_path": Key(None, "str"), "revision": Key(None, "str"),
    "auto_mapping": Key(None, "map", items=Key(None, "any")),
    EXTRA: Key(None, "any"),
}


def read_adapter_config(adapter_dir: str) -> dict:
    """An adapter directory's adapter_config.json, checked (ADAPTER_CONFIG)."""
    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}: pass a PEFT adapter directory (LoRA "
                                f"training writes OUTPUT_DIR/final/adapter)")
    path = os.path.join(adapter_dir, "adapter_config.json")
    return parse(read_json(path, fix="re-save the adapter"), ADAPTER_CONFIG, path)


def check_adapter_fits(model: torch.nn.Module, adapter_dir: str, adapter_config: dict):
    """A SEQ_CLS adapter carries a classification head, a CAUSAL_LM one belongs on a language model."""
    task = adapter_config.get("task_type")
    wanted = task_type_of(model)
    if task is not None and task != wanted:
        kind = "a text-classification model (GPT2ForSequenceClassification)" if task == "SEQ_CLS" \
            else "a language model (GPT2LMHeadModel)"
        raise ValueError(f"the adapter in {adapter_dir} is a {task} adapter: load it on {kind}, not on a "
                         f"{model.hf_architecture}")


def load_adapter(model: torch.nn.Module, adapter_dir: str, merge: bool = True, trainable: bool = False):
    """Attach a saved PEFT adapter (ours or one trained on transformers' GPT-2) to `model`; with merge=True
    fold it into the base weights and return a plain model (same logits, no adapter overhead)."""
    from peft import LoraConfig, PeftModel

    adapter_config = read_adapter_config(adapter_dir)
    check_adapter_fits(model, adapter_dir, adapter_config)
    rank, targets = adapter_config.get("r"), adapter_config.get("target_modules")
    if targets is None:  # none named: what peft adapts on transformers' GPT-2
        targets = peft_gpt2_targets()
    require_adapter_memory(model, rank, targets, f"the LoRA adapter in {adapter_dir} (r={rank})")
    require_adapter_weights(adapter_dir)
    try:
        config = LoraConfig.from_pretrained(adapter_dir)
        if config.target_modules is None:  # peft finds its default by model_type, which our config does not give
            config.target_modules = set(targets)
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable, config=config)
    except pickle.UnpicklingError as e:  # peft reads adapter_model.bin with weights_only=True
        raise refused(os.path.join(adapter_dir, "adapter_model.bin"), e) from None
    except Exception as e:  # peft / safetensors / json errors: one line that names the adapter
        raise ValueError(f"cannot load the LoRA adapter in {adapter_dir}: {_adapter_problem(e)}") from None
    return merge_adapter(peft_model) if merge else peft_model


def peft_gpt2_targets() -> list[str]:
    """The layers peft adapts on transformers' GPT-2 when an adapter names no target_modules (c_attn): peft looks
    them up by the config's model_type, which GPT2Config.to_dict leaves out for older peft's sake."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["gpt2"])


def require_adapter_weights(adapter_dir: str):
    """peft reads adapter_model.safetensors (or an older adapter_model.bin); with neither there it would look for
    the folder's name on the Hugging Face hub and fail on that instead."""
    if not any(os.path.isfile(os.path.join(adapter_dir, name)) for name in ADAPTER_WEIGHTS):
        raise ValueError(f"the LoRA adapter in {adapter_dir} lacks its weights file {ADAPTER_WEIGHTS[0]} (an older "
                         f"peft's {ADAPTER_WEIGHTS[1]}): copy it beside its adapter_config.json, or save the adapter "
                         f"again")


def require_adapter_memory(model: torch.nn.Module, rank, targets, what: str):
    """Before peft allocates an adapter: its A and B matrices, rank x (in + out) fp32 values per adapted linear
    layer, fit the memory of the model's device (budget.require_memory). rank: a positive integer (apply_lora and
    the adapter's schema check it first). targets: module names (their last part), or peft's one regex string
    matched against whole names (load_adapter fills in peft's default when the adapter names none)."""
    def targeted(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return name.rsplit(".", 1)[-1] in targets
    try:
        widths = sum(m.in_features + m.out_features for name, m in unwrap_model(model).named_modules()
                     if isinstance(m, torch.nn.Linear) and targeted(name))
    except re.error:
        return
    device = next(model.parameters()).device
    require_memory(rank * widths * 4, f"{what}: {widths:,} x r={rank} values x 4 bytes", device,
                   "use a smaller lora rank (r)")


def adapter_base(adapter_dir: str) -> str:
    """The base model an adapter was trained on (its base_model_name_or_path): a directory or a hub id."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"the adapter in {adapter_dir} does not name its base model (base_model_name_or_path): "
                         f"merge it with convert/merge_lora.py --base BASE and train from the merged model")
    return base


def adapter_head_rows(adapter_dir: str, head: str) -> int | None:
    """Rows of a head the adapter trains and carries (modules_to_save, e.g. a classifier's `score`), or None."""
    from safetensors import safe_open
    file = os.path.join(adapter_dir, ADAPTER_WEIGHTS[0])
    if not os.path.isfile(file):
        return None
    with safe_open(file, framework="pt") as f:
        name = next((k for k in f.keys() if k.endswith(f".{head}.weight")), None)
        return f.get_slice(name).get_shape()[0] if name else None


def save_adapter(peft_model, output_dir: str, base_name_or_path: str | None = None):
    """PEFT's files for the adapter, with task_type, base_model_name_or_path (when known) and an auto_mapping
    that names transformers' GPT-2 class, so peft on a plain transformers install loads it
    (AutoPeftModelForCausalLM.from_pretrained(output_dir) included)."""
    config = peft_model.peft_config["default"]
    if base_name_or_path:
        config.base_model_name_or_path = base_name_or_path
    # save_embedding_layers: the vocabulary is never resized here (peft's "auto" would look the base up)
    peft_model.save_pretrained(output_dir, save_embedding_layers=False)
    inference_mode = config.inference_mode
    config.inference_mode = True
    base_class = peft_model.get_base_model().hf_architecture
    config.save_pretrained(output_dir, auto_mapping_dict={"base_model_class": base_class,
                                                          "parent_library": HF_MODELING_MODULE})
    config.inference_mode = inference_mode
    # peft's SEQ_CLS adds its generic head names ("classifier", "score") to ours: keep the modules there are
    names = {name.rsplit(".", 1)[-1] for name, _ in peft_model.get_base_model().named_modules()}
    trained_whole = [m for m in dict.fromkeys(config.modules_to_save or ()) if m in names] or None
    write_portable_config(os.path.join(output_dir, "adapter_config.json"), type(config),
                          modules_to_save=trained_whole)


# Always written, whatever their value: what an adapter is, and what it was trained on.
ADAPTER_IDENTITY_KEYS = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                         "fan_in_fan_out", "modules_to_save", "inference_mode", "base_model_name_or_path",
                         "auto_mapping"}


def write_portable_config(path: str, config_class, modules_to_save=None):
    """Keep the keys of adapter_config.json that an older peft needs: those above and those whose value differs
    from peft's default. An older peft fills the others with the same defaults, but refuses a key it does not
    know (peft 0.13, the one of transformers 4.45's time, rejects the dozen keys peft 0.2x adds at their
    defaults); a newer feature really used stays in, and an old peft then says so."""
    from .fileio import write_json
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    defaults = json.loads(json.dumps(config_class().to_dict(), default=sorted))
    saved["modules_to_save"] = modules_to_save
    write_json({k: v for k, v in saved.items()
                if k in ADAPTER_IDENTITY_KEYS or (k in defaults and v != defaults[k] and k != "peft_version")}, path)


def _adapter_problem(error: Exception) -> str:
    """peft's error in one line: a shape mismatch by its line that names the tensor (the first is a header), any
    other whole."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "size mismatch" in str(error):
        detail = next(line for line in lines if "size mismatch" in line)
        return f"{detail} (was it trained on a base of another shape?)"
    return f"{type(error).__name__}: {' '.join(lines)} (is the adapter complete and for this base model?)"


def merge_adapter(peft_model) -> torch.nn.Module:
    """Fold the adapter into the base weights (the merged model's logits equal the adapted model's)."""
    return peft_model.merge_and_unload()
