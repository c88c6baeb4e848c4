"""MindFormers' numerics pieces one by one: its lr schedules, clipping, loss-scale floor, the schedule not moving
on skipped steps, MindSpore's optimizer resumed bit-exactly, its init, and the global batch by accumulation.
(The whole of it against a real MindFormers run: test_mindformers_reference.py.)"""
import json
import math
import os

import numpy as np
import pytest
import torch

from gpt2_ascend import GPT2Config, GPT2LMHeadModel
from gpt2_ascend.data.loader import StepLoader, causal_lm_inputs
from gpt2_ascend.parallel.clip import clip_by_global_norm, clip_coefficient
from gpt2_ascend.train.metrics import MetricsLogger
from gpt2_ascend.train.optim import LRSchedule, build_optimizer
from gpt2_ascend.train.recipe import load_recipe
from gpt2_ascend.train import Trainer, TrainSettings, run_training
from gpt2_ascend.train.run import accumulation_steps

from conftest import tiny_config

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# schedules: MindFormers r1.3.0's docstring examples and its branch order
# ---------------------------------------------------------------------------------------------
def test_schedules_give_mindformers_documented_values():
    # mindformers/core/lr/lr_schedule.py examples (learning_rate 0.005, warmup 10, total 20)
    cosine = LRSchedule("cosine", learning_rate=0.005, lr_end=0.0, warmup_steps=10, total_steps=20)
    assert cosine(1) == pytest.approx(0.0005) and cosine(15) == pytest.approx(0.0025, abs=1e-9)
    constant = LRSchedule("constant", learning_rate=0.005, lr_end=0.0, warmup_steps=10, total_steps=20)
    assert constant(1) == pytest.approx(0.0005) and constant(15) == 0.005
    # the reference run's polynomial values (../shared/mindformers_reference/losses.json "lr")
    poly = LRSchedule("polynomial", learning_rate=1e-3, lr_end=1e-5, warmup_steps=2, total_steps=5)
    assert [poly(t) for t in range(5)] == pytest.approx([0.0, 5e-4, 1e-3, 6.7e-4, 3.4e-4])


def test_warmup_ramps_from_warmup_lr_init():
    """MindFormers' warmup: warmup_lr_init + (learning_rate - warmup_lr_init) * t / w, every schedule type (a ramp
    from 0 agrees with it only when warmup_lr_init is 0, as it is in every shipped recipe)."""
    for kind in ("polynomial", "cosine", "constant"):
        s = LRSchedule(kind, learning_rate=1e-3, lr_end=1e-5, warmup_steps=4, total_steps=20, warmup_lr_init=2e-4)
        assert [s(t) for t in range(5)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rel=1e-9), kind


def test_schedule_branch_order_follows_mindformers():
    # cosine checks t >= total_steps before warmup: a warmup longer than the run ends at lr_end
    assert LRSchedule("cosine", 1e-3, 1e-5, warmup_steps=10, total_steps=5)(6) == 1e-5
    # polynomial checks warmup first, and holds lr_end only after total_steps
    poly = LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=10, total_steps=5)
    assert poly(6) == pytest.approx(6e-4) and poly(11) == 1e-5
    assert LRSchedule("polynomial", 1e-3, 1e-5, 0, 4)(4) == pytest.approx(1e-5)
    assert load_recipe(None, ["lr_schedule.type=constant_with_warmup"]).lr_schedule.type == "constant"


# ---------------------------------------------------------------------------------------------
# MFTrainOneStepCell: clipping and the loss scale
# ---------------------------------------------------------------------------------------------
def test_mindformers_clip_formula():
    under, over = torch.tensor(0.5), torch.tensor(4.0)
    # ClipGradNorm: max / (max(norm, max) + 1e-6): gradients under the limit shrink by max / (max + 1e-6) too
    assert clip_coefficient(under, 1.0, "mindspore").item() == pytest.approx(1.0 / (1.0 + 1e-6), rel=1e-7)
    assert clip_coefficient(under, 1.0, "torch").item() == 1.0
    assert clip_coefficient(over, 1.0, "mindspore").item() == pytest.approx(1.0 / (4.0 + 1e-6), rel=1e-7)
    # torch's clip_grad_norm_: max / (norm + 1e-6), capped at 1; at a tiny norm the 1e-6 is a fifth of the result
    tiny = torch.tensor(1e-5)
    assert clip_coefficient(tiny, 1e-6, "torch").item() == pytest.approx(1e-6 / (1e-5 + 1e-6), rel=1e-6)
    assert clip_coefficient(tiny, 1e-6, "mindspore").item() == pytest.approx(1e-6 / (1e-5 + 1e-6), rel=1e-6)
    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((4,), 2.0)
    norm = clip_by_global_norm(params, 1.0, "mindspore")
    assert norm.item() == pytest.approx(math.sqrt(32))
    assert params[0].grad[0].item() == pytest.approx(2.0 / (math.sqrt(32) + 1e-6), rel=1e-6)


