"""train.py as a user runs it: kill -9 mid-run and --resume auto, --help, and one-line errors with exit 2."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402  (the CLI module, called in-process for the error cases)
from conftest import HANG_GUARD_S

STEPS = 120
TINY = dict(
    device="cpu", seed=3,
    runner_config=dict(batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS, progress_bar=False),
    model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                                 hidden_dropout_rate=0.1, attention_dropout_rate=0.1, eos_token_id=511,
                                 pad_token_id=511)),
    # the schedule spans a fixed STEPS, so a run told to go on longer follows it step for step
    lr_schedule=dict(learning_rate=1e-3, lr_end=1e-4, warmup_steps=10, total_steps=STEPS),
    callbacks=[dict(type="MFLossMonitor", per_print_times=5),
               dict(type="CheckpointMonitor", save_checkpoint_steps=20, keep_checkpoint_max=3)],
)


@pytest.fixture
def tiny_run(tmp_path):
    data = tmp_path / "train.npy"
    np.save(data, np.random.default_rng(0).integers(0, 512, (60, 17)).astype(np.uint16))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, train_dataset=dict(data_loader=dict(dataset_dir=str(data))))))
    return recipe


def _cli(*args, **popen):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_kill_9_mid_run_then_resume_auto_writes_identical_losses(tmp_path, tiny_run):
    """The victim is told to run for ever, so however fast or slow the machine it is still running when its step-40
    checkpoint appears (the event the test waits on). Killed then, and resumed to 40 steps past where it died, it
    writes the losses of a run to that step that never stopped."""
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    proc = _cli("--config", tiny_run, "--output_dir", victim, "--max_steps", 100_000)
    marker = victim / "checkpoint" / "step_0000040" / "manifest.json"
    deadline = time.monotonic() + HANG_GUARD_S
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()
        assert time.monotonic() < deadline, f"no checkpoint at step 40 after {HANG_GUARD_S} s: a hang"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(_losses(victim))
    assert killed_at >= 40  # killed mid-run (lines past its last checkpoint are written again on resume)
    end = max(STEPS, killed_at + 40)

    proc = _cli("--config", tiny_run, "--output_dir", reference, "--max_steps", end)
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, err
    proc = _cli("--config", tiny_run, "--output_dir", victim, "--max_steps", end, "--resume", "auto")
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, err
    assert "resumed from" in err + out and "step_00000" in err + out
    expected = _losses(reference)
    assert [s for s, _ in expected] == list(range(1, end + 1))
    assert _losses(victim) == expected  # bit-identical per-step losses (dropout and data order included)
    assert os.path.isfile(victim / "final" / "model.safetensors")


def test_help_and_a_real_error_exit_code(tmp_path):
    proc = _cli("--help")
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0 and "examples:" in out and "--resume auto" in out and "section.key=value" in out
    proc = _cli("--config", tmp_path / "missing.yaml")
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: recipe not found:")


def _main(capsys, *args):
    code = train.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["runner_config.batch_sise=4"], "error: unknown key 'runner_config.batch_sise'"),
    (["lr_schedule.type=step"], "error: bad value 'step' for 'lr_schedule.type'"),
    (["--train_dataset_dir", "/nonexistent/train.npy"], "error: dataset not found: /nonexistent/train.npy"),
    (["--run_mode", "finetune", "--load_checkpoint", "/nonexistent/model"], "error: load_checkpoint not found"),
    (["--run_mode", "finetune"], "error: run_mode finetune starts from trained weights: pass --load_checkpoint"),
    (["run_mode=predict"], "error: run_mode predict needs input: pass --predict_data"),
    (["--run_mode", "eval", "--load_checkpoint", "/nonexistent/model.ckpt", "--eval_dataset_dir", "/x.npy"],
     "error: load_checkpoint not found: /nonexistent/model.ckpt"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "error: "),
    (["model.model_config.vocab_size=100"], "error: the training data holds token id"),
    (["model.model_config.seq_length=20"], "holds blocks of 17 tokens but max_length is 21"),
    (["--resume", "/nonexistent/step_0000010"], "error: checkpoint not found: /nonexistent/step_0000010"),
])
def test_bad_inputs_give_one_line_errors_and_exit_2(tmp_path, tiny_run, capsys, extra, message):
    code, err = _main(capsys, "--config", tiny_run, "--output_dir", tmp_path / "out", *extra)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_13b_recipe_on_one_process_names_the_layout(capsys, tmp_path):
    code, err = _main(capsys, "--config", os.path.join(REPO, "configs/gpt2/pretrain_gpt2_13b.yaml"),
                      "--output_dir", tmp_path / "out")
    assert code == 2 and "asks for 32 devices (data_parallel 4 x model_parallel 8 x pipeline_stage 1)" in err
    assert "torchrun --nproc_per_node 32" in err


def test_a_layout_that_does_not_fill_the_world_is_one_line(capsys, tmp_path, tiny_run, monkeypatch):
    # (a recipe with no layout runs data parallel over the world instead: tests/test_hf_workflow.py)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = _main(capsys, "--config", tiny_run, "--output_dir", tmp_path / "out", "--use_parallel", "True",
                      "parallel.data_parallel=4")
    assert code == 2 and "4 x 1 x 1 = 4, but the world size is 2" in err and err.count("\n") == 1


def test_cli_run_writes_every_output(tmp_path, tiny_run, capsys):
    out, valid = tmp_path / "out", tmp_path / "valid.npy"
    np.save(valid, np.random.default_rng(1).integers(0, 512, (6, 16)).astype(np.uint16))  # eval: seq_length wide
    code = train.main(["--config", str(tiny_run), "--output_dir", str(out), "--max_steps", "4",
                       "--eval_dataset_dir", str(valid)])
    printed = capsys.readouterr().out
    assert code == 0 and "\ndone: 4 steps" in printed and "validation perplexity" in printed
    for name in ("metrics.jsonl", "loss_curve.png", "recipe.yaml", "summary.json", "final/config.json",
                 "checkpoint/step_0000004/manifest.json"):
        assert (out / name).exists(), name
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["runner_config"]["max_steps"] == 4 and saved["lr_schedule"]["type"] == "polynomial"
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["eval_ppl"] > 1


def test_resume_with_another_model_shape_is_one_line(tmp_path, tiny_run, capsys):
    out = tmp_path / "out"
    assert train.main(["--config", str(tiny_run), "--output_dir", str(out), "--max_steps", "2"]) == 0
    capsys.readouterr()
    code, err = _main(capsys, "--config", tiny_run, "--output_dir", out, "--max_steps", "4", "--resume", "auto",
                      "model.model_config.hidden_size=64")
    assert code == 2 and err.count("\n") == 1
    assert "error: the checkpoint's weights do not fit this recipe's model (size mismatch for" in err
