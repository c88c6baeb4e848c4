"""A fresh model's initial weights, on every path a run builds one: one process (train.run.model_from_spec), the
meta-device init of distributed runs (train.run.build_meta_model + parallel.materialize), and a pipeline
stage built that way. The oracle is the scheme's definition, checked tensor by tensor: each weight's sample std
within a few percent of what the scheme says, biases zero, LayerNorms ones / zeros, the vocabulary's padding
rows zero; then the first optimizer steps have a gradient and lower the loss.

A scheme is one entry of SCHEMES: the recipe overrides that select it and the std it gives each weight."""
import math

import pytest
import torch
import torch.nn as nn

from gpt2_ascend.data.loader import causal_lm_inputs
from gpt2_ascend.parallel.materialize import materialize
from gpt2_ascend.parallel.pipeline import pipeline_stage
from gpt2_ascend.train import Trainer, TrainSettings
from gpt2_ascend.train.job import job_from_recipe
from gpt2_ascend.train.optim import LRSchedule, build_optimizer
from gpt2_ascend.train.recipe import load_recipe
from gpt2_ascend.train.run import build_meta_model, model_from_spec

INIT_RANGE = 0.03  # not the default 0.02, so a hard-coded std shows
VOCAB, PADDED = 500, 512  # pad_vocab_size_multiple=64: twelve padding rows


def hf_std(name: str, config) -> float:
    """HF's (and nanoGPT's) GPT-2 init: N(0, initializer_range), residual projections (attn.c_proj and
    mlp.c_proj, which write into the residual stream) scaled by 1/sqrt(2 n_layer)."""
    residual = name.endswith("c_proj.weight")
    return config.initializer_range / (math.sqrt(2 * config.n_layer) if residual else 1.0)


def mindformers_std(name: str, config) -> float:
    """MindFormers' GPT-2 init (MindSpore's normal): N(0, initializer_range) for every weight, both embeddings
    and the heads included, no residual scaling (its recipes leave initializer_range at 0.01)."""
    return config.initializer_range


# scheme -> (recipe overrides that select it, the std of each weight by parameter name)
SCHEMES = {
    "hf": ([], hf_std),
    "mindformers": (["model.model_config.init_style=mindformers"], mindformers_std),
}