def _trainer(model, data, schedule, rule="mindspore", **settings):
    loader = StepLoader(causal_lm_inputs(data), batch_size=4, shuffle=False)
    optimizer = build_optimizer(model, schedule(0), update_rule=rule)
    settings = TrainSettings(**{"total_steps": 4, "progress": False, "step_rule": rule, **settings})
    return Trainer(model, optimizer, schedule, loader, CPU, settings)


def _blocks(rows=8, width=17, seed=0):
    return np.random.default_rng(seed).integers(0, 512, (rows, width)).astype(np.int32)


def test_an_overflowed_step_does_not_advance_the_schedule_and_the_scale_stays_at_least_one():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    schedule = LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=2, total_steps=10, warmup_lr_init=1e-4)
    trainer = _trainer(model, _blocks(), schedule, precision="fp16", loss_scale=2.0 ** 40, scale_factor=2.0 ** 20)
    used = []
    # a post-hook after the rule's own sees the schedule's lr again (during the step the group holds torch's)
    trainer.optimizer.register_step_post_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    for _ in range(4):
        trainer.train_step(next(trainer.loader))
    # 2^40 overflows fp16, so does 2^20; 1 does not: two skipped steps, then updates at lr(0) and lr(1)
    assert trainer.step == 4 and trainer.updates == 2
    assert used == pytest.approx([schedule(0), schedule(1)])
    assert trainer.scaler.get_scale() == 1.0
    state = trainer.trainer_state()
    assert (state["step"], state["updates"]) == (4, 2)


