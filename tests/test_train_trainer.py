"""The trainer through its Python API: the step (accumulation, fp16 loss scaling, divergence), whole runs on
real WikiText-2 and SST-2 slices, LoRA, and resuming past a corrupt checkpoint."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.data.loader import StepLoader, causal_lm_inputs
from gpt2_ascend.train.optim import LRSchedule, build_optimizer
from gpt2_ascend.train.recipe import load_recipe
from gpt2_ascend.train import Trainer, TrainingStopped, TrainSettings, run_training

from conftest import max_diff, tiny_config

CPU = torch.device("cpu")


def _trainer(model, data, batch_size, micro_batches=1, optimizer=None, **settings):
    loader = StepLoader(causal_lm_inputs(data), batch_size=batch_size, micro_batches=micro_batches, shuffle=False)
    optimizer = optimizer or build_optimizer(model, 1e-2, weight_decay=0.1)
    settings = TrainSettings(**{"total_steps": 4, "progress": False, **settings})
    return Trainer(model, optimizer, LRSchedule("constant", 1e-2, 0.0, 0, 4), loader, CPU, settings)


def _blocks(rows=8, width=17, vocab=512, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (rows, width)).astype(np.int32)


def test_gradient_accumulation_equals_the_big_batch():
    data = _blocks()
    torch.manual_seed(0)
    big = GPT2LMHeadModel(tiny_config())
    small = GPT2LMHeadModel(tiny_config())
    small.load_state_dict(big.state_dict())
    # plain SGD: the update is lr x gradient, so the parameters compare the gradients themselves (AdamW's
    # first step is lr x sign(gradient), which rounding flips on gradients that are ~0)
    one = _trainer(big, data, batch_size=8, optimizer=torch.optim.SGD(big.parameters(), lr=0.1))
    out_big = one.train_step(next(one.loader))
    accum = _trainer(small, data, batch_size=2, micro_batches=4, optimizer=torch.optim.SGD(small.parameters(), lr=0.1))
    out_small = accum.train_step(next(accum.loader))
    assert abs(out_big["loss"].item() - out_small["loss"].item()) < 1e-5
    assert abs(out_big["grad_norm"].item() - out_small["grad_norm"].item()) < 1e-5
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_step_matches_a_hand_written_adamw_step():
    """lr from the schedule, clipping at max_grad_norm, decoupled decay only on the 2-D group."""
    data = _blocks(rows=4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    reference = GPT2LMHeadModel(tiny_config())
    reference.load_state_dict(model.state_dict())
    trainer = _trainer(model, data, batch_size=4, max_grad_norm=0.5)
    trainer.train_step(next(trainer.loader))
    tokens = torch.as_tensor(data, dtype=torch.long)
    logits = reference(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    groups = [dict(params=[p for p in reference.parameters() if p.ndim == 2], weight_decay=0.1),
              dict(params=[p for p in reference.parameters() if p.ndim < 2], weight_decay=0.0)]
    torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8).step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_clipping_scales_the_update_by_exactly_max_norm_over_norm():
    """With max_grad_norm below the gradient's norm the optimizer applies the gradient times max_norm / norm;
    grad_norm is logged before clipping; a threshold above the norm leaves the gradient alone."""
    data = _blocks(rows=4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())

    def one_sgd_step(max_grad_norm):
        m = copy.deepcopy(model)
        before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
        seen = []  # the gradients the optimizer steps with
        optimizer.register_step_pre_hook(lambda *_: seen.append(torch.cat([p.grad.flatten() for p in m.parameters()])))
        loader = StepLoader(causal_lm_inputs(data), batch_size=4, shuffle=False)
        trainer = Trainer(m, optimizer, LRSchedule("constant", 1.0, 0.0, 0, 1), loader, CPU,
                          TrainSettings(total_steps=1, max_grad_norm=max_grad_norm, progress=False))
        out = trainer.train_step(next(loader))
        update = before - torch.cat([p.detach().flatten() for p in m.parameters()])
        return out["grad_norm"].item(), seen[0], update

    norm, natural, _ = one_sgd_step(None)
    assert norm == pytest.approx(natural.norm().item(), rel=1e-5) and norm > 1.0
    logged, clipped, update = one_sgd_step(norm / 4)
    assert logged == norm  # the norm before clipping

    def factor(v):  # v as a multiple of the natural gradient
        return (v @ natural / (natural @ natural)).item()
    assert factor(clipped) == pytest.approx(0.25, rel=1e-5)  # max_norm / norm
    assert torch.allclose(clipped, natural * 0.25, rtol=1e-5, atol=1e-12)  # every element, not just on average
    assert factor(update) == pytest.approx(0.25, rel=1e-5)  # SGD at lr 1 applies the clipped gradient
    assert (update - natural * 0.25).norm() / (natural * 0.25).norm() < 1e-5
    _, untouched, _ = one_sgd_step(norm * 2)
    assert torch.equal(untouched, natural)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, _blocks(), batch_size=4, precision="fp16", loss_scale=2.0 ** 40)
    for _ in range(3):
        trainer.pending.append(dict(step=trainer.step + 1, lr=0.0, tokens=1, epoch=0.0,
                                    out=trainer.train_step(next(trainer.loader))))
    records = trainer.flush()
    # 2^40 times a loss of ~6 overflows fp16's activation gradients: the update is skipped, the scale halved
    assert [r["loss_scale"] for r in records] == [2.0 ** 40, 2.0 ** 39, 2.0 ** 38]
    assert all(r["skipped"] for r in records) and all(np.isfinite(r["loss"]) for r in records)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert trainer.divergence(records) is None
    trainer.settings.max_consecutive_skips = 4
    message = trainer.divergence([dict(records[-1], step=4)])
    assert "4 steps in a row overflowed in fp16" in message and "lower the learning rate or use bf16" in message


def test_fp16_recovers_once_the_scale_fits():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    trainer = _trainer(model, _blocks(), batch_size=4, precision="fp16", loss_scale=2.0 ** 8, total_steps=3)
    trainer.train()
    assert trainer.step == 3 and trainer.scaler.get_scale() == 2.0 ** 8
    assert not torch.equal(model.transformer.wte.weight, GPT2LMHeadModel(tiny_config()).transformer.wte.weight)


def test_nonfinite_loss_without_scaling_stops_with_one_clear_line():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    with torch.no_grad():
        model.transformer.wpe.weight[3] = float("nan")
    trainer = _trainer(model, _blocks(), batch_size=4, log_interval=2)
    with pytest.raises(TrainingStopped) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("the loss became nan at step 1: training stopped (no checkpoint was saved yet)")
    assert "\n" not in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_never_waits_for_the_gpu(precision):
    """One whole optimizer step (accumulation, autocast, loss scaling, clipping, fused AdamW, schedule)
    without a host-device sync: torch raises on any synchronizing call in this mode."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config()).to(device)
    loader = StepLoader(causal_lm_inputs(_blocks(rows=16)), batch_size=4, micro_batches=2, shuffle=False,
                        pin_memory=True)
    optimizer = build_optimizer(model, 1e-3, device_type="cuda")
    trainer = Trainer(model, optimizer, LRSchedule("polynomial", 1e-3, 1e-4, 1, 4), loader, device,
                      TrainSettings(total_steps=4, precision=precision, progress=False))
    trainer.train_step(next(loader))  # first step: lazy optimizer / scaler state
    batch = next(loader)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()


