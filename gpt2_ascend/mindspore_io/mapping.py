"""HF GPT-2 names and layouts <-> MindFormers' GPT-2 (mindformers/models/gpt2: convert_weight.py,
convert_reversed.py, gpt2.py).

    HF (transformer.)            MindFormers                                          layout
    wte.weight                   backbone.embedding.word_embedding.embedding_table    [vocab, hidden], same
    wpe.weight                   backbone.embedding.position_embedding.embedding_table
    h.{i}.ln_1.weight / .bias    backbone.blocks.{i}.layernorm1.gamma / .beta
    h.{i}.attn.c_attn.weight     backbone.blocks.{i}.attention.dense1/2/3.weight      q, k, v split from the
                                                                                      [in, 3*out] Conv1D, each
                                                                                      transposed to [out, in]
    h.{i}.attn.c_attn.bias       backbone.blocks.{i}.attention.dense1/2/3.bias        split in three
    h.{i}.attn.c_proj.*          backbone.blocks.{i}.attention.projection.*           [in, out] kept
    h.{i}.ln_2.*                 backbone.blocks.{i}.layernorm2.gamma / .beta
    h.{i}.mlp.c_fc.*             backbone.blocks.{i}.output.mapping.*                 [in, out] kept
    h.{i}.mlp.c_proj.*           backbone.blocks.{i}.output.projection.*              [in, out] kept
    ln_f.weight / .bias          backbone.layernorm.gamma / .beta
    score.weight                 score.weight                                         [labels, hidden], same

MindFormers' GPT2LMHeadModel has no head weight: its GPTHead multiplies by the word embedding table
(tied, as HF GPT-2 is). Old HF .bin files carry the causal-mask buffers h.{i}.attn.bias/masked_bias,
which MindFormers' converter writes as attention.beta/masked_beta; they hold no weights and are skipped.
"""
from __future__ import annotations

import os
import re

import torch

from ..config import MINDFORMERS_ACTIVATIONS, PRESETS, GPT2Config
from ..recipe_files import recipe_path
from ..schema import MAX_SIZE, yaml_load

WTE = "backbone.embedding.word_embedding.embedding_table"
WPE = "backbone.embedding.position_embedding.embedding_table"
GLOBAL_NAMES = {  # HF (with transformer. prefix) -> MindFormers
    "transformer.wte.weight": WTE,
    "transformer.wpe.weight": WPE,
    "transformer.ln_f.weight": "backbone.layernorm.gamma",
    "transformer.ln_f.bias": "backbone.layernorm.beta",
    "score.weight": "score.weight",
}
LAYER_NAMES = {  # under transformer.h.{i}. -> under backbone.blocks.{i}.
    "ln_1.weight": "layernorm1.gamma",
    "ln_1.bias": "layernorm1.beta",
    "attn.c_proj.weight": "attention.projection.weight",
    "attn.c_proj.bias": "attention.projection.bias",
    "ln_2.weight": "layernorm2.gamma",
    "ln_2.bias": "layernorm2.beta",
    "mlp.c_fc.weight": "output.mapping.weight",
    "mlp.c_fc.bias": "output.mapping.bias",
    "mlp.c_proj.weight": "output.projection.weight",
    "mlp.c_proj.bias": "output.projection.bias",
}
QKV = ("attention.dense1", "attention.dense2", "attention.dense3")  # q, k, v
MS_MASK_BUFFERS = ("attention.beta", "attention.masked_beta")
# MindFormers' unmerged LoRA tensors (mindpet's LoRADense: lora_a [rank, in], lora_b [out, rank]; older mindpet
# names them tk_delta_lora_*), on one of its Linear cells
MS_LORA = re.compile(r"backbone\.blocks\.(\d+)\.(attention\.dense[123]|attention\.projection|output\.mapping|"
                     r"output\.projection)\.(?:mindpet_delta_|tk_delta_)?lora_([abAB])")
