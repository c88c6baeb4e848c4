"""Training reproduces MindFormers itself, step by step.

../shared/mindformers_reference/ (beside the checkout) holds a real MindFormers 1.3.2 run on MindSpore 2.10:
a 2-layer GPT-2 (hidden 64, 4 heads, seq 32, vocab 1000, no dropout), its initial weights (init.ckpt), one
batch (batch.npy), the loss before each of 5 updates with FusedAdamWeightDecay (betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on 2-D parameters, no clipping, no loss scaling) under a constant lr of 1e-3 and under
MindFormers' polynomial schedule (1e-3 -> 1e-5, warmup 2, total 5), and the weights after the 5 updates.
Here the same init.ckpt goes straight into train.py's run_training with MindFormers' settings.
"""
import json
import os

import numpy as np
import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(REPO), "shared", "mindformers_reference")
TOL = 1e-5

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(REFERENCE, "losses.json")),
    reason=f"the MindFormers reference run is not at {REFERENCE} (it lives beside the checkout, in shared/)")

SCHEDULES = {
    "constant": dict(type="constant", learning_rate=1e-3, warmup_steps=0),
    "polynomial": dict(type="polynomial", learning_rate=1e-3, lr_end=1e-5, warmup_steps=2, total_steps=5, power=1.0,
                       warmup_lr_init=0.0),
}


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(REFERENCE, "losses.json")) as f:
        return json.load(f)


def mindformers_recipe(tmp_path, schedule: str, act: str = "gelu", optimizer: str = "FusedAdamWeightDecay",
                       device: str = "cpu") -> dict:
    """The reference run's settings as one of our recipes (MindFormers' key names)."""
    return {
        "seed": 1234, "run_mode": "finetune", "output_dir": str(tmp_path / f"{schedule}_{act}"),
        "load_checkpoint": os.path.join(REFERENCE, "init.ckpt"), "device": device, "do_eval": False,
        "runner_config": dict(epochs=5, batch_size=4, progress_bar=False),
        "runner_wrapper": dict(type="MFTrainOneStepCell", use_clip_grad=False),
        "model": dict(arch=dict(type="GPT2LMHeadModel"), model_config=dict(
            seq_length=32, vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, expand_ratio=4,
            hidden_act=act, hidden_dropout_rate=0.0, attention_dropout_rate=0.0, compute_dtype="float32",
            init_style="mindformers")),
        "lr_schedule": SCHEDULES[schedule],
        "optimizer": dict(type=optimizer, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1),
        "train_dataset": dict(data_loader=dict(dataset_dir=os.path.join(REFERENCE, "batch.npy"), shuffle=False)),
        "callbacks": [dict(type="MFLossMonitor", per_print_times=1),
                      dict(type="CheckpointMonitor", prefix="ref", save_checkpoint_steps=5, keep_checkpoint_max=1)],
    }


def train(tmp_path, schedule, act="gelu", optimizer="FusedAdamWeightDecay", device="cpu"):
    """(per-step losses, final weights under MindFormers' names) of a run through run_training."""
    from gpt2_ascend.mindspore_io.mapping import hf_to_mindformers
    from gpt2_ascend.hf import read_state_dict
    from gpt2_ascend.train.recipe import load_recipe
    from gpt2_ascend.train import run_training

    path = tmp_path / f"{schedule}_{act}.yaml"
    path.write_text(yaml.safe_dump(mindformers_recipe(tmp_path, schedule, act, optimizer, device)))
    summary = run_training(load_recipe(str(path)), log=lambda *a, **k: None)
    with open(summary["metrics"]) as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    weights = {}
    for hf_name, tensor in read_state_dict(summary["final"]).items():
        weights.update(dict(hf_to_mindformers(hf_name, tensor)))
    return losses, [r["lr"] for r in records if "lr" in r], weights


def max_weight_diff(weights: dict, npz_path: str) -> float:
    want = np.load(npz_path)
    assert set(weights) == set(want.files)
    return max(float(np.abs(weights[k].float().numpy() - want[k]).max()) for k in want.files)


ON_GPU = pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


def fp32_matmuls_on_cuda(monkeypatch):
    """run_training turns TF32 on for CUDA (configure_speed); the reference comparison needs true fp32."""
    from gpt2_ascend.train import run
    speed = run.configure_speed

    def without_tf32(*args, **kwargs):
        speed(*args, **kwargs)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    monkeypatch.setattr(run, "configure_speed", without_tf32)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("schedule", ["constant", "polynomial"])