# ---------------------------------------------------------------------------------------------
# whole runs through run_training (what train.py calls)
# ---------------------------------------------------------------------------------------------
def _recipe(tmp_path, data, *overrides, **sections):
    base = dict(output_dir=str(tmp_path / "out"), device="cpu",
                runner_config=dict(batch_size=4, max_steps=6, progress_bar=False),
                model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=32, num_layers=2,
                                             num_heads=2, eos_token_id=511, pad_token_id=511)),
                lr_schedule=dict(learning_rate=1e-3, lr_end=1e-4),
                train_dataset=dict(data_loader=dict(dataset_dir=str(data))),
                callbacks=dict(MFLossMonitor=dict(per_print_times=2),
                               CheckpointMonitor=dict(save_checkpoint_steps=3, keep_checkpoint_max=2)))
    base.update(sections)
    return load_recipe(None, list(overrides), base=base)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, _blocks(rows=64, width=17, seed=1).astype(np.uint16))
    return path


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_tiny_pretrain_on_real_wikitext2_lowers_the_loss(tmp_path, data_dir, tmp_path_factory):
    valid = os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens")  # real WikiText-2, the smallest split
    recipe = _recipe(tmp_path, valid, "runner_config.batch_size=8", "runner_config.max_steps=40",
                     "model.model_config.vocab_size=50257", "model.model_config.eos_token_id=50256",
                     "model.model_config.pad_token_id=50256", "model.model_config.seq_length=32",
                     "lr_schedule.learning_rate=5e-3", "lr_schedule.lr_end=5e-4", "lr_schedule.warmup_steps=4",
                     "model.model_config.hidden_dropout_rate=0", "model.model_config.attention_dropout_rate=0",
                     f"eval_dataset.data_loader.dataset_dir={valid}", "eval_dataset.max_samples=32",
                     "callbacks.CheckpointMonitor.save_checkpoint_steps=20", "do_eval=true",
                     "eval_step_interval=20", f"data_cache_dir={tmp_path_factory.getbasetemp() / 'data_cache'}")
    summary = run_training(recipe, log=lambda *_: None)
    out = recipe.output_dir
    losses = [loss for _, loss in _losses(out)]
    assert len(losses) == 40 and abs(losses[0] - np.log(50257)) < 0.3  # starts near uniform
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "epoch"} <= set(records[0])
    assert [r["step"] for r in records if "eval_ppl" in r] == [20, 40]
    assert summary["eval_ppl"] < 5000 and summary["eval_ppl"] == records[-1]["eval_ppl"]
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, "final", name)), name
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 1000
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(out, "tensorboard")))
    import transformers  # final/ is an ordinary HF checkpoint
    hf = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(out, "final")).eval()
    ours = GPT2LMHeadModel.from_pretrained(os.path.join(out, "final")).eval()
    ids = torch.tensor([[464, 3290, 286, 262]])
    assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-5