def test_metrics_log_the_lr_each_step_applied_across_overflowed_steps():
    """fp16 with two forced overflows (a loss scale of 2^60, then 2^30: far past fp16's 65504 on any machine): the
    skipped steps do not advance the schedule, so from then on the step counter runs ahead of the updates.
    metrics.jsonl's lr is the lr the optimizer applied at that step (a skipped step: the one it would have applied,
    which the next step applies)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    schedule = LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=3, total_steps=6, warmup_lr_init=1e-4)
    trainer = _trainer(model, _blocks(), schedule, total_steps=6, log_interval=1, precision="fp16",
                       loss_scale=2.0 ** 60, scale_factor=2.0 ** 30)
    applied = []  # after the rule's own post-hook the group holds the schedule's lr again
    trainer.optimizer.register_step_post_hook(lambda opt, *_: applied.append(opt.param_groups[0]["lr"]))
    metrics = MetricsLogger(None, start_step=0, total_steps=6, resumed=False, progress=False)
    trainer.train(metrics)
    records = metrics.records
    assert [r["skipped"] for r in records] == [True, True, False, False, False, False]
    assert applied == pytest.approx([schedule(t) for t in range(4)], rel=1e-9)
    assert [r["lr"] for r in records] == pytest.approx(applied[:1] * 2 + applied, rel=1e-9)


def test_loss_scale_floor_is_mindspore_only():
    torch.manual_seed(0)
    for rule, floor in (("mindspore", 1.0), ("torch", 2.0 ** -20)):
        model = GPT2LMHeadModel(tiny_config())
        trainer = _trainer(model, _blocks(), LRSchedule("constant", 1e-3, 0.0, 0, 4), rule=rule, precision="fp16",
                           loss_scale=1.0, scale_factor=2.0 ** 20)
        with torch.no_grad():
            model.transformer.wte.weight[0, 0] = float("inf")  # every step overflows
        trainer.train_step(next(trainer.loader))
        assert trainer.scaler.get_scale() == floor, rule


# ---------------------------------------------------------------------------------------------
# the optimizer: MindSpore's rule inside torch's AdamW, resumable bit-exactly
# ---------------------------------------------------------------------------------------------
def _recipe(tmp_path, data, *overrides):
    base = dict(output_dir=str(tmp_path / "out"), device="cpu",
                runner_config=dict(batch_size=4, max_steps=6, progress_bar=False),
                model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=32, num_layers=2,
                                             num_heads=2, eos_token_id=511, pad_token_id=511,
                                             hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                                             init_style="mindformers")),
                optimizer=dict(type="FusedAdamWeightDecay"),
                lr_schedule=dict(learning_rate=1e-3, lr_end=1e-4, warmup_steps=2),
                train_dataset=dict(data_loader=dict(dataset_dir=str(data))),
                callbacks=dict(MFLossMonitor=dict(per_print_times=1),
                               CheckpointMonitor=dict(save_checkpoint_steps=3, keep_checkpoint_max=2)))
    return load_recipe(None, list(overrides), base=base)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, _blocks(rows=64, seed=1).astype(np.uint16))
    return path


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, f)]


@pytest.mark.parametrize("rule", ["mindspore", "torch"])
def test_weight_decay_alone_shrinks_exactly_the_decayed_weights(rule):
    """With zero gradients (Adam's moments stay 0) a step is the decay term alone: every 2-D weight becomes
    p (1 - lr wd) each step, in both rules (MindSpore's wd p inside the update; torch's decoupled decay), and biases
    and LayerNorms do not move. The moments' part of an update is ~lr per weight whatever its size, so through
    training a wrong decay term hides behind it (lr wd p ~ 1e-6 against updates of 1e-3)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5, update_rule=rule)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    for name, p in model.named_parameters():
        decayed = p.ndim == 2
        expected = before[name] * (1 - 0.1 * 0.5) ** 3 if decayed else before[name]
        assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=0), name
        assert decayed == ("weight" in name and "ln" not in name), name


