"""Recipes, schedules, parameter groups, the step loader, checkpoint files and metrics files."""
import glob
import json
import math
import os

import numpy as np
import pytest
import torch

from gpt2_ascend.data.loader import StepLoader
from gpt2_ascend import checkpoints as ckpt
from gpt2_ascend.train.metrics import flops_per_token, peak_flops, read_metrics, truncate_metrics
from gpt2_ascend.train.optim import LRSchedule, build_optimizer, param_groups, resolve_total_steps
from gpt2_ascend.train.recipe import generation_config, gpt2_config, load_recipe

from conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "gpt2", "*.yaml")))


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------
def test_every_shipped_recipe_loads():
    names = {os.path.basename(p)[:-5] for p in RECIPES}
    assert {"pretrain_gpt2_small", "pretrain_gpt2_13b", "finetune_gpt2_small", "finetune_gpt2_small_lora",
            "finetune_gpt2_small_txtcls", "predict_gpt2_small", "pretrain_gpt2_tiny", "finetune_gpt2_tiny_lora",
            "finetune_gpt2_tiny_txtcls"} <= names
    for path in RECIPES:
        recipe = load_recipe(path)
        gpt2_config(recipe)  # every model section maps to a valid GPT2Config


def test_recipes_carry_mindformers_values():
    small = load_recipe(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_small.yaml"))
    assert (small.runner_config.batch_size, small.runner_config.epochs, small.runner_config.global_batch_size) == \
        (4, 3, 32)  # MindFormers: 4 per device on data_parallel 8
    assert (small.optimizer.type, small.model.model_config.init_style) == ("FusedAdamWeightDecay", "mindformers")
    assert small.lr_schedule == dict(type="polynomial", learning_rate=1e-4, lr_end=1e-5, warmup_steps=0,
                                     warmup_lr_init=0.0, power=1.0, total_steps=-1, warmup_ratio=None,
                                     num_cycles=0.5, decay_steps=None)
    assert (small.optimizer.beta1, small.optimizer.beta2, small.optimizer.eps, small.optimizer.weight_decay) == \
        (0.9, 0.95, 1e-8, 0.1)
    cfg = gpt2_config(small)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.activation) == (12, 768, 12, 1024, "gelu_new")

    big = load_recipe(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_13b.yaml"))
    p = big.parallel
    assert (p.data_parallel, p.model_parallel, p.pipeline_stage, p.optimizer_shard, p.recompute) == (4, 8, 1, True, "full")
    assert (big.lr_schedule.learning_rate, big.lr_schedule.lr_end, big.lr_schedule.warmup_steps) == (5e-5, 1e-6, 2000)
    assert big.runner_config.global_batch_size == 8
    cfg = gpt2_config(big)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.activation) == (40, 5120, 40, 2048, "fast_gelu")

    ft = load_recipe(os.path.join(REPO, "configs/gpt2/finetune_gpt2_small.yaml"), ["load_checkpoint=x"])
    assert (ft.lr_schedule.type, ft.lr_schedule.learning_rate, ft.lr_schedule.lr_end) == ("cosine", 6e-5, 6e-6)
    assert (ft.optimizer.type, ft.runner_config.global_batch_size) == ("FP32StateAdamWeightDecay", 16)
    lora = load_recipe(os.path.join(REPO, "configs/gpt2/finetune_gpt2_small_lora.yaml"), ["load_checkpoint=x"])
    pet = lora.model.model_config.pet_config
    assert (pet.pet_type, pet.lora_rank, pet.lora_alpha, pet.lora_dropout, pet.target_modules) == \
        ("lora", 64, 128.0, 0.1, [".*dense1.*", ".*dense3.*"])  # MindFormers' Q and V
    assert (lora.runner_config.batch_size, lora.lr_schedule.learning_rate, lora.lr_schedule.lr_end) == (8, 1e-3, 1e-4)
    assert lora.runner_config.global_batch_size == 64
    cls = load_recipe(os.path.join(REPO, "configs/gpt2/finetune_gpt2_small_txtcls.yaml"), ["load_checkpoint=x"])
    assert (cls.model.arch.type, cls.model.model_config.num_labels, cls.runner_config.batch_size,
            cls.runner_config.epochs) == ("GPT2ForSequenceClassification", 2, 16, 1)
    gen = generation_config(load_recipe(os.path.join(REPO, "configs/gpt2/predict_gpt2_small.yaml")))
    assert (gen["max_decode_length"], gen["top_k"], gen["top_p"], gen["do_sample"], gen["repetition_penalty"]) == \
        (1024, 5, 1.0, False, 1.0)