def test_training_matches_mindformers_step_by_step(tmp_path, monkeypatch, reference, schedule, device):
    """On the GPU: CUDA's fused AdamW kernel under MindSpore's rule, fp32 matmuls."""
    if device == "gpu":
        fp32_matmuls_on_cuda(monkeypatch)
    losses, lrs, weights = train(tmp_path, schedule, device="cuda" if device == "gpu" else "cpu")
    want = reference["train_losses"][f"pynative/fp32/gelu/FusedAdamWeightDecay/{schedule}"]
    assert len(losses) == len(want) == 5
    diffs = [abs(a - b) for a, b in zip(losses, want)]
    print(f"{schedule}: max |loss - MindFormers| per step {['%.1e' % d for d in diffs]}")
    assert max(diffs) <= TOL
    assert lrs == pytest.approx(reference["lr"][schedule], rel=1e-6, abs=1e-12)
    final = os.path.join(REFERENCE, f"final_fp32_gelu_FusedAdamWeightDecay_{schedule}.npz")
    diff = max_weight_diff(weights, final)
    print(f"{schedule}: max |weight - MindFormers| after 5 steps {diff:.1e}")
    assert diff <= TOL


def test_fast_gelu_and_fp32_state_optimizer_match_too(tmp_path, reference):
    """MindFormers' other GPT-2 activation (the 13B / xl / 52B recipes) and its FP32StateAdamWeightDecay."""
    losses, _, _ = train(tmp_path, "polynomial", act="fast_gelu", optimizer="FP32StateAdamWeightDecay")
    want = reference["train_losses"]["pynative/fp32/fast_gelu/FP32StateAdamWeightDecay/polynomial"]
    assert max(abs(a - b) for a, b in zip(losses, want)) <= TOL


def test_forward_loss_at_init_matches_for_both_activations(reference):
    from gpt2_ascend.convert import load_mindspore_model
    ids = torch.from_numpy(np.load(os.path.join(REFERENCE, "batch.npy")).astype(np.int64))
    for act, ours in (("gelu", "gelu_new"), ("fast_gelu", "fast_gelu")):
        model = load_mindspore_model(os.path.join(REFERENCE, "init.ckpt"), n_head=4, activation=ours)
        with torch.no_grad():
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss.item()
        assert abs(loss - reference["forward_loss_at_init"][f"pynative/fp32/{act}"]) <= TOL, act


def test_torch_adamw_is_not_mindformers(tmp_path, reference):
    """The check has teeth: torch's AdamW (bias-corrected) on the same run is off by ~0.1 from step 1 on."""
    path = tmp_path / "adamw.yaml"
    path.write_text(yaml.safe_dump(mindformers_recipe(tmp_path, "constant", optimizer="AdamW")))
    from gpt2_ascend.train.recipe import load_recipe
    from gpt2_ascend.train import run_training
    summary = run_training(load_recipe(str(path)), log=lambda *a, **k: None)
    with open(summary["metrics"]) as f:
        losses = [json.loads(line)["loss"] for line in f]
    want = reference["train_losses"]["pynative/fp32/gelu/FusedAdamWeightDecay/constant"]
    assert abs(losses[0] - want[0]) <= TOL and abs(losses[1] - want[1]) > 0.05


IMPLEMENTATIONS = {"cpu": (dict(foreach=True), dict(fused=True), dict(foreach=False)),
                   "gpu": (dict(fused=True), dict(foreach=True))}


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_optimizer_matches_mindspores_measured_updates(device):
    """adamwd.json: MindSpore's AdamWeightDecay and MindFormers' fused / FP32-state optimizers on a 4-element
    parameter, 3 steps, several (lr, eps, weight decay); our rule in each torch implementation of the device."""
    from gpt2_ascend.train.optim import use_mindspore_rule
    with open(os.path.join(REFERENCE, "adamwd.json")) as f:
        probe = json.load(f)
    where = "cuda" if device == "gpu" else "cpu"
    for run in probe["runs"]:
        c = run["config"]
        for impl in IMPLEMENTATIONS[device]:
            p = torch.nn.Parameter(torch.tensor(probe["W0"], device=where))
            opt = torch.optim.AdamW([dict(params=[p], weight_decay=c["wd"])], lr=c["lr"], betas=(c["b1"], c["b2"]),
                                    eps=c["eps"], **impl)
            use_mindspore_rule(opt)
            for grad, want in zip(probe["grads"], run["params_after_each_step"]):
                p.grad = torch.tensor(grad, device=where)
                opt.step()
                got = p.detach().cpu()
                assert torch.allclose(got, torch.tensor(want), rtol=0, atol=5e-7), (run["optimizer"], impl, got, want)