def recipe_for(arch: str, scheme: str):
    overrides, _ = SCHEMES[scheme]
    mc = dict(vocab_size=VOCAB, pad_vocab_size_multiple=64, hidden_size=128, num_layers=3, num_heads=4,
              seq_length=32, initializer_range=INIT_RANGE, num_labels=16, eos_token_id=VOCAB - 1,
              pad_token_id=VOCAB - 1, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    return load_recipe(None, [f"model.arch.type={arch}", *(f"model.model_config.{k}={v}" for k, v in mc.items()),
                              *overrides])


def fresh_modules(path: str, recipe) -> list[nn.Module]:
    """What a run on `path` trains: the whole model, or each pipeline stage (parameters under full names)."""
    torch.manual_seed(0)
    if path == "single":
        return [model_from_spec(job_from_recipe(recipe).model, torch.device("cpu"), log=lambda *_: None)]
    model, source = build_meta_model(job_from_recipe(recipe).model, {}, log=lambda *_: None)
    assert source is None and model.device.type == "meta"
    parts = [model] if path == "meta" else [pipeline_stage(model, s, 2) for s in range(2)]
    for part in parts:
        materialize(part, model.config, torch.device("cpu"), None)
    return parts


def init_problems(module: nn.Module, config, expected_std) -> list[str]:
    """Every way `module`'s weights differ from a fresh init: one line per tensor, with the numbers."""
    problems, seen = [], set()
    for module_name, m in module.named_modules():
        for short, p in m.named_parameters(recurse=False):
            if id(p) in seen:  # a tied head is the embedding: checked once
                continue
            seen.add(id(p))
            name, w = f"{module_name}.{short}", p.detach()
            if isinstance(m, nn.LayerNorm) or short == "bias":
                want = 1.0 if isinstance(m, nn.LayerNorm) and short == "weight" else 0.0
                if not torch.all(w == want):
                    off = (w - want).abs().max()
                    problems.append(f"{name}: should be all {want:g}, max |w - {want:g}| = {off:.3g}")
                continue
            if name.endswith(("wte.weight", "lm_head.weight")):
                if w.size(0) != config.padded_vocab_size or w[config.vocab_size:].abs().max() > 0:
                    problems.append(f"{name}: the {w.size(0) - config.vocab_size} padding rows are not zero "
                                    f"(max |w| {w[config.vocab_size:].abs().max():.3g})")
                w = w[:config.vocab_size]
            want, n = expected_std(name, config), w.numel()
            # a sample std's relative standard error is 1/sqrt(2n): allow 4 of them, and at least 3%
            tolerance = max(0.03, 4 / math.sqrt(2 * n))
            std, mean = w.std().item(), w.mean().item()
            if abs(std / want - 1) > tolerance:
                problems.append(f"{name}: std {std:.5f}, expected {want:.5f} (off by {abs(std / want - 1):.1%}, "
                                f"tolerance {tolerance:.1%})")
            if abs(mean) > 4 * want / math.sqrt(n):
                problems.append(f"{name}: mean {mean:.3g}, expected 0 (within {4 * want / math.sqrt(n):.2g})")
    return problems


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GPT2ForSequenceClassification"])
@pytest.mark.parametrize("path", ["single", "meta", "pipeline_stage"])
def test_fresh_init_follows_the_scheme(path, arch, scheme):
    recipe = recipe_for(arch, scheme)
    parts = fresh_modules(path, recipe)
    config = parts[0].config
    assert (config.initializer_range, config.vocab_size, config.padded_vocab_size) == (INIT_RANGE, VOCAB, PADDED)
    problems = [line for part in parts for line in init_problems(part, config, SCHEMES[scheme][1])]
    assert not problems, "\n".join(problems)
    checked = {n for part in parts for n, _ in part.named_parameters()}
    assert any(n.endswith("mlp.c_proj.weight") for n in checked) and any(n.endswith("ln_f.weight") for n in checked)
    if arch == "GPT2LMHeadModel" and path != "pipeline_stage":  # (a pipeline's last stage holds a copy)
        assert parts[0].lm_head.weight is parts[0].transformer.wte.weight, "the head is no longer tied"
    assert ("score.weight" in checked) == (arch == "GPT2ForSequenceClassification")


def first_steps(model: nn.Module, task: str, steps: int = 5):
    """Losses and gradient norms of `steps` AdamW steps on one fixed batch (a fresh model can fit it)."""
    g = torch.Generator().manual_seed(0)
    if task == "lm":
        batch = causal_lm_inputs(torch.randint(0, VOCAB, (4, 33), generator=g))
    else:
        batch = {"input_ids": torch.randint(0, VOCAB, (8, 32), generator=g),
                 "attention_mask": torch.ones(8, 32, dtype=torch.long), "labels": torch.arange(8) % 16}
    trainer = Trainer(model, build_optimizer(model, 3e-3), LRSchedule("constant", 3e-3, 0.0, 0, steps), loader=None,
                      device=torch.device("cpu"),
                      settings=TrainSettings(total_steps=steps, max_grad_norm=1.0, progress=False))
    outs = [trainer.train_step([batch]) for _ in range(steps)]
    return [o["loss"].item() for o in outs], [o["grad_norm"].item() for o in outs]


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GPT2ForSequenceClassification"])
@pytest.mark.parametrize("path", ["single", "meta"])
def test_fresh_model_has_gradients_and_learns(path, arch, scheme):
    """An all-zero init gives loss log(vocab) and a zero gradient forever; a broken one does not learn."""
    model, = fresh_modules(path, recipe_for(arch, scheme))
    lm = arch == "GPT2LMHeadModel"
    losses, norms = first_steps(model, "lm" if lm else "txtcls")
    assert abs(losses[0] - math.log(VOCAB if lm else 16)) < 0.5, losses  # small weights: ~uniform predictions
    assert min(norms) > 0.5, norms  # measured 2.6 and more
    assert losses[-1] < losses[0] - 1.0, losses  # measured: falls by 2 and more in 5 steps