def test_overrides_and_mindformers_forms(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("runner_config:\n  batch_size: 2\nlr_schedule:\n  learning_rate: 1e-4\n"
                    "callbacks:\n  - type: CheckpointMonitor\n    save_checkpoint_steps: 7\n")
    recipe = load_recipe(str(path), ["runner_config.batch_size=8", "model.model_config.pet_config.target_modules=c_attn|c_fc",
                                     "lr_schedule.type=PolynomialWithWarmUpLR", "resume_training=true"])
    assert recipe.runner_config.batch_size == 8
    assert recipe.lr_schedule.learning_rate == 1e-4  # YAML 1.1 reads "1e-4" as a string
    assert recipe.callbacks.CheckpointMonitor.save_checkpoint_steps == 7
    assert recipe.callbacks.MFLossMonitor.per_print_times == 10  # default filled in
    assert recipe.model.model_config.pet_config.target_modules == ["c_attn", "c_fc"]
    assert recipe.lr_schedule.type == "polynomial" and recipe.resume_training == "auto"


@pytest.mark.parametrize("override, message", [
    ("runner_config.batchsize=4", "unknown key 'runner_config.batchsize'"),
    ("context.mode=0", "unknown key 'context'"),
    ("runner_config.batch_size=many", "bad value 'many' for 'runner_config.batch_size'"),
    ("runner_config.batch_size=0", "expected an integer in [1, 16777216]"),
    ("lr_schedule.type=linear", "one of polynomial"),
    ("model.arch.type=GPT2Foo", "one of GPT2LMHeadModel, GPT2ForSequenceClassification"),
    ("parallel.recompute=some", "one of none, selective, full"),
    ("model.model_config.hidden_dropout_rate=1.5", "expected a finite number in [0, 1)"),
    ("lr_schedule.lr_end=1.0", "lr_end 1 is larger than learning_rate"),
    ("batch_size", "bad override 'batch_size'"),
    ("callbacks.Foo.x=1", "unknown key 'callbacks.Foo'"),
])
def test_bad_recipes_fail_in_one_line(override, message):
    with pytest.raises(ValueError) as err:
        load_recipe(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_lists_valid_ones_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"valid keys of runner_config are epochs, batch_size"):
        load_recipe(None, ["runner_config.epoch=3"])
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("runner_config: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML at line"):
        load_recipe(str(bad))


# ---------------------------------------------------------------------------------------------
# schedules and parameter groups
# ---------------------------------------------------------------------------------------------
def test_polynomial_schedule_matches_its_definition():
    s = LRSchedule("polynomial", learning_rate=1e-3, lr_end=1e-4, warmup_steps=10, total_steps=110, power=1.0)
    assert s(0) == 0.0 and s(5) == pytest.approx(5e-4) and s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # linear: halfway through the decay
    assert s(110) == pytest.approx(1e-4) and s(500) == pytest.approx(1e-4)  # held at lr_end
    decay = [s(t) for t in range(10, 111)]
    steps = np.diff(decay)
    assert np.allclose(steps, steps[0])  # power 1: a straight line
    squared = LRSchedule("polynomial", 1e-3, 0.0, 0, 100, power=2.0)
    assert squared(50) == pytest.approx(1e-3 * 0.25)
    no_warmup = LRSchedule("polynomial", 1e-4, 1e-5, 0, 100)
    assert no_warmup(0) == 1e-4  # no warmup: the first step trains at the full rate


def test_cosine_and_constant_schedules():
    s = LRSchedule("cosine", learning_rate=6e-5, lr_end=6e-6, warmup_steps=4, total_steps=104)
    assert s(2) == pytest.approx(3e-5)
    assert s(4) == pytest.approx(6e-5)
    assert s(54) == pytest.approx(6e-6 + (6e-5 - 6e-6) * 0.5)
    assert s(29) == pytest.approx(6e-6 + (6e-5 - 6e-6) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(104) == pytest.approx(6e-6) and s(1000) == pytest.approx(6e-6)
    assert LRSchedule("constant", 1e-3, 0.0, 2, 10)(7) == 1e-3


def test_total_steps_minus_one_means_dataset_size_times_epochs():
    assert resolve_total_steps(-1, steps_per_epoch=250, epochs=3) == 750
    assert resolve_total_steps(-1, 250, 3, max_steps=40) == 40
    assert resolve_total_steps(1000, 250, 3, max_steps=40) == 1000
    assert resolve_total_steps(-1, 250, 3, max_steps=0) == resolve_total_steps(-1, 250, 3, max_steps=None) == 750
    assert resolve_total_steps(-1, 250, 3, max_steps=1) == 1


def test_schedule_defaults_and_decay_steps_bounds():
    """LRSchedule's defaults (the Python API's): polynomial from 1e-4 to 1e-5 over one step, no warmup. decay_steps
    at its bounds: a decay of 1 step over 2 is refused (it would end before total_steps), one that ends exactly at
    total_steps minus the warmup is accepted; past total_steps a polynomial schedule holds lr_end, while at
    total_steps itself a longer decay_steps still has lr above it; a cosine schedule with decay_steps 1 is at lr_end
    from step 1."""
    assert LRSchedule()(0) == 1e-4 and LRSchedule()(1) == pytest.approx(1e-5)
    assert LRSchedule(total_steps=4).warmup_steps == 0 and LRSchedule(total_steps=4)(2) == pytest.approx(5.5e-5)
    with pytest.raises(ValueError, match="decay_steps 1 ends the polynomial decay"):
        LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=0, total_steps=2, decay_steps=1)
    longer = LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=3, total_steps=8, decay_steps=5)
    assert longer(8) == pytest.approx(1e-5) and longer(5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - 2 / 5))
    slower = LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=2, total_steps=8, decay_steps=10)
    assert slower(8) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - 6 / 10)) and slower(9) == 1e-5
    for decay_steps in (1, 0):  # (0 counts as 1, as MindFormers' max(1, decay_steps))
        cosine = LRSchedule("cosine", 1e-3, 1e-5, warmup_steps=0, total_steps=4, decay_steps=decay_steps)
        assert cosine(0) == pytest.approx(1e-3) and cosine(1) == 1e-5