def test_mindspore_rule_resumes_bit_exactly_and_refuses_another_rule(tmp_path, token_file):
    from gpt2_ascend.hf import read_state_dict
    recipe = _recipe(tmp_path, token_file)
    run_training(recipe, log=lambda *_: None)
    full, weights = _losses(recipe.output_dir), read_state_dict(os.path.join(recipe.output_dir, "final"))
    from gpt2_ascend.checkpoints import load_checkpoint
    saved = load_checkpoint(os.path.join(recipe.output_dir, "checkpoint", "step_0000003"), ["optimizer"])["optimizer"]
    assert [(g["update_rule"], g["mindspore_step"]) for g in saved["param_groups"]] == [("mindspore", 3)] * 2
    assert saved["param_groups"][0]["lr"] == pytest.approx(full[2][2])  # the schedule's lr, not torch's stand-in
    import shutil
    shutil.rmtree(os.path.join(recipe.output_dir, "checkpoint", "step_0000006"))
    run_training(load_recipe(None, ["resume_training=auto"], base=recipe), log=lambda *_: None)
    assert _losses(recipe.output_dir) == full  # steps 4-6 again, bit-identical
    again = read_state_dict(os.path.join(recipe.output_dir, "final"))
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    other = load_recipe(None, ["resume_training=auto", "optimizer.type=AdamW"], base=recipe)
    with pytest.raises(ValueError, match="trained with mindspore's update rule .* optimizer.type=FusedAdamWeightDecay"):
        run_training(other, log=lambda *_: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mindspore_rule_on_gpu_matches_cpu(monkeypatch):
    """CUDA's fused AdamW kernel under MindSpore's rule trains like the CPU's foreach one (which matches
    MindFormers itself: test_mindformers_reference.py), with clipping active, fp32 matmuls."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    data = _blocks(rows=24, seed=3)
    torch.manual_seed(0)
    start = GPT2LMHeadModel(tiny_config(init_style="mindformers", initializer_range=0.01)).state_dict()
    runs = {}
    for device in ("cpu", "cuda"):
        model = GPT2LMHeadModel(tiny_config()).to(device)
        model.load_state_dict(start)
        schedule = LRSchedule("polynomial", 1e-2, 1e-4, warmup_steps=2, total_steps=6)
        optimizer = build_optimizer(model, schedule(0), device_type=device, update_rule="mindspore")
        settings = TrainSettings(total_steps=6, progress=False, step_rule="mindspore", max_grad_norm=0.5)
        trainer = Trainer(model, optimizer, schedule, StepLoader(causal_lm_inputs(data), batch_size=4, shuffle=False),
                          torch.device(device), settings)
        losses = [trainer.train_step(next(trainer.loader))["loss"].item() for _ in range(6)]
        runs[device] = losses, {k: v.cpu() for k, v in model.state_dict().items()}
    assert max(abs(a - b) for a, b in zip(runs["cpu"][0], runs["cuda"][0])) < 1e-5
    assert max((runs["cpu"][1][k] - runs["cuda"][1][k]).abs().max().item() for k in start) < 1e-5


# ---------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------
def test_mindformers_init_style():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=2048, init_style="mindformers",
                        initializer_range=0.01)
    model = GPT2LMHeadModel(config)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "ln_" in name:
            assert torch.all(p == 1), name
        else:  # both embeddings, every Linear weight, the residual projections unscaled
            assert p.std().item() == pytest.approx(0.01, rel=0.05), name
    hf = GPT2LMHeadModel(config.replace(init_style="hf", initializer_range=0.02))
    assert hf.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert GPT2Config.from_hf_dict(config.to_hf_dict()).init_style == "mindformers"
    recipe = load_recipe(None, ["model.model_config.init_style=mindformers"])
    from gpt2_ascend.train.recipe import gpt2_config
    assert (gpt2_config(recipe).init_style, gpt2_config(recipe).initializer_range) == ("mindformers", 0.01)
    assert gpt2_config(load_recipe(None)).initializer_range == 0.02


# ---------------------------------------------------------------------------------------------
# global batch
# ---------------------------------------------------------------------------------------------
def test_global_batch_sets_the_accumulation(tmp_path, token_file):
    from gpt2_ascend.train.recipe import Recipe
    rc = Recipe(batch_size=4, gradient_accumulation_steps=1, global_batch_size=32)
    lines = []
    assert accumulation_steps(rc, 1, lines.append) == 8 and accumulation_steps(rc, 8, lines.append) == 1
    assert lines[0] == "global batch 32 = batch_size 4 x 1 data-parallel rank(s) x 8 gradient accumulation step(s)"
    with pytest.raises(ValueError, match="not a multiple of batch_size 4 x 3 data-parallel rank"):
        accumulation_steps(rc, 3)
    with pytest.raises(ValueError, match="gradient_accumulation_steps 2 contradicts global_batch_size 32"):
        accumulation_steps(Recipe(rc, gradient_accumulation_steps=2), 1)
    # a run with batch 2 x 4 accumulated equals the same run with batch 8
    messages = []
    accumulated = _recipe(tmp_path, token_file, "runner_config.batch_size=2", "runner_config.global_batch_size=8",
                          "runner_config.max_steps=3", "output_dir=" + str(tmp_path / "acc"))
    run_training(accumulated, log=messages.append)
    assert any("global batch 8 = batch_size 2 x 1 data-parallel rank(s) x 4" in m for m in messages)
    said = [m for m in messages if m.startswith("training ")]  # the training line names each factor of a step
    assert len(said) == 1 and ": 3 steps of 8 sequences each (batch_size 2 x gradient accumulation 4 x 1 " \
                              "data-parallel replica), " in said[0], said
    whole = _recipe(tmp_path, token_file, "runner_config.batch_size=8", "runner_config.max_steps=3",
                    "output_dir=" + str(tmp_path / "whole"))
    run_training(whole, log=lambda *_: None)
    got, want = _losses(accumulated.output_dir), _losses(whole.output_dir)
    assert max(abs(a[1] - b[1]) for a, b in zip(got, want)) < 1e-5


def test_optimizer_bench_runs(capsys):
    from conftest import load_script
    bench = load_script("bench/optimizer.py")
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "0",
                       "--variants", "torch_foreach,mindspore_foreach,mindspore_handwritten"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["variant"] for line in lines] == ["torch_foreach", "mindspore_foreach", "mindspore_handwritten",
                                                   "mindspore_rule_hooks_alone"]
    assert lines[1]["vs_torch_same_kernel"] > 0 and lines[3]["us_per_step"] > 0


# ---------------------------------------------------------------------------------------------
# MindFormers keys met replaying its runs (issue 25): CosineWithWarmUpLR's num_cycles / decay_steps / warmup_ratio,
# scale_sense as a number or FixedLossScaleUpdateCell
# ---------------------------------------------------------------------------------------------
def mindformers_cosine(t, lr, lr_end, warmup, total, num_cycles=0.5, decay=None):
    """CosineWithWarmUpLR.construct (mindformers r1.3.0 core/lr/lr_schedule.py), written out."""
    if t >= (max(1, decay) if decay is not None else max(1, total)):
        return lr_end
    if t < warmup:
        return lr * t / warmup
    progress = (t - warmup) / max(1, total - warmup)
    return lr_end + (lr - lr_end) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))


def test_cosine_num_cycles_decay_steps_and_warmup_ratio_from_a_recipe():
    recipe = load_recipe(None, ["lr_schedule={type: CosineWithWarmUpLR, learning_rate: 0.005, lr_end: 0.0001, "
                                "warmup_ratio: 0.25, num_cycles: 1.5, decay_steps: 37}"])
    from gpt2_ascend.train.job import job_from_recipe
    schedule = job_from_recipe(recipe).optimizer.schedule(steps_per_epoch=40, epochs=1, max_steps=None)
    assert schedule.warmup_steps == 10  # int(40 * 0.25): warmup_ratio replaces warmup_steps
    want = [mindformers_cosine(t, 0.005, 0.0001, 10, 40, num_cycles=1.5, decay=37) for t in range(42)]
    assert [schedule(t) for t in range(42)] == pytest.approx(want, abs=1e-12)
    assert schedule(20) == pytest.approx(0.0001 + 0.0049 * 0.5 * (1 + math.cos(math.pi * 1.5 * 2 * 10 / 30)))
    assert schedule(37) == 0.0001 and schedule(36) > 0.0001  # lr_end from decay_steps on
    # polynomial: decay_steps is the decay's length; a constant schedule has none, num_cycles is cosine's only
    poly = LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=2, total_steps=8, decay_steps=10)
    assert poly(4) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - 2 / 10))
    for bad in ("lr_schedule.type=constant lr_schedule.decay_steps=5", "lr_schedule.num_cycles=1.0",
                "lr_schedule.warmup_ratio=1.5"):
        with pytest.raises(ValueError, match=bad.split()[-1].split("=")[0]):
            load_recipe(None, bad.split())
    with pytest.raises(ValueError, match="decay_steps 3 ends the polynomial decay"):
        LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=2, total_steps=8, decay_steps=3)


@pytest.mark.parametrize("scale_sense", ["1024.0", "{type: FixedLossScaleUpdateCell, loss_scale_value: 1024}"])
def test_fixed_loss_scale_keeps_its_value_and_skips_overflows(scale_sense):
    """MindFormers accepts runner_wrapper.scale_sense as a number or FixedLossScaleUpdateCell: the scale never
    changes, and an overflowing step is skipped (MindSpore's TrainOneStepWithLossScaleCell)."""
    from gpt2_ascend.train.job import job_from_recipe
    settings = job_from_recipe(load_recipe(None, [f"runner_wrapper.scale_sense={scale_sense}"])).settings
    assert settings.loss_scale_fixed and settings.loss_scale == 1024.0
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    trainer = _trainer(model, _blocks(), LRSchedule("constant", 1e-3, 0.0, 0, 4), precision="fp16",
                       loss_scale=settings.loss_scale, loss_scale_fixed=True, scale_window=1)
    trainer.train_step(next(trainer.loader))  # scale_window 1: a dynamic scale would double here
    assert trainer.updates == 1 and trainer.scaler.get_scale() == 1024.0
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("inf")  # every step overflows now
    trainer.train_step(next(trainer.loader))
    assert trainer.updates == 1 and trainer.scaler.get_scale() == 1024.0  # skipped, the scale unchanged