def test_resume_auto_skips_a_truncated_checkpoint_and_matches_the_full_run(tmp_path, token_file, capsys):
    recipe = _recipe(tmp_path, token_file, "runner_config.gradient_accumulation_steps=2")
    run_training(recipe, log=lambda *_: None)
    reference = _losses(recipe.output_dir)
    newest = os.path.join(recipe.output_dir, "checkpoint", "step_0000006", "model.pt")
    with open(newest, "r+b") as f:
        f.truncate(100)
    messages = []
    again = load_recipe(None, ["resume_training=auto"], base=recipe)
    summary = run_training(again, log=messages.append)
    assert "step_0000006 is corrupt: model.pt has 100 bytes" in capsys.readouterr().err  # a warning: stderr
    assert any("resumed from" in m and "step_0000003" in m for m in messages), messages
    assert summary["steps_this_run"] == 3
    assert _losses(recipe.output_dir) == reference  # steps 4-6 again, bit-identical on CPU
    explicit = load_recipe(None, [f"resume_training={os.path.dirname(newest)}"], base=recipe)
    with open(newest, "r+b") as f:
        f.truncate(100)
    from gpt2_ascend.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="truncated"):
        run_training(explicit, log=lambda *_: None)


LORA = dict(lora_rank=4, lora_alpha=12.0, lora_dropout=0.1)  # alpha / r = 3: neither 1 nor 2 nor rank / alpha


def _lora_recipe(tmp_path, data, base_dir, *overrides):
    pet = [f"model.model_config.pet_config.{k}={v}" for k, v in LORA.items()]
    return _recipe(tmp_path, data, "run_mode=finetune", f"load_checkpoint={base_dir}",
                   "model.model_config.pet_config.pet_type=lora", *pet, "lr_schedule.learning_rate=1e-2",
                   "lr_schedule.lr_end=1e-3", *overrides)


