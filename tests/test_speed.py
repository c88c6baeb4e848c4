"""Speed features keep the numbers: the fast path's losses over 20 steps equal the plain path's (fp32, CPU).
The speed itself is measured on a GPU by bench/train.py (docs/performance.md), never in a test."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from gpt2_ascend.train.recipe import load_recipe
from gpt2_ascend.train.trainer import run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    rows = np.random.default_rng(0).integers(0, 500, size=(10, 33), dtype=np.uint16)
    np.save(root / "train.npy", np.tile(rows, (20, 1)))  # ten sequences, learnable in a few steps
    with open(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_tiny.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe.update(do_eval=False, data_cache_dir=str(root / "cache"))
    recipe["model"]["model_config"].update(seq_length=32, vocab_size=500, hidden_size=64, num_layers=2,
                                           num_heads=4, eos_token_id=499, pad_token_id=499, max_decode_length=32)
    recipe["runner_config"].update(batch_size=4, max_steps=20, progress_bar=False)
    recipe["train_dataset"]["data_loader"]["dataset_dir"] = str(root / "train.npy")
    recipe["eval_dataset"]["data_loader"]["dataset_dir"] = ""
    recipe["callbacks"] = [dict(type="MFLossMonitor", per_print_times=5)]
    path = root / "recipe.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def _losses(recipe_path, out, *overrides):
    run_training(load_recipe(str(recipe_path), [f"output_dir='{out}'", *overrides]), overwrite=True,
                 log=lambda *a, **k: None)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_fast_path_losses_equal_the_plain_path(recipe_path, tmp_path):
    plain = _losses(recipe_path, tmp_path / "plain")
    fast = _losses(recipe_path, tmp_path / "fast", "model.model_config.pad_vocab_size_multiple=64",
                   "runner_config.loss_chunk_size=24")
    assert len(plain) == len(fast) == 20
    assert max(abs(a - b) for a, b in zip(plain, fast)) <= 1e-5
    assert plain[-1] < plain[0]  # it did train


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_gpu_in_bf16_stays_close(recipe_path, tmp_path):
    common = ["device=cuda", "model.model_config.compute_dtype=bfloat16"]
    plain = _losses(recipe_path, tmp_path / "plain", *common)
    fast = _losses(recipe_path, tmp_path / "fast", *common, "model.model_config.pad_vocab_size_multiple=64",
                   "runner_config.loss_chunk_size=64", "runner_config.compile=true")
    assert max(abs(a - b) for a, b in zip(plain, fast)) <= 2e-2  # bf16 tolerance
