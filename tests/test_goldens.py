"""Golden single-process runs through train.py's main(): a tiny pretrain (with an evaluation), the same run
stopped at step 3 and resumed, a LoRA finetune of its export, and an SST-2 classifier trained on the real dev.tsv
with the GPT-2 tokenizer. Each must reproduce its recorded losses, gradient norms, evaluations and final weights to
the tolerances another CPU needs (tests/helpers/goldens.py says which and why); the resumed run must also equal
the uninterrupted one bit for bit, both being run here. The torchrun layouts (TP, 1F1B pipeline, FSDP) are checked
the same way in tests/test_parallel.py, on the runs that file makes anyway."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from conftest import load_script
from helpers.goldens import assert_golden, read_tensors, run_record

train = load_script("train.py")
STEPS = 6

RECIPE = dict(
    device="cpu", seed=7, do_eval=True, eval_step_interval=3,
    runner_config=dict(batch_size=2, max_steps=STEPS, progress_bar=False),
    model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                                 hidden_dropout_rate=0.1, attention_dropout_rate=0.1, eos_token_id=511,
                                 pad_token_id=511)),
    # warmup and decay over a fixed span: a run stopped early and resumed follows the same schedule
    lr_schedule=dict(type="polynomial", learning_rate=1e-3, lr_end=1e-4, warmup_steps=1, total_steps=STEPS),
    callbacks=[dict(type="MFLossMonitor", per_print_times=1),
               dict(type="CheckpointMonitor", save_checkpoint_steps=3, keep_checkpoint_max=2)],
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("goldens")
    rng = np.random.default_rng(11)
    np.save(root / "train.npy", rng.integers(0, 512, (64, 17)).astype(np.uint16))
    np.save(root / "valid.npy", rng.integers(0, 512, (6, 16)).astype(np.uint16))
    recipe = dict(RECIPE, train_dataset=dict(data_loader=dict(dataset_dir=str(root / "train.npy"))),
                  eval_dataset=dict(data_loader=dict(dataset_dir=str(root / "valid.npy"))))
    (root / "lm.yaml").write_text(yaml.safe_dump(recipe))
    return root


def train_ok(*args):
    """train.py in this process, on one intra-op thread (what the goldens were recorded with)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main([str(a) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrain(world):
    out = world / "pretrain"
    train_ok("--config", world / "lm.yaml", "--output_dir", out)
    return out


def test_pretrain(pretrain):
    assert_golden("pretrain", run_record(pretrain))


def test_stopped_at_step_3_then_resumed(world, pretrain):
    """The second half of the run from its step-3 checkpoint: model, optimizer, schedule position, data position
    and RNG states restored, so it ends exactly where the uninterrupted run does."""
    out = world / "resumed"
    train_ok("--config", world / "lm.yaml", "--output_dir", out, "--max_steps", 3)
    train_ok("--config", world / "lm.yaml", "--output_dir", out, "--resume", "auto")
    assert_golden("pretrain", run_record(out))
    assert metrics(out) == metrics(pretrain)  # same machine, same process: bit for bit
    resumed, uninterrupted = read_tensors(out / "final"), read_tensors(pretrain / "final")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def metrics(out) -> list:
    """metrics.jsonl's per-step numbers, without the ones that measure time."""
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if "time" not in k and "per_s" not in k} for row in rows]


def test_lora_finetune(world, pretrain):
    out = world / "lora"
    pet = dict(pet_type="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, target_modules="c_attn|c_fc")
    train_ok("--config", world / "lm.yaml", "--output_dir", out, "--run_mode", "finetune", "--load_checkpoint",
             pretrain / "final", *(f"model.model_config.pet_config.{k}={v}" for k, v in pet.items()),
             "lr_schedule.learning_rate=1e-2")
    assert_golden("lora", run_record(out, "final/adapter/adapter_model.safetensors"))


def test_sst2_classifier(world, data_dir):
    dev = os.path.join(data_dir, "sst2", "dev.tsv")
    out = world / "sst2"
    train_ok("--config", world / "lm.yaml", "--output_dir", out, "--train_dataset_dir", dev, "--eval_dataset_dir", dev,
             "model.arch.type=GPT2ForSequenceClassification", "model.model_config.vocab_size=50257",
             "model.model_config.eos_token_id=50256", "model.model_config.pad_token_id=50256",
             "model.model_config.seq_length=32", "runner_config.batch_size=4", "eval_dataset.max_samples=48",
             "lr_schedule.learning_rate=3e-3")
    assert_golden("sst2", run_record(out))