HF_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
MS_LAYER = re.compile(r"backbone\.blocks\.(\d+)\.(.+)")
MS_MODEL_PREFIXES = ("backbone.", "score.", "head.")
MS_OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accu_grads.", "exp_avg",
                         "global_norm", "beta1_power", "beta2_power")


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
def ms_sources(hf_name: str) -> list[str]:
    """The MindFormers tensors an HF tensor is made of (three for c_attn, one otherwise)."""
    if hf_name in GLOBAL_NAMES:
        return [GLOBAL_NAMES[hf_name]]
    m = HF_LAYER.fullmatch(hf_name)
    if m:
        i, suffix = m.groups()
        if suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
            part = suffix.rsplit(".", 1)[1]
            return [f"backbone.blocks.{i}.{d}.{part}" for d in QKV]
        if suffix in LAYER_NAMES:
            return [f"backbone.blocks.{i}.{LAYER_NAMES[suffix]}"]
    raise KeyError(f"{hf_name!r} is not a GPT-2 tensor")


def layer_count(names, pattern=HF_LAYER) -> int:
    indices = {int(m.group(1)) for m in map(pattern.fullmatch, names) if m}
    return max(indices) + 1 if indices else 0


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------
def hf_to_mindformers(hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One HF tensor (Conv1D layout) -> its MindFormers tensor(s)."""
    targets = ms_sources(hf_name)
    if hf_name.endswith("attn.c_attn.weight"):  # [in, 3*out] -> q, k, v as [out, in]
        return [(name, part.t().contiguous()) for name, part in zip(targets, tensor.chunk(3, dim=-1))]
    if hf_name.endswith("attn.c_attn.bias"):
        return [(name, part.contiguous()) for name, part in zip(targets, tensor.chunk(3, dim=-1))]
    return [(targets[0], tensor)]


def mindformers_to_hf(hf_name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The MindFormers tensor(s) named by ms_sources(hf_name) -> the HF tensor."""
    if hf_name.endswith("attn.c_attn.weight"):  # q, k, v [out, in] -> [in, 3*out]
        return torch.cat([p.t() for p in parts], dim=1)
    if hf_name.endswith("attn.c_attn.bias"):
        return torch.cat(parts, dim=0)
    return parts[0]


def hf_shapes(config: GPT2Config, classifier: bool) -> dict[str, tuple]:
    """The HF shape of every tensor of a GPT-2 with this config."""
    E, I = config.n_embd, config.inner_dim
    shapes = {"transformer.wte.weight": (config.vocab_size, E), "transformer.wpe.weight": (config.n_positions, E)}
    per_layer = {"ln_1.weight": (E,), "ln_1.bias": (E,), "attn.c_attn.weight": (E, 3 * E), "attn.c_attn.bias": (3 * E,),
                 "attn.c_proj.weight": (E, E), "attn.c_proj.bias": (E,), "ln_2.weight": (E,), "ln_2.bias": (E,),
                 "mlp.c_fc.weight": (E, I), "mlp.c_fc.bias": (I,), "mlp.c_proj.weight": (I, E), "mlp.c_proj.bias": (E,)}
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in per_layer.items()})
    shapes.update({"transformer.ln_f.weight": (E,), "transformer.ln_f.bias": (E,)})
    if classifier:
        shapes["score.weight"] = (config.num_labels, E)
    return shapes


# ---------------------------------------------------------------------------------------------
# what a MindSpore checkpoint holds
# ---------------------------------------------------------------------------------------------
def classify_ms_name(name: str) -> str:
    """'model' (a GPT-2 weight), 'lora' (an unmerged adapter), 'buffer' (causal-mask placeholders), 'optimizer'
    or 'bookkeeping'."""
    if MS_LORA.fullmatch(name):
        return "lora"
    if MS_LAYER.fullmatch(name) and MS_LAYER.fullmatch(name).group(2) in MS_MASK_BUFFERS:
        return "buffer"
    if name.startswith(MS_MODEL_PREFIXES):
        return "model"
    if name.startswith(MS_OPTIMIZER_PREFIXES):
        return "optimizer"
    return "bookkeeping"