def assert_adapter_is_the_recipes(final_dir, base_state, merged_state, targets=("c_attn",), modules_to_save=None):
    """final/adapter/ holds the recipe's LoRA (rank, alpha, dropout, targets), and the merged final/ weights are
    the base's plus (alpha / r) B @ A, B and A read from the adapter file: W_merged - W_base == (alpha / r) B A."""
    from safetensors.torch import load_file
    with open(os.path.join(final_dir, "adapter", "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == tuple(LORA.values())
    assert sorted(config["target_modules"]) == sorted(targets) and config["modules_to_save"] == modules_to_save
    # plain LoRA: the scale is alpha / r (keys at peft's defaults are left out, for older peft versions)
    assert not config.get("use_rslora", False) and not config.get("use_dora", False)
    adapter = load_file(os.path.join(final_dir, "adapter", "adapter_model.safetensors"))
    scale = LORA["lora_alpha"] / LORA["lora_rank"]
    layers = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight"))
    assert layers and all(layer.rsplit(".", 1)[-1] in targets for layer in layers)
    for layer in layers:
        a, b = adapter[f"base_model.model.{layer}.lora_A.weight"], adapter[f"base_model.model.{layer}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == LORA["lora_rank"]
        delta, product = merged_state[f"{layer}.weight"] - base_state[f"{layer}.weight"], b @ a
        assert product.abs().max() > 1e-3, layer  # the adapter trained (B starts at zero)
        fitted = (delta.flatten() @ product.flatten() / product.pow(2).sum()).item()
        assert fitted == pytest.approx(scale, rel=1e-4), layer  # the scale the merge applied
        assert max_diff(delta, scale * product) <= 1e-6, layer
    adapted = {f"{layer}.weight" for layer in layers} | {f"{m}.weight" for m in modules_to_save or ()}
    for key, value in merged_state.items():  # everything else is the base's, untouched
        if key not in adapted:
            assert torch.equal(value, base_state[key]), key
    for module in modules_to_save or ():  # trained whole: the adapter file carries it
        assert torch.equal(merged_state[f"{module}.weight"], adapter[f"base_model.model.{module}.weight"])


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path, token_file):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config(n_positions=16))
    base.save_pretrained(str(tmp_path / "base"))
    recipe = _lora_recipe(tmp_path, token_file, tmp_path / "base")
    run_training(recipe, log=lambda *_: None)
    final = os.path.join(recipe.output_dir, "final")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(final, "adapter")))
    assert_adapter_is_the_recipes(final, base.state_dict(), GPT2LMHeadModel.from_pretrained(final).state_dict())
    state = torch.load(os.path.join(recipe.output_dir, "checkpoint", "step_0000006", "model.pt"), weights_only=True)
    assert state and all("lora_" in k for k in state)  # a LoRA checkpoint holds the adapters only

    from gpt2_ascend.lora import load_adapter
    adapted = load_adapter(GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")), os.path.join(final, "adapter"),
                           merge=False).eval()
    merged = GPT2LMHeadModel.from_pretrained(final).eval()
    original = base.state_dict()
    for name, module in adapted.named_modules():  # the adapter wraps the base's weights, not a copy of the merge
        if name.endswith("c_attn.base_layer"):
            assert torch.equal(module.weight, original[name.split("base_model.model.")[1].replace(".base_layer", "")
                                                       + ".weight"])
    ids = torch.as_tensor(_blocks(rows=2, width=16, seed=3), dtype=torch.long)
    with torch.no_grad():
        assert max_diff(adapted(input_ids=ids).logits, merged(ids).logits) <= 1e-6

    # a LoRA run resumes from its adapter-only checkpoint (the base comes from load_checkpoint again)
    reference = _losses(recipe.output_dir)
    shutil.rmtree(os.path.join(recipe.output_dir, "checkpoint", "step_0000006"))
    run_training(load_recipe(None, ["resume_training=auto"], base=recipe), log=lambda *_: None)
    assert _losses(recipe.output_dir) == reference