def test_schedule_edges_where_a_length_is_zero_or_one():
    """The max(1, .) guards of MindFormers' formulas: a schedule whose warmup fills it (T - w = 0), decay_steps 0 or
    1, a one-step cosine decay with a longer decay_steps; and the bounds of total_steps (>= 1) and warmup (>= 0)."""
    assert LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=2, total_steps=2)(2) == 1e-3
    assert LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=0, total_steps=1, decay_steps=0)(0) == 1e-3
    assert LRSchedule("polynomial", 1e-3, 1e-5, warmup_steps=0, total_steps=1, decay_steps=1)(1) == pytest.approx(1e-5)
    assert LRSchedule("cosine", 1e-3, 1e-5, warmup_steps=2, total_steps=2, decay_steps=5)(2) == pytest.approx(1e-3)
    assert LRSchedule("cosine", 1e-3, 1e-5, warmup_steps=0, total_steps=1, decay_steps=4)(1) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
        LRSchedule(total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        LRSchedule(warmup_steps=-1)


def test_optimizer_groups_hold_the_recipe_s_settings_and_refuse_a_frozen_model():
    """build_optimizer's groups: MindFormers' two (weight decay 0.1 by default on matrices, none on vectors), each
    naming its update rule (saved with the state), no bookkeeping keys; a model of vectors alone has one group; a
    model with nothing to train is refused in one line."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = build_optimizer(model, 1e-3).state_dict()["param_groups"]
    assert [(g["weight_decay"], len(g["params"]), g["update_rule"]) for g in groups] == [(0.1, 1, "torch"),
                                                                                         (0.0, 3, "torch")]
    assert all("names" not in g for g in groups)
    assert [len(g["params"]) for g in param_groups(torch.nn.LayerNorm(4), 0.1)] == [2]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="^the model has no trainable parameters$"):
        build_optimizer(model, 1e-3)


def test_a_one_group_optimizer_state_keeps_its_update_rule(tmp_path):
    """A model whose trainable weights are all matrices (LoRA's adapters) has one parameter group: its saved state
    loads back under the same rule and is refused under the other, by the rule's one-line message."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 2, bias=False))
    saved = build_optimizer(model, 1e-3, update_rule="mindspore")
    assert len(saved.param_groups) == 1
    build_optimizer(model, 1e-3, update_rule="mindspore").load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="trained with mindspore's update rule but this recipe's optimizer.type uses "
                                         "torch's: resume with optimizer.type=FusedAdamWeightDecay"):
        build_optimizer(model, 1e-3, update_rule="torch").load_state_dict(saved.state_dict())


def test_param_groups_skip_decay_on_biases_and_1d_params():
    from gpt2_ascend import GPT2LMHeadModel
    model = GPT2LMHeadModel(tiny_config())
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert "transformer.h.0.ln_1.weight" in no_decay["names"] and "transformer.h.0.attn.c_attn.bias" in no_decay["names"]
    assert "transformer.wte.weight" in decay["names"] and "lm_head.weight" not in decay["names"]  # tied: once
    n_params = len(decay["params"]) + len(no_decay["params"])
    assert n_params == len(list(model.parameters()))
    optimizer = build_optimizer(model, 1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["eps"] == 1e-8


def test_lora_groups_hold_only_adapters():
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.lora import apply_lora
    model = apply_lora(GPT2LMHeadModel(tiny_config()), rank=4, alpha=8, dropout=0.0)
    names = [n for g in param_groups(model, 0.1) for n in g["names"]]
    assert names and all("lora_" in n for n in names)


# ---------------------------------------------------------------------------------------------
# the step loader
# ---------------------------------------------------------------------------------------------
def _rows(loader, steps):
    return [b["input_ids"][:, 0].tolist() for _ in range(steps) for b in next(loader)]


def test_loader_is_deterministic_and_resumes_mid_epoch():
    data = np.arange(40, dtype=np.uint16)[:, None].repeat(3, axis=1)
    full = _rows(StepLoader(data, batch_size=3, micro_batches=2, seed=7), 10)  # 6 steps per epoch
    assert _rows(StepLoader(data, batch_size=3, micro_batches=2, seed=7), 10) == full  # same seed, same rows
    assert _rows(StepLoader(data, batch_size=3, micro_batches=2, seed=8), 10) != full
    first_epoch = sum(full[:12], [])
    assert set(first_epoch) <= set(range(40)) and len(set(first_epoch)) == 36  # no row twice (4 left over)
    assert first_epoch != sorted(first_epoch)  # shuffled
    assert full[12:] != full[:8]  # epoch 1 is shuffled differently
    loader = StepLoader(data, batch_size=3, micro_batches=2, seed=7)
    _rows(loader, 4)
    state = loader.state_dict()
    resumed = StepLoader(data, batch_size=3, micro_batches=2, seed=7)
    resumed.load_state_dict(state)
    assert _rows(resumed, 6) == full[8:]
    other = StepLoader(data, batch_size=3, micro_batches=2, seed=7)
    other.seek(4)
    assert _rows(other, 6) == full[8:]
    with pytest.raises(ValueError, match="saved with 6 rows per optimizer step .* this run reads 8"):
        StepLoader(data, batch_size=4, micro_batches=2, seed=7).load_state_dict(state)


def test_loader_ranks_read_disjoint_slices():
    data = np.arange(50, dtype=np.int32)[:, None]
    ranks = [StepLoader(data, batch_size=2, seed=1, rank=r, world_size=3) for r in range(3)]
    assert {r.steps_per_epoch for r in ranks} == {8}
    seen = [set(sum(_rows(r, 8), [])) for r in ranks]
    assert all(len(s) == 16 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_loader_reads_every_row_of_an_exact_multiple():
    """36 rows, 12 per optimizer step over 2 ranks: 3 steps per epoch reading every row once (the tests above leave
    rows over, so an epoch one step short would pass them)."""
    data = np.arange(36, dtype=np.int32)[:, None]
    ranks = [StepLoader(data, batch_size=3, micro_batches=2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert {r.steps_per_epoch for r in ranks} == {3}
    assert sorted(sum((sum(_rows(r, 3), []) for r in ranks), [])) == list(range(36))


def test_loader_columns_and_errors():
    data = dict(input_ids=np.ones((10, 4), np.int32), attention_mask=np.ones((10, 4), np.int32),
                labels=np.arange(10))
    batch = next(StepLoader(data, batch_size=5, shuffle=False))[0]
    assert batch["labels"].tolist() == [0, 1, 2, 3, 4] and batch["input_ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="fewer than one step needs"):
        StepLoader(data, batch_size=4, micro_batches=2, world_size=2)
    with pytest.raises(ValueError, match="columns differ in length"):
        StepLoader(dict(input_ids=np.ones((3, 2)), labels=np.ones(4)), batch_size=1)


# ---------------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------------
def _save(root, step, keep=None):
    return ckpt.save_checkpoint(str(root), step, {"model": {"w": torch.full((64,), float(step))},
                                                  "trainer": {"step": step}},
                                json_files={"config.json": {"n": step}}, keep=keep)


def test_checkpoint_round_trip_prune_and_verify(tmp_path):
    for step in (2, 4, 6):
        path = _save(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [4, 6]
    states = ckpt.load_checkpoint(path)
    assert torch.equal(states["model"]["w"], torch.full((64,), 6.0)) and states["trainer"] == {"step": 6}
    manifest = ckpt.verify_checkpoint(path)
    assert set(manifest["files"]) == {"model.pt", "trainer.pt", "config.json"}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left


def test_truncated_or_incomplete_checkpoint_is_detected_and_skipped(tmp_path):
    _save(tmp_path, 3)
    newest = _save(tmp_path, 6)
    model_file = os.path.join(newest, "model.pt")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    with pytest.raises(ckpt.CheckpointError, match=r"model.pt has \d+ bytes, the manifest says \d+ \(truncated\?\)"):
        ckpt.verify_checkpoint(newest)
    reports = []
    assert ckpt.find_resume_checkpoint(str(tmp_path), report=reports.append).endswith("step_0000003")
    assert len(reports) == 1 and "step_0000006 is corrupt" in reports[0]
    # a save killed before its rename leaves a temporary; one killed before the manifest, an incomplete dir
    os.makedirs(tmp_path / ".step_0000009.tmp-abc")
    os.makedirs(tmp_path / "step_0000012")
    reports.clear()
    assert ckpt.find_resume_checkpoint(str(tmp_path), report=reports.append).endswith("step_0000003")
    assert "incomplete" in reports[0]
    ckpt.remove_stale_temporaries(str(tmp_path))
    assert not (tmp_path / ".step_0000009.tmp-abc").exists()
    with open(os.path.join(newest, "trainer.pt"), "r+b") as f:  # same size, different bytes
        f.write(b"\0\0\0\0")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.verify_checkpoint(newest)


def test_metrics_truncation_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(dict(step=s, loss=1.0 / s)) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert [r["step"] for r in read_metrics(str(path))] == list(range(1, 8))
    truncate_metrics(str(path), 4)
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4]


def test_mfu_inputs():
    assert flops_per_token(124_000_000, 12, 768, 1024) == 6 * 124e6 + 12 * 12 * 768 * 1024
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H200", "fp16") == 989e12
    assert peak_flops("Ascend910B2", "bf16") == 313e12
    assert peak_flops("NVIDIA H100", "fp32") is None and peak_flops("cpu", "bf16") is None