def skipped_summary(skipped: dict[str, list[str]]) -> str:
    """One line naming what a conversion left out, e.g. 'skipped 50: 48 optimizer states (adam_m.*, ...)'."""
    if not any(skipped.values()):
        return "skipped nothing"
    labels = {"optimizer": "optimizer states", "bookkeeping": "bookkeeping entries", "buffer": "mask buffers"}
    parts = []
    for kind, names in skipped.items():
        if names:
            groups = sorted({n.split(".", 1)[0] + (".*" if "." in n else "") for n in names})
            shown = ", ".join(groups[:4]) + (", ..." if len(groups) > 4 else "")
            parts.append(f"{len(names)} {labels[kind]} ({shown})")
    return f"skipped {sum(map(len, skipped.values()))}: " + "; ".join(parts)


def preset_for_width(n_embd: int) -> str | None:
    """The MindFormers preset with this hidden size (each preset's width is unique)."""
    names = [name for name, p in PRESETS.items() if p["n_embd"] == n_embd]
    return names[0] if len(names) == 1 else None


def read_recipe_shape(path: str) -> dict:
    """What a MindFormers recipe (run_gpt2_xxx.yaml) says about the model's shape, from model.model_config:
    {n_head, n_layer, n_embd, vocab_size, activation} for the keys it sets."""
    import yaml
    try:
        path = recipe_path(path, "--config")  # a file, or a packaged recipe's name
        with open(path, encoding="utf-8") as f:
            recipe = yaml_load(f.read(), f"--config {path}")  # bounded: an alias bomb is one line
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path} is not a readable YAML recipe ({str(e).splitlines()[0]})") from None
    model_config = ((recipe or {}).get("model") or {}).get("model_config") if isinstance(recipe, dict) else None
    if not isinstance(model_config, dict) or "num_heads" not in model_config:
        raise ValueError(f"--config {path} has no model.model_config.num_heads: pass a MindFormers GPT-2 recipe "
                         f"(e.g. run_gpt2_13b.yaml) or --n_head")
    shape = {}
    for key, ours in (("num_heads", "n_head"), ("num_layers", "n_layer"), ("hidden_size", "n_embd"),
                      ("vocab_size", "vocab_size")):
        if key in model_config:
            value = model_config[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
                raise ValueError(f"--config {path}: model.model_config.{key} must be an integer in [1, {MAX_SIZE}], "
                                 f"got {value!r}")
            shape[ours] = value
    act = model_config.get("hidden_act")
    if act is not None:
        if act not in MINDFORMERS_ACTIVATIONS:
            raise ValueError(f"--config {path}: model.model_config.hidden_act {act!r} is not one of "
                             f"{', '.join(MINDFORMERS_ACTIVATIONS)}")
        shape["activation"] = MINDFORMERS_ACTIVATIONS[act]
    return shape


def shape_beside(path: str) -> tuple[dict, str] | None:
    """(the shape {n_head, n_layer, n_embd, vocab_size, activation}, the file) of the config.json beside a .ckpt
    file (an HF export or a training run's config of the same model), or None: what a .ckpt does not store (its
    heads, its activation) then comes from there."""
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else None
    file = os.path.join(folder, "config.json") if folder else None
    if not file or not os.path.isfile(file):
        return None
    config = GPT2Config.from_json_file(file)  # checked field by field: a bad one is one line naming the file
    return dict(n_head=config.n_head, n_layer=config.n_layer, n_embd=config.n_embd, vocab_size=config.vocab_size,
                activation=config.activation), file


RECIPE_FIELDS = dict(n_layer="model.model_config.num_layers", n_embd="model.model_config.hidden_size",
                     vocab_size="model.model_config.vocab_size", n_head="model.model_config.num_heads")
CONFIG_FIELDS = dict(n_layer="n_layer", n_embd="n_embd", vocab_size="vocab_size", n_head="n_head")


def infer_config(shapes: dict[str, tuple], n_head: int | None = None, activation: str | None = None,
                 recipe: dict | None = None, recipe_path: str = "--config", fields: dict = RECIPE_FIELDS,
                 described: dict | None = None, given_as: str = "--n_head"):
    """GPT2Config from MindFormers tensor shapes -> (config, classifier?, how the heads were chosen).

    Layers, hidden, vocab, positions and the MLP width come from the tensors; the number of heads is not in
    them, so it is `n_head`, or the recipe's num_heads (`recipe`: read_recipe_shape, or a config.json beside the
    file: shape_beside, named by `fields`; its other sizes must match the tensors), or a run recipe's model when it
    has the tensors' width (`described`: {n_embd, n_head, activation, source}), or the preset of the same width (else
    an error saying where the heads can come from).
    """
    for required in (WTE, WPE, "backbone.layernorm.gamma"):
        if required not in shapes:
            raise ValueError(f"no {required!r} in the checkpoint: not a MindFormers GPT-2 checkpoint")
    vocab_size, n_embd = shapes[WTE]
    n_positions = shapes[WPE][0]
    n_layer = layer_count(shapes, MS_LAYER)
    if n_layer == 0:
        raise ValueError("the checkpoint has no backbone.blocks.{i}.* tensors: not a MindFormers GPT-2 checkpoint")
    mapping = shapes.get("backbone.blocks.0.output.mapping.weight")
    if mapping is None:
        raise ValueError("missing tensor 'backbone.blocks.0.output.mapping.weight'")
    n_inner = mapping[1] if mapping[1] != 4 * n_embd else None
    recipe = recipe or {}
    found = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size)
    for key, value in found.items():
        if key in recipe and recipe[key] != value:
            raise ValueError(f"{recipe_path} says {fields[key]}={recipe[key]} but the checkpoint has {value}: is it "
                             f"the {'recipe' if fields is RECIPE_FIELDS else 'config'} this checkpoint was trained "
                             f"with?")
    if n_head is not None and "n_head" in recipe and recipe["n_head"] != n_head:
        raise ValueError(f"--n_head {n_head} but {recipe_path} says {fields['n_head']}={recipe['n_head']}: pass one "
                         f"of them")
    preset = preset_for_width(n_embd)
    if not recipe and described and described["n_embd"] == n_embd:  # a run's recipe that describes this model
        recipe, recipe_path = described, described["source"]
    if n_head is not None:
        source = given_as
    elif "n_head" in recipe:
        n_head, source = recipe["n_head"], recipe_path
    elif preset is not None:
        n_head, source = PRESETS[preset]["n_head"], f"preset {preset!r}"
    else:
        raise ValueError(f"cannot tell the number of attention heads of a {n_embd}-wide model: a .ckpt does not "
                         f"store it and no preset has that width; give it (--n_head, a recipe's "
                         f"model.model_config.num_heads, --config RECIPE.yaml, or a config.json beside the file)")
    if activation is None:
        activation = recipe.get("activation") or (PRESETS[preset]["activation"] if preset else "gelu_new")
    if n_embd % n_head:
        raise ValueError(f"{n_head} heads ({source}) do not divide the hidden size {n_embd}: give the model's own "
                         f"number of heads")
    classifier = "score.weight" in shapes
    special = min(50256, vocab_size - 1)  # GPT-2's <|endoftext|> is the last id of its vocabulary
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, n_inner=n_inner, activation=activation,
                        num_labels=shapes["score.weight"][0] if classifier else 2,
                        eos_token_id=special, bos_token_id=special, pad_token_id=special)
    return config, classifier, source


def shape_line(config: GPT2Config, heads_from: str) -> str:
    """The shape a conversion uses, in one line (printed first, so a wrong head count is seen at once)."""
    return (f"shape: {config.n_layer} layers, hidden {config.n_embd}, {config.n_head} heads (from {heads_from}), "
            f"vocab {config.vocab_size}, positions {config.n_positions}, MLP {config.inner_dim}, "
            f"activation {config.activation}")


def check_shapes(found: dict[str, tuple], expected: dict[str, tuple], source: str):
    """Missing, unexpected or misshapen tensors: one error naming the first."""
    missing = [n for n in expected if n not in found]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} in all)")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        hint = " (LoRA weights: merge them first)" if "lora" in unexpected[0].lower() else ""
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r}{hint}; is this a GPT-2 checkpoint?")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(found[name])} but a GPT-2 with these "
                             f"sizes needs {tuple(shape)}")