def test_lora_classifier_trains_its_head_and_saves_it_in_the_adapter(tmp_path):
    """An LM base finetuned as a classifier with LoRA: the score head is new (random), so it trains whole
    (PEFT's modules_to_save), lands in the adapter file and in the merged model; the rest is base + (alpha/r) B A."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 511, size=(32, 12)).astype(np.int32)
    np.savez(tmp_path / "cls.npz", input_ids=ids, attention_mask=np.ones_like(ids), labels=ids[:, -1] % 2)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config(n_positions=16))
    base.save_pretrained(str(tmp_path / "base"))
    recipe = _lora_recipe(tmp_path, tmp_path / "cls.npz", tmp_path / "base", "model.model_config.seq_length=12",
                          "model.arch.type=GPT2ForSequenceClassification")
    run_training(recipe, log=lambda *_: None)
    state = torch.load(os.path.join(recipe.output_dir, "checkpoint", "step_0000006", "model.pt"), weights_only=True)
    assert any(".score." in k for k in state)  # trainable, so checkpointed with the adapters
    final = os.path.join(recipe.output_dir, "final")
    merged = GPT2ForSequenceClassification.from_pretrained(final).state_dict()
    assert_adapter_is_the_recipes(final, base.state_dict(), merged, modules_to_save=["score"])


def test_txtcls_on_an_sst2_slice_learns_above_chance(tmp_path, data_dir):
    train = tmp_path / "sst2_slice.tsv"
    with open(os.path.join(data_dir, "sst2", "train.tsv"), encoding="utf-8") as f:
        train.write_text("".join(line for _, line in zip(range(4001), f)), encoding="utf-8")
    dev = os.path.join(data_dir, "sst2", "dev.tsv")
    recipe = _recipe(tmp_path, train, "model.arch.type=GPT2ForSequenceClassification",
                     "model.model_config.vocab_size=50257", "model.model_config.eos_token_id=50256",
                     "model.model_config.pad_token_id=50256", "model.model_config.seq_length=48",
                     "model.model_config.hidden_size=64", "model.model_config.num_heads=4",
                     "runner_config.batch_size=32", "runner_config.max_steps=150", "lr_schedule.learning_rate=3e-3",
                     "lr_schedule.lr_end=3e-4", "callbacks.CheckpointMonitor.save_checkpoint_steps=150",
                     f"eval_dataset.data_loader.dataset_dir={dev}", "eval_dataset.batch_size=128")
    summary = run_training(recipe, log=lambda *_: None)
    assert summary["eval_accuracy"] > 0.6, summary  # chance: dev's majority class is 444 of 872 (50.9%)
    config = json.load(open(os.path.join(recipe.output_dir, "final", "config.json")))
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 2


def test_bf16_run_and_finetune_from_one_of_our_checkpoints(tmp_path, token_file):
    first = _recipe(tmp_path, token_file, "runner_config.max_steps=3", "model.model_config.compute_dtype=bfloat16")
    summary = run_training(first, log=lambda *_: None)
    assert summary["precision"] == "bf16" and np.isfinite(summary["final_loss"])
    step3 = os.path.join(first.output_dir, "checkpoint", "step_0000003")
    second = _recipe(tmp_path, token_file, "run_mode=finetune", f"load_checkpoint={step3}",
                     f"output_dir={tmp_path / 'second'}", "runner_config.max_steps=1", "lr_schedule.warmup_steps=1",
                     "lr_schedule.warmup_lr_init=0", "lr_schedule.lr_end=0")
    run_training(second, log=lambda *_: None)  # one step at the warmup's lr 0: the exported weights are the checkpoint's
    a = GPT2LMHeadModel.from_pretrained(os.path.join(first.output_dir, "final"))
    b = GPT2LMHeadModel.from_pretrained(os.path.join(second.output_dir, "final"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_existing_output_dir_needs_resume_or_overwrite(tmp_path, token_file):
    recipe = _recipe(tmp_path, token_file, "runner_config.max_steps=2")
    run_training(recipe, log=lambda *_: None)
    with pytest.raises(ValueError, match="already holds a training run: pass resume_training=auto to continue it, "
                                         "overwrite=True to start over"):
        run_training(recipe, log=lambda *_: None)
    summary = run_training(recipe, overwrite=True, log=lambda *_: None)
    assert summary["steps"] == 2 and len(_losses(recipe.output_dir)) == 2
    shutil.rmtree(recipe.output_dir)


def test_resume_of_a_finished_run_and_past_max_steps(tmp_path, token_file):
    recipe = _recipe(tmp_path, token_file)
    first = run_training(recipe, log=lambda *_: None)
    before = _losses(recipe.output_dir)
    again = run_training(load_recipe(None, ["resume_training=auto"], base=recipe), log=lambda *_: None)
    assert (again["steps"], again["steps_this_run"]) == (6, 0)
    assert again["final_loss"] == first["final_loss"] == before[-1][1]  # not null: the checkpoint's last loss
    assert _losses(recipe.output_dir) == before
    fewer = load_recipe(None, ["resume_training=auto", "runner_config.max_steps=4"], base=recipe)
    with pytest.raises(ValueError, match="is at step 6, past max_steps 4: pass a larger runner_config.max_steps"):
        run_training(fewer, log=lambda *_: None)
    assert _losses(recipe.output_dir) == before  # nothing was touched


def test_resume_auto_refuses_when_every_checkpoint_is_corrupt(tmp_path, token_file):
    from gpt2_ascend.checkpoints import CheckpointError
    recipe = _recipe(tmp_path, token_file)
    run_training(recipe, log=lambda *_: None)
    for step in ("step_0000003", "step_0000006"):
        with open(os.path.join(recipe.output_dir, "checkpoint", step, "model.pt"), "r+b") as f:
            f.truncate(100)
    again = load_recipe(None, ["resume_training=auto"], base=recipe)
    with pytest.raises(CheckpointError, match="none is complete and intact"):
        run_training(again, log=lambda *_: None)
    over = load_recipe(None, ["resume_training=auto"], base=recipe)  # explicit permission to start over
    assert run_training(over, overwrite=True, log=lambda *_: None)["steps_this_run"] == 6


def test_resume_with_another_base_model_is_refused(tmp_path, token_file):
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        GPT2LMHeadModel(tiny_config(n_positions=16)).save_pretrained(str(tmp_path / name))
    lora = ["run_mode=finetune", "model.model_config.pet_config.pet_type=lora",
            "model.model_config.pet_config.lora_rank=4"]
    recipe = _recipe(tmp_path, token_file, *lora, f"load_checkpoint={tmp_path / 'a'}")
    run_training(recipe, log=lambda *_: None)
    other = load_recipe(None, ["resume_training=auto", f"load_checkpoint={tmp_path / 'b'}"], base=recipe)
    with pytest.raises(ValueError, match="started from .*/a, not .*/b"):
        run_training(other, log=lambda *_: None)
