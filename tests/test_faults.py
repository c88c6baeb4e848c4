"""The fault suite: what a careless user, a crash or a signal can do to a run, through the real CLIs.

Each case asserts the exit code, that stderr ends in one `error: ...` line naming the problem (no traceback),
and that nothing that existed before was lost or changed (a digest of the run directory before and after).
The CLIs' main() runs in-process where a process of its own adds nothing; signals, kill -9 and the output
directory lock run real processes. docs/reliability.md lists every case with the behaviour it guards.

Shapes are tiny (vocab 512, width 32, 16-token rows) and the learning rate is constant, so that runs of any
length share their first steps exactly: a resumed run is compared bit for bit with one uninterrupted run.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import HANG_GUARD_S, REPO, load_script, tiny_config
from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend import checkpoints as ckpt
from gpt2_ascend.data.tokenizer import default_tokenizer_dir
from gpt2_ascend.train.interrupt import Interrupted, StopOnSignal
from gpt2_ascend.train.metrics import read_metrics
from gpt2_ascend.train.rundir import OutputDirLock
from gpt2_ascend.train.trainer import TrainSettings
from helpers.faults import assert_kept, assert_one_error, digest
from test_parallel import _port as free_port, descendants, kill_tree

train = load_script("train.py")
evaluate = load_script("evaluate.py")
generate = load_script("generate.py")
to_hf = load_script("convert/mindspore_to_hf.py")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
TRAIN = os.path.join(REPO, "train.py")
REFERENCE_STEPS = 100

MICRO = dict(
    device="cpu", seed=3,
    runner_config=dict(batch_size=2, max_steps=REFERENCE_STEPS, progress_bar=False),
    model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                                 hidden_dropout_rate=0.1, attention_dropout_rate=0.1, eos_token_id=511,
                                 pad_token_id=511)),
    lr_schedule=dict(type="constant", learning_rate=1e-3, warmup_steps=0),
    callbacks=[dict(type="MFLossMonitor", per_print_times=1),
               dict(type="CheckpointMonitor", save_checkpoint_steps=1, keep_checkpoint_max=3)],
)


# ---------------------------------------------------------------------------------------------
# fixtures: one uninterrupted run, copied for each case that needs an existing run
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_thread():
    """Tiny shapes: a second intra-op thread only adds waiting (40 steps: 1 s on one thread, 17 s on two when
    the 2 cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def single_threaded():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    np.save(root / "train.npy", rng.integers(0, 512, (64, 17)).astype(np.uint16))
    np.save(root / "wide.npy", rng.integers(0, 512, (8, 33)).astype(np.uint16))
    recipe = dict(MICRO, train_dataset=dict(data_loader=dict(dataset_dir=str(root / "train.npy"))))
    (root / "micro.yaml").write_text(yaml.safe_dump(recipe))
    reference = root / "reference"
    with one_thread():
        assert train.main(["--config", str(root / "micro.yaml"), "--output_dir", str(reference)]) == 0
    return dict(root=root, recipe=str(root / "micro.yaml"), reference=reference, losses=losses(reference))


@pytest.fixture
def run(world, tmp_path):
    """A copy of the reference run (100 steps, checkpoints 98..100, final/, metrics, events)."""
    path = tmp_path / "run"
    shutil.copytree(world["reference"], path)
    return path


@pytest.fixture(scope="session")
def lm_dirs(tmp_path_factory):
    """HF-format tiny GPT-2s with the real vocabulary: sound, with a NaN weight, with huge (finite) weights."""
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(vocab_size=50257, n_embd=32, pad_token_id=50256, eos_token_id=50256,
                                        bos_token_id=50256, initializer_range=0.2)).eval()
    model.save_pretrained(str(root / "sound"))
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")  # one NaN: every logit
    model.save_pretrained(str(root / "nan"))
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 1.0
        model.transformer.wte.weight.mul_(1e36)  # the tied head: logits overflow to inf
    model.save_pretrained(str(root / "huge"))
    np.save(root / "valid.npy", np.random.default_rng(1).integers(0, 50257, (4, 32)).astype(np.uint16))
    return root


def losses(output_dir) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(output_dir, "metrics.jsonl"))]


def call(main, capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_in(capsys, world, output_dir, *args):
    return call(train.main, capsys, "--config", world["recipe"], "--output_dir", output_dir, *args)


def checkpoint_steps(output_dir) -> list:
    return [step for step, _ in ckpt.list_checkpoints(ckpt.checkpoint_root(str(output_dir)))]


# ---------------------------------------------------------------------------------------------
# train.py: a bad recipe, data, model or layout changes nothing
# ---------------------------------------------------------------------------------------------
BAD_RECIPE_TEXT = {
    "malformed YAML": ("runner_config: {batch_size: 2\n", ["is not valid YAML"]),
    "python object tag": ("seed: !!python/object/apply:os.system ['touch {marker}']\n",
                          ["is not valid YAML", "python/object/apply:os.system"]),
    "not a mapping": ("- just\n- a list\n", ["must hold a mapping of sections"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPE_TEXT))
def test_bad_recipe_file(case, world, run, tmp_path, capsys):
    text, fragments = BAD_RECIPE_TEXT[case]
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text.replace("{marker}", str(marker)))
    before = digest(run)
    code, _, err = call(train.main, capsys, "--config", recipe, "--output_dir", run, "--overwrite_output_dir")
    assert code == 2
    assert_one_error(err, *fragments)
    assert not marker.exists()
    assert_kept(before, run)


BAD_OVERRIDES = {
    "unknown key": (["runner_config.batch_sise=4"], ["unknown key 'runner_config.batch_sise'"]),
    "wrong type": (["runner_config.batch_size=two"], ["bad value 'two' for 'runner_config.batch_size'"]),
    "bad choice": (["lr_schedule.type=step"], ["bad value 'step' for 'lr_schedule.type'"]),
    "bad callbacks entry": (["callbacks=[{per_print_times: 3}]"], ["bad callbacks entry", "each needs a type"]),
    "missing data": (["--train_dataset_dir", "/nonexistent/train.npy"], ["dataset not found: /nonexistent/train.npy"]),
    "data of another width": (["model.model_config.seq_length=20"], ["holds blocks of 17 tokens but max_length is 21"]),
    "ids outside the vocabulary": (["model.model_config.vocab_size=100"], ["the training data holds token id"]),
    "missing model": (["--run_mode", "finetune", "--load_checkpoint", "/nonexistent/model"],
                      ["load_checkpoint not found"]),
    "missing resume path": (["--resume", "/nonexistent/step_0000010"], ["checkpoint not found: /nonexistent"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_input_with_overwrite_keeps_the_old_run(case, world, run, capsys):
    """--overwrite_output_dir deletes the old run only once the new one has been validated (issue 12, 1)."""
    extra, fragments = BAD_OVERRIDES[case]
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", *extra)
    assert code == 2
    assert_one_error(err, *fragments)
    assert_kept(before, run)


def test_seq_length_past_the_models_positions_keeps_the_old_run(world, run, tmp_path, capsys):
    shutil.copytree(run / "final", tmp_path / "start")  # (an input inside the run it clears is refused first)
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", "--run_mode", "finetune",
                            "--load_checkpoint", tmp_path / "start", "--train_dataset_dir", world["root"] / "wide.npy",
                            "model.model_config.seq_length=32")
    assert code == 2
    assert_one_error(err, "seq_length 32 exceeds the model's n_positions 16")
    assert_kept(before, run)


def test_a_layout_that_does_not_fit_keeps_the_old_run(world, run, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", "--use_parallel", "True",
                            "parallel.data_parallel=3")
    assert code == 2
    assert_one_error(err, "3 x 1 x 1 = 3, but the world size is 2")
    assert_kept(before, run)


@pytest.mark.parametrize("kind", ["empty", "binary"])
def test_empty_or_binary_data(kind, world, run, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(b"" if kind == "empty" else bytes(np.random.default_rng(0).integers(128, 256, 4096, np.uint8)))
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", "--train_dataset_dir", data,
                            f"data_cache_dir={tmp_path / 'cache'}")
    assert code == 2
    assert_one_error(err, str(data), "empty" if kind == "empty" else "UTF-8")
    assert_kept(before, run)


def test_an_existing_run_needs_resume_or_overwrite(world, run, capsys):
    before = digest(run)
    code, _, err = train_in(capsys, world, run)
    assert code == 2
    assert_one_error(err, "already holds a training run: pass --resume auto")
    assert_kept(before, run)


def test_overwrite_replaces_every_output_of_the_old_run(world, run, capsys):
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", "--max_steps", "2")
    assert code == 0, err
    assert checkpoint_steps(run) == [1, 2]
    assert losses(run) == world["losses"][:2]  # no line of the old 100-step run left
    assert len(os.listdir(run / "tensorboard")) == 1
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert yaml.safe_load((run / "recipe.yaml").read_text())["runner_config"]["max_steps"] == 2
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("case", ["output_dir is a file", "under a file", "unwritable"])
def test_output_dir_that_cannot_be_used(case, world, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    output_dir = {"output_dir is a file": tmp_path / "file", "under a file": tmp_path / "file" / "out",
                  "unwritable": "/sys/gpt2_faults_out" if os.getuid() == 0 else tmp_path / "ro" / "out"}[case]
    if case == "unwritable" and os.getuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
    before = digest(tmp_path)
    code, _, err = train_in(capsys, world, output_dir)
    assert code == 2
    fragment = {"output_dir is a file": "is a file, not a directory", "under a file": "a part of that path is a file",
                "unwritable": "cannot be created"}[case]
    assert_one_error(err, f"--output_dir {output_dir}", fragment)
    assert_kept(before, tmp_path)


def test_a_failed_run_into_a_new_directory_leaves_no_trace(world, tmp_path, capsys):
    code, _, err = train_in(capsys, world, tmp_path / "new", "runner_config.batch_size=200")
    assert code == 2 and "error: " in err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# resume: a rejected resume changes nothing; damaged checkpoints and metrics
# ---------------------------------------------------------------------------------------------
REJECTED_RESUMES = {
    "changed batch size": (["runner_config.batch_size=4"], ["keep the global batch the same"]),
    "past max_steps": (["--max_steps", "50"], ["is at step 100, past max_steps 50"]),
    "another model shape": (["model.model_config.hidden_size=64"], ["do not fit this recipe's model"]),
    "another data seed": (["--seed", "4"], ["saved with seed=3 but this run has seed=4"]),
}


@pytest.mark.parametrize("case", sorted(REJECTED_RESUMES))
def test_rejected_resume_changes_nothing(case, world, run, capsys):
    """recipe.yaml included: it is written only after every check passed (issue 12, 3)."""
    extra, fragments = REJECTED_RESUMES[case]
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--resume", "auto", *extra)
    assert code == 2
    assert_one_error(err, *fragments)
    assert_kept(before, run)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(100)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {"truncated model.pt": ("model.pt", _truncate, "truncated?"),
          "flipped byte in optimizer.pt": ("optimizer.pt", _flip_byte, "does not match its sha256"),
          "no manifest": ("manifest.json", os.remove, "incomplete")}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_resume_falls_back_past_a_damaged_newest_checkpoint(case, world, run, capsys):
    name, damage, what = DAMAGE[case]
    damage(run / "checkpoint" / "step_0000100" / name)
    code, out, err = train_in(capsys, world, run, "--resume", "auto", "--max_steps", "101")
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning: "))  # on stderr, not stdout
    assert "step_0000100" in warning and what in warning and "trying an older one" in warning
    assert "resumed from" in out and "step_0000099" in out
    assert losses(run)[:100] == world["losses"]  # step 100 trained again, bit for bit


def test_every_checkpoint_corrupt_changes_nothing(world, run, capsys):
    for step in checkpoint_steps(run):
        _truncate(run / "checkpoint" / ckpt.step_dir_name(step) / "model.pt")
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--resume", "auto")
    assert code == 2
    assert_one_error(err, "none is complete and intact")
    assert_kept(before, run)


def test_a_half_written_metrics_line_is_dropped_on_resume(world, run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 101, "loss": 6.1')  # a crash in the middle of a line
    code, _, err = train_in(capsys, world, run, "--resume", "auto", "--max_steps", "101")
    assert code == 0, err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 102))
    assert losses(run)[:100] == world["losses"]


def test_callbacks_in_list_form_on_the_command_line(world, tmp_path, capsys):
    """The form the recipes use; it changes only the keys it gives (the log interval stays 1)."""
    code, _, err = train_in(capsys, world, tmp_path / "out", "--max_steps", "3",
                            "callbacks=[{type: CheckpointMonitor, save_checkpoint_steps: 2}]")
    assert code == 0, err
    assert checkpoint_steps(tmp_path / "out") == [2, 3]
    assert losses(tmp_path / "out") == world["losses"][:3]


# ---------------------------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------------------------
def test_nan_loss_in_fp32_stops_with_one_line(world, tmp_path, capsys):
    code, _, err = train_in(capsys, world, tmp_path / "out", "model.model_config.initializer_range=1e30")
    assert code == 1  # the run failed, not its input
    assert_one_error(err, "at step 1: training stopped (no checkpoint was saved yet)", "lower the learning rate")
    assert checkpoint_steps(tmp_path / "out") == []


def test_fp16_overflow_skips_then_stops(world, tmp_path, capsys):
    code, _, err = train_in(capsys, world, tmp_path / "out", "model.model_config.compute_dtype=float16",
                            "runner_wrapper.max_consecutive_skips=3")
    assert code == 1
    assert_one_error(err, "3 steps in a row overflowed in fp16 (the last at step 3",
                     "the last good checkpoint is step 2")
    records = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    assert [r["skipped"] for r in records] == [True, True, True]
    assert [r["loss_scale"] for r in records] == [2.0 ** 32, 2.0 ** 31, 2.0 ** 30]


# ---------------------------------------------------------------------------------------------
# one run per output directory
# ---------------------------------------------------------------------------------------------
def test_a_locked_output_dir_names_the_holder(world, run, capsys):
    with OutputDirLock(str(run)):
        before = digest(run)
        code, _, err = train_in(capsys, world, run, "--resume", "auto", "--max_steps", "101")
        assert code == 2
        assert_one_error(err, f"is in use by another training run (pid {os.getpid()})")
        assert_kept(before, run)
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# real processes: signals, kill -9, the lock of a running run
# ---------------------------------------------------------------------------------------------
class Process:
    """train.py as a user runs it (or under torchrun); stderr is collected by a thread so that a test can
    wait for a line. Whatever is still running when the test ends is killed, workers included."""
    running: list = []

    def __init__(self, *args, torchrun: int = 0):
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        launcher = [sys.executable]
        if torchrun:
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port",
                         str(free_port())]
        self.proc = subprocess.Popen([*launcher, TRAIN, *map(str, args)], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        Process.running.append(self.proc)
        self.err_lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.err_lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, condition, what: str, timeout: float = HANG_GUARD_S):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"train.py ended before {what}: {''.join(self.err_lines)}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: a hang"
            time.sleep(0.01)

    def finish(self, timeout: float = HANG_GUARD_S) -> tuple[int, str]:
        """The exit code and stderr; a process that does not end in time (a hang) fails the test."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
        self.proc.stdout.read()
        self.reader.join(timeout)
        return code, "".join(self.err_lines)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    while Process.running:
        proc = Process.running.pop()
        if proc.poll() is None:
            kill_tree(proc.pid)


def _stepped(output_dir, step: int):
    return lambda: len(read_metrics(os.path.join(output_dir, "metrics.jsonl"))) >= step


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_and_says_how_to_resume(sig, world, tmp_path, capsys):
    out, rarely = tmp_path / "out", "callbacks=[{type: CheckpointMonitor, save_checkpoint_steps: 1000}]"
    p = Process("--config", world["recipe"], "--output_dir", out, "--max_steps", "100000", rarely)
    p.wait_for(_stepped(out, 1), "first step")
    p.proc.send_signal(sig)
    code, err = p.finish()
    assert code == 128 + sig
    last = assert_one_error(err, f"interrupted by {sig.name} after step", "checkpoint saved:",
                            f"to continue: python {TRAIN} --config {world['recipe']} --output_dir {out} "
                            f"--max_steps 100000 '{rarely}' --resume auto")
    step = int(last.split("after step ")[1].split(",")[0])
    assert checkpoint_steps(out) == [step] and f"step_{step:07d}" in last  # saved for the signal
    ckpt.verify_checkpoint(str(out / "checkpoint" / ckpt.step_dir_name(step)))
    assert not (out / ".lock").exists()
    if sig == signal.SIGINT:  # and the resumed run goes on exactly as if never stopped
        code, _, err = train_in(capsys, world, out, "--max_steps", step + 2, "--resume", "auto")
        assert code == 0, err
        assert losses(out) == world["losses"][:step + 2]


def _worker(launcher_pid: int, rank: int) -> int:
    for pid in descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            pass
    raise AssertionError(f"no rank {rank} worker under {launcher_pid}")


def test_sigterm_to_one_rank_under_torchrun_stops_every_rank_at_one_step(world, tmp_path):
    """A signal reaches the workers at different moments (here: only rank 1 gets it); the ranks agree on the
    step, save the sharded checkpoint together and exit, rank 0 alone saying so. (torchrun itself then
    reports the workers' exit with a traceback of its own: not ours to shape.)"""
    out, rarely = tmp_path / "out", "callbacks=[{type: CheckpointMonitor, save_checkpoint_steps: 1000}]"
    p = Process("--use_parallel", "True", "--config", world["recipe"], "--output_dir", out, "--max_steps", "100000",
                "parallel.data_parallel=2", "runner_config.batch_size=1", rarely, torchrun=2)
    p.wait_for(_stepped(out, 1), "first step")
    os.kill(_worker(p.proc.pid, 1), signal.SIGTERM)
    code, err = p.finish()
    assert code != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "interrupted by SIGTERM after step" in ours[0], err[-3000:]
    assert f"to continue: torchrun --nproc_per_node 2 {TRAIN} --use_parallel True" in ours[0]
    step = int(ours[0].split("after step ")[1].split(",")[0])
    assert checkpoint_steps(out) == [step]
    manifest = ckpt.verify_checkpoint(str(out / "checkpoint" / ckpt.step_dir_name(step)))
    assert {"rank_0.pt", "rank_1.pt"} <= set(manifest["files"]) and manifest["step"] == step
    assert not (out / ".lock").exists()


def test_a_second_sigint_stops_at_once_and_corrupts_nothing(world, tmp_path):
    out = tmp_path / "out"  # a slow step (~0.5 s) so that the second signal lands inside one
    p = Process("--config", world["recipe"], "--output_dir", out, "--max_steps", "100000",
                "model.model_config.hidden_size=512", "model.model_config.num_layers=4", "runner_config.batch_size=32")
    p.wait_for(_stepped(out, 1), "first step")
    p.proc.send_signal(signal.SIGINT)
    p.wait_for(lambda: any("stopping after this step" in line for line in p.err_lines), "stop notice")
    p.proc.send_signal(signal.SIGINT)
    code, err = p.finish()
    assert code == 130
    if checkpoint_steps(out):  # the resume command only where there is a checkpoint to resume from
        assert_one_error(err, "interrupted by SIGINT: stopped at once; complete checkpoints are intact",
                         "to continue: ", "--resume auto")
    else:  # (the signals landed before the first save)
        last = assert_one_error(err, "interrupted by SIGINT: stopped at once; no checkpoint was saved yet",
                                "to start again: ", "--overwrite_output_dir")
        assert "--resume" not in last
    for step in checkpoint_steps(out):  # whatever was written is complete
        ckpt.verify_checkpoint(str(out / "checkpoint" / ckpt.step_dir_name(step)))
    if (out / "checkpoint").exists():  # (the signals may land before the first save began)
        assert not [name for name in os.listdir(out / "checkpoint") if name.startswith(".")]
    with OutputDirLock(str(out)):  # released
        pass


def test_stop_on_signal_first_asks_then_interrupts(capsys):
    """The handler itself, with real signals: graceful once, at once the second time, handlers restored."""
    previous = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        stop.graceful = True
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here
    assert signal.getsignal(signal.SIGINT) is previous
    assert "SIGINT: stopping after this step" in capsys.readouterr().err


def test_kill_9_while_saving_then_a_second_run_then_resume_bit_exact(world, tmp_path, capsys):
    """A checkpoint every step, so the kill lands in or near a save; the lock dies with the process."""
    out = tmp_path / "out"
    p = Process("--config", world["recipe"], "--output_dir", out, "--max_steps", "100000")
    p.wait_for(lambda: os.path.isfile(out / "checkpoint" / "step_0000005" / "manifest.json"), "fifth checkpoint")
    code, _, err = train_in(capsys, world, out, "--resume", "auto")
    assert code == 2
    assert_one_error(err, f"is in use by another training run (pid {p.proc.pid})")
    p.proc.kill()
    assert p.finish()[0] == -signal.SIGKILL
    newest = checkpoint_steps(out)[-1]
    code, _, err = train_in(capsys, world, out, "--resume", "auto", "--max_steps", newest + 2)
    assert code == 0, err  # no stale lock, stale temporaries removed
    assert losses(out) == world["losses"][:newest + 2]
    assert not [name for name in os.listdir(out / "checkpoint") if name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------------------------
def _evaluate(capsys, lm_dirs, model, *args):
    return call(evaluate.main, capsys, "--model", lm_dirs / model, "--eval_dataset_dir", lm_dirs / "valid.npy",
                "--seq_length", "32", "--device", "cpu", "--no_progress", *args)


def _strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("case", ["a directory", "under a file"])
def test_evaluate_prints_the_result_before_a_bad_output_json_path(case, lm_dirs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path if case == "a directory" else tmp_path / "file" / "result.json"
    before = digest(tmp_path)
    code, out, err = _evaluate(capsys, lm_dirs, "sound", "--output_json", target)
    assert code == 2
    assert out.startswith("perplexity ") and _strict_json(out.splitlines()[1])["ppl"] > 1  # the result stands
    assert_one_error(err, f"cannot write --output_json {target}")
    assert_kept(before, tmp_path)  # no temporary file left behind


@pytest.mark.parametrize("model", ["nan", "huge"])
def test_evaluate_refuses_a_non_finite_result(model, lm_dirs, tmp_path, capsys):
    code, out, err = _evaluate(capsys, lm_dirs, model, "--output_json", tmp_path / "r.json")
    assert code == 2
    assert_one_error(err, "the evaluation's", "NaN/inf")
    for text in (out.splitlines()[1], (tmp_path / "r.json").read_text()):
        result = _strict_json(text)  # strict JSON: null where the number is not finite, and why
        assert result["ppl"] is None and "NaN/inf" in result["error"]


EVALUATE_ERRORS = {
    "missing dataset": (["--eval_dataset_dir", "/nonexistent/valid.npy"], "dataset not found"),
    "seq_length past the context": (["--seq_length", "128"], "longer than the model's context n_positions=64"),
    "missing model": (["--model", "/nonexistent/model"], "model path not found"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_ERRORS))
def test_evaluate_errors(case, lm_dirs, capsys):
    extra, fragment = EVALUATE_ERRORS[case]
    code, out, err = _evaluate(capsys, lm_dirs, "sound", *extra)
    assert code == 2 and out == ""
    assert_one_error(err, fragment)


def test_evaluate_nan_model_as_a_real_process(lm_dirs):
    proc = subprocess.run([sys.executable, "evaluate.py", "--model", str(lm_dirs / "nan"), "--eval_dataset_dir",
                           str(lm_dirs / "valid.npy"), "--seq_length", "32", "--device", "cpu", "--no_progress"],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2
    assert_one_error(proc.stderr, "the evaluation's loss is nan")
    assert _strict_json(proc.stdout.splitlines()[1])["loss"] is None


# ---------------------------------------------------------------------------------------------
# generate.py
# ---------------------------------------------------------------------------------------------
def _generate(capsys, lm_dirs, model, *args):
    return call(generate.main, capsys, "--model", lm_dirs / model, "--device", "cpu", "--max_new_tokens", "4", *args)


@pytest.mark.parametrize("model, sampling", [("nan", []), ("huge", []), ("nan", ["--do_sample", "--seed", "1"])])
def test_generate_refuses_non_finite_logits(model, sampling, lm_dirs, capsys):
    code, out, err = _generate(capsys, lm_dirs, model, "--prompt", "Hello", *sampling)
    assert code == 2 and out == ""  # no garbage printed
    assert_one_error(err, "logits became NaN/inf by new token 1")


GENERATE_ERRORS = {
    "top_p above 1": (["--prompt", "x", "--top_p", "1.5"], "top_p"),
    "zero temperature": (["--prompt", "x", "--do_sample", "--temperature", "0"], "temperature"),
    "negative top_k": (["--prompt", "x", "--top_k", "-1"], "top_k"),
    "over-long prompt": (["--prompt", "word " * 70], "n_positions=64"),
    "missing prompt file": (["--prompt_file", "/nonexistent/prompts.txt"],
                            "prompt file not found: /nonexistent/prompts.txt (--prompt_file)"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_ERRORS))
def test_generate_errors(case, lm_dirs, capsys):
    extra, fragment = GENERATE_ERRORS[case]
    code, out, err = _generate(capsys, lm_dirs, "sound", *extra)
    assert code == 2 and out == ""
    assert_one_error(err, fragment)


def test_generate_non_utf8_prompt_file_names_the_flag_and_file(lm_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"fine\n\xff\xfe broken\n")
    code, _, err = _generate(capsys, lm_dirs, "sound", "--prompt_file", prompts)
    assert code == 2
    assert_one_error(err, f"--prompt_file {prompts} is not UTF-8 text (byte 0xff at offset 5)")


def test_generate_blank_prompt_lines_are_skipped_and_reported(lm_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nWorld\n   \n")
    code, out, err = _generate(capsys, lm_dirs, "sound", "--prompt_file", prompts, "--ignore_eos")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Hello") and lines[1].startswith("World")
    assert f"note: --prompt_file {prompts}: skipped 2 blank line(s) (line 2, 4)" in err


def test_generate_prints_the_texts_before_a_bad_output_json_path(lm_dirs, tmp_path, capsys):
    code, out, err = _generate(capsys, lm_dirs, "sound", "--prompt", "Hello", "--output_json", tmp_path)
    assert code == 2 and out.startswith("Hello")
    assert_one_error(err, f"cannot write --output_json {tmp_path}")
    assert os.listdir(tmp_path) == []


def test_generate_nan_model_as_a_real_process(lm_dirs):
    proc = subprocess.run([sys.executable, "generate.py", "--model", str(lm_dirs / "nan"), "--prompt", "Hello",
                           "--max_new_tokens", "4", "--device", "cpu"],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_error(proc.stderr, "logits became NaN/inf")


# ---------------------------------------------------------------------------------------------
# the model, data preparation, conversion
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, fragment", [
    ([[1, 2, 512]], "token ids must be in [0, 512) (the vocabulary), found 1..512"),
    ([[-1, 2]], "found -1..2"),
    (torch.zeros(2, 0, dtype=torch.long), "non-empty (batch, sequence) tensor of token ids, got shape (2, 0)"),
])
def test_forward_with_ids_it_cannot_embed_is_one_value_error(ids, fragment):
    model = GPT2LMHeadModel(tiny_config())
    with pytest.raises(ValueError) as e:
        model(torch.as_tensor(ids))
    assert fragment in str(e.value)


def test_sst2_label_outside_the_label_set_fails_at_preparation(tmp_path, capsys, data_dir):
    from gpt2_ascend.data import txtcls
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\na fine film \t1\na strange one \t2\n")
    code, _, err = call(txtcls.main, capsys, "--input_file", tsv, "--output_file", tmp_path / "out.npz")
    assert code == 2
    assert_one_error(err, f"{tsv} line 3: label 2 is not a sst_2 label (expected 0 or 1)")
    assert sorted(os.listdir(tmp_path)) == ["train.tsv"]


def _ckpt_damage(kind: str, path):
    data = open(os.path.join(FIXTURES, "mindspore_gpt2_micro.ckpt"), "rb").read()
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "corrupt":
        data = data[:200] + bytes(b ^ 0x5A for b in data[200:232]) + data[232:]
    else:
        data = bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8))
    path.write_bytes(data)


@pytest.mark.parametrize("kind, fragment", [("truncated", "is truncated or corrupt"), ("corrupt", "fails its crc check"),
                                            ("random", "is not a MindSpore checkpoint")])
def test_damaged_mindspore_ckpt(kind, fragment, tmp_path, capsys):
    source = tmp_path / "model.ckpt"
    _ckpt_damage(kind, source)
    code, _, err = call(to_hf.main, capsys, "--mindspore_path", source, "--output_dir", tmp_path / "hf",
                        "--n_head", "2")
    assert code == 2
    assert_one_error(err, str(source), fragment)
    assert not (tmp_path / "hf").exists()


def test_bad_shard_size(tmp_path, capsys):
    code, _, err = call(to_hf.main, capsys, "--mindspore_path", os.path.join(FIXTURES, "mindspore_gpt2_micro.ckpt"),
                        "--output_dir", tmp_path / "hf", "--n_head", "2", "--max_shard_size", "10XB")
    assert code == 2
    assert_one_error(err, "10XB")
    assert not (tmp_path / "hf").exists()


# =============================================================================================
# issue 23, runs: no checkpoint with a NaN, run-directory states, inputs inside the output directory, integer data,
# the memory budget, paths (control characters, symlink loops, stale temporaries, a checkpoint pruned mid-read)
# =============================================================================================
# Weights drawn with std 2 and a weight decay whose factor (1 - lr * wd) is -3e38: the first update multiplies
# every weight above 1.13 in size past float32's largest value (inf), while that step's loss and gradient norm are
# finite, so only the check on what is saved can catch it.
OVERFLOW = ["optimizer.weight_decay=3e41", "model.model_config.initializer_range=2.0"]
NONFINITE = "the model's weights or optimizer states became non-finite by step"


def all_finite(states) -> bool:
    """Every floating tensor in a (nested) state dict is finite."""
    if isinstance(states, torch.Tensor):
        return not states.is_floating_point() or bool(torch.isfinite(states).all())
    if isinstance(states, dict):
        return all(all_finite(v) for v in states.values())
    if isinstance(states, (list, tuple)):
        return all(all_finite(v) for v in states)
    return True


def checkpoint_is_finite(output_dir, step: int) -> bool:
    path = str(output_dir / "checkpoint" / ckpt.step_dir_name(step))
    return all_finite(ckpt.load_checkpoint(path))


def test_an_update_that_overflows_the_weights_writes_nothing_and_exits_1(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = train_in(capsys, world, out, "--max_steps", "1", *OVERFLOW)
    assert code == 1  # the run failed, not its input
    assert_one_error(err, f"{NONFINITE} 1 (", "holds inf", "no checkpoint or final/ was written with them",
                     "(no checkpoint was saved yet)")
    assert "done:" not in stdout
    assert not (out / "checkpoint").exists() and not (out / "final").exists() and not (out / "summary.json").exists()
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in read_metrics(str(out / "metrics.jsonl")))


def test_fp16_skips_then_an_overflowing_update_leaves_only_finite_checkpoints(world, tmp_path, capsys):
    """Loss scaling skips the first steps (their gradients overflow fp16), saving each; the first step it applies
    makes the weights inf: that step is not saved, and the checkpoint the line names is finite."""
    out = tmp_path / "out"
    code, _, err = train_in(capsys, world, out, "--max_steps", "60", "model.model_config.compute_dtype=float16",
                            *OVERFLOW)
    assert code == 1
    last = assert_one_error(err, NONFINITE, "the last good checkpoint is step")
    stopped, good = int(last.split("by step ")[1].split(" ")[0]), int(last.split("checkpoint is step ")[1].split(";")[0])
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["skipped"] for r in records] == [True] * (stopped - 1) + [False]  # skipped, then applied: inf
    assert good == stopped - 1 and checkpoint_steps(out) == [good - 2, good - 1, good]
    assert all(checkpoint_is_finite(out, step) for step in checkpoint_steps(out))
    assert not (out / "final").exists()


def test_a_diverging_run_names_a_last_checkpoint_that_is_finite(world, tmp_path, capsys):
    """lr 1e37: the first update keeps the weights finite (about 1e37), the next forward overflows (NaN loss)."""
    out = tmp_path / "out"
    code, _, err = train_in(capsys, world, out, "--max_steps", "10", "lr_schedule.learning_rate=1e37")
    assert code == 1
    last = assert_one_error(err, "training stopped, the last good checkpoint is step")
    good = int(last.split("checkpoint is step ")[1].split(";")[0])
    assert checkpoint_steps(out)[-1] == good and checkpoint_is_finite(out, good)
    assert not (out / "final").exists()


def test_a_diverging_lora_run_names_a_finite_adapter_checkpoint(world, run, tmp_path, capsys):
    out = tmp_path / "lora"
    code, _, err = train_in(capsys, world, out, "--max_steps", "10", "--run_mode", "finetune", "--load_checkpoint",
                            run / "final", "model.model_config.pet_config.pet_type=lora",
                            "model.model_config.pet_config.lora_rank=4", "model.model_config.pet_config.lora_alpha=8",
                            "lr_schedule.learning_rate=1e37")
    assert code == 1
    last = assert_one_error(err, "the last good checkpoint is step")
    good = int(last.split("checkpoint is step ")[1].split(";")[0])
    state = ckpt.load_checkpoint(str(out / "checkpoint" / ckpt.step_dir_name(good)))
    assert any("lora_B" in name for name in state["model"]) and all_finite(state)
    assert not (out / "final").exists()


def test_an_in_memory_run_that_overflows_raises_training_stopped():
    from gpt2_ascend.train import TrainingStopped, run_training
    from gpt2_ascend.train.job import ModelSpec, OptimizerSettings, TrainJob
    blocks = np.random.default_rng(0).integers(0, 512, (8, 17))
    job = TrainJob(model=ModelSpec(config=tiny_config(initializer_range=2.0), seq_length=16), train_data=blocks,
                   optimizer=OptimizerSettings(learning_rate=1e-3, lr_schedule="constant", weight_decay=3e41),
                   batch_size=2, device="cpu",
                   settings=dataclasses.replace(TrainSettings(), total_steps=1, progress=False))
    with pytest.raises(TrainingStopped) as e:  # (no checkpoints in memory: the end of the loop checks)
        run_training(job, log=lambda *_: None)
    assert f"{NONFINITE} 1" in str(e.value)


def test_torchrun_fsdp_run_that_overflows_stops_every_rank_with_one_line(world, tmp_path):
    out = tmp_path / "out"
    p = Process("--use_parallel", "True", "--config", world["recipe"], "--output_dir", out, "--max_steps", "3",
                "parallel.data_parallel=2", "parallel.optimizer_shard=True", "runner_config.batch_size=1", *OVERFLOW,
                torchrun=2)
    code, err = p.finish()
    assert code != 0
    ours = [line for line in err.splitlines() if line.startswith(("error: ", "[rank"))]
    assert len(ours) == 1 and ours[0].startswith(f"error: {NONFINITE} 1 ("), err[-3000:]
    assert not (out / "checkpoint").exists() and not (out / "final").exists()


def test_resuming_a_checkpoint_that_holds_nan_is_refused(world, run, capsys):
    """A checkpoint of older code (nothing here writes one): refused, and nothing changes."""
    step = run / "checkpoint" / "step_0000100"
    state = torch.load(step / "model.pt", weights_only=True)
    state["transformer.ln_f.weight"][0] = float("nan")
    torch.save(state, step / "model.pt")
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["model.pt"] = ckpt.describe(str(step / "model.pt"))
    (step / "manifest.json").write_text(json.dumps(manifest))
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--resume", "auto", "--max_steps", "102")
    assert code == 2
    assert_one_error(err, f"checkpoint {step} holds non-finite values", "transformer.ln_f.weight holds NaN")
    assert_kept(before, run)


# ---- run-directory states: what --resume and --overwrite_output_dir may do in each ----
def _remove(run, *names):
    for name in names:
        path = run / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


RUN_STATES = {  # how the run is damaged, the arguments, the fragments of the one line
    "finished, checkpoint/ deleted": (lambda r, t: _remove(r, "checkpoint"), ["--resume", "auto"],
                                      ["has nothing to resume", "a finished run (", "checkpoint/ is missing",
                                       "pass --overwrite_output_dir to start it again"]),
    "finished, checkpoint/ a dangling symlink": (
        lambda r, t: (_remove(r, "checkpoint"), os.symlink(t / "gone", r / "checkpoint")), ["--resume", "auto"],
        ["a finished run (checkpoint/", "checkpoint/ is a dangling symlink to"]),
    "finished, checkpoint/ emptied": (
        lambda r, t: [shutil.rmtree(p) for p in (r / "checkpoint").iterdir()], ["--resume", "auto"],
        ["a finished run", "checkpoint/ holds no step_N directory"]),
    "started, no checkpoint": (lambda r, t: _remove(r, "checkpoint", "final", "summary.json", "loss_curve.png"),
                               ["--resume", "auto"], ["a started run (", "metrics.jsonl to step 100"]),
    "started, a fresh run into it": (lambda r, t: _remove(r, "checkpoint", "final", "summary.json"), [],
                                     ["already holds a training run: pass --resume auto", "it holds a started run"]),
    "finished, --resume of another run's checkpoint": (
        lambda r, t: shutil.copytree(r / "checkpoint" / "step_0000099", t / "other" / "step_0000099"),
        ["--resume", "{tmp}/other/step_0000099"], ["is a checkpoint of another run: pass --overwrite_output_dir"]),
}


@pytest.mark.parametrize("case", sorted(RUN_STATES))
def test_a_directory_holding_a_run_is_never_restarted_silently(case, world, run, tmp_path, capsys):
    damage, args, fragments = RUN_STATES[case]
    damage(run, tmp_path)
    before = digest(run)
    code, _, err = train_in(capsys, world, run, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    assert_one_error(err, *fragments)
    assert_kept(before, run)


def test_resume_auto_with_overwrite_and_no_checkpoint_starts_again(world, run, capsys):
    _remove(run, "checkpoint")
    code, _, err = train_in(capsys, world, run, "--resume", "auto", "--overwrite_output_dir", "--max_steps", "3")
    assert code == 0, err
    assert losses(run) == world["losses"][:3] and checkpoint_steps(run) == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_resume_auto_into_an_empty_directory_starts_at_step_0(world, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")  # not a run's output: the directory is empty of runs
    code, out, err = train_in(capsys, world, tmp_path / "out", "--resume", "auto", "--max_steps", "2")
    assert code == 0, err
    assert "starting from step 0" in out and losses(tmp_path / "out") == world["losses"][:2]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_resume_of_another_runs_checkpoint_with_overwrite_replaces_the_run(world, run, tmp_path, capsys):
    other = tmp_path / "other" / "step_0000099"
    shutil.copytree(run / "checkpoint" / "step_0000099", other)
    code, _, err = train_in(capsys, world, run, "--resume", other, "--overwrite_output_dir", "--max_steps", "100")
    assert code == 0, err
    assert losses(run) == world["losses"][99:100]  # step 100 again, bit for bit; nothing of the old run left
    assert checkpoint_steps(run) == [100]


def test_a_checkpoint_folder_linked_to_another_disk_is_resumed_not_cleared(world, run, tmp_path, capsys):
    """checkpoint/ a symlink to another folder: --resume auto continues the run there (nothing is cleared)."""
    shutil.move(run / "checkpoint", tmp_path / "disk")
    os.symlink(tmp_path / "disk", run / "checkpoint")
    code, _, err = train_in(capsys, world, run, "--resume", "auto", "--max_steps", "101")
    assert code == 0, err
    assert losses(run)[:100] == world["losses"] and len(losses(run)) == 101
    assert (run / "checkpoint").is_symlink() and checkpoint_steps(run) == [99, 100, 101]


# ---- inputs that lie inside what the run deletes or replaces ----
def _adapter_on(base, folder):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(dict(
        base_model_name_or_path=str(base), peft_type="LORA", r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["c_attn"], task_type="CAUSAL_LM", bias="none")))
    return folder


INPUTS_INSIDE = {  # the arguments (RUN: the run's directory, TMP: elsewhere), the fragments
    "start weights in final/, overwrite": (
        ["--overwrite_output_dir", "--run_mode", "finetune", "--load_checkpoint", "RUN/final"],
        ["--load_checkpoint RUN/final lies inside RUN/final, which --overwrite_output_dir deletes before"]),
    "LoRA start weights in final/, resume": (
        ["--resume", "auto", "--max_steps", "101", "--run_mode", "finetune", "--load_checkpoint", "RUN/final",
         "model.model_config.pet_config.pet_type=lora", "model.model_config.pet_config.lora_rank=4"],
        ["--load_checkpoint RUN/final lies inside RUN/final, which this run replaces as it goes"]),
    "data in checkpoint/": (["--overwrite_output_dir", "--train_dataset_dir", "RUN/checkpoint/train.npy"],
                            ["the training data RUN/checkpoint/train.npy lies inside RUN/checkpoint"]),
    "tokenizer in final/": (["--overwrite_output_dir", "tokenizer=RUN/final"], ["tokenizer RUN/final lies inside"]),
    "data cache in tensorboard/": (["--overwrite_output_dir", "data_cache_dir=RUN/tensorboard/cache"],
                                   ["data_cache_dir RUN/tensorboard/cache lies inside RUN/tensorboard"]),
    "an adapter whose base is final/": (
        ["--overwrite_output_dir", "--run_mode", "finetune", "--load_checkpoint", "TMP/adapter"],
        ["the base model of the adapter TMP/adapter RUN/final lies inside RUN/final"]),
}


@pytest.mark.parametrize("case", sorted(INPUTS_INSIDE))
def test_an_input_inside_the_runs_outputs_is_refused_before_anything_is_deleted(case, world, run, tmp_path, capsys):
    args, fragments = INPUTS_INSIDE[case]
    shutil.copy(world["root"] / "train.npy", run / "checkpoint" / "train.npy")
    (run / "tensorboard" / "cache").mkdir()
    _adapter_on(run / "final", tmp_path / "adapter")
    before = digest(run)
    fill = lambda text: text.replace("RUN", str(run)).replace("TMP", str(tmp_path))  # noqa: E731
    code, _, err = train_in(capsys, world, run, *map(fill, args))
    assert code == 2
    assert_one_error(err, *map(fill, fragments))
    assert_kept(before, run)


def test_an_input_beside_the_runs_outputs_is_kept_by_an_overwrite(world, run, capsys):
    """A folder of the user's own in OUTPUT_DIR is no run output: overwriting the run keeps it, and it may be read."""
    shutil.copytree(run / "final", run / "start")
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", "--run_mode", "finetune",
                            "--load_checkpoint", run / "start", "--max_steps", "2")
    assert code == 0, err
    assert (run / "start" / "model.safetensors").exists() and checkpoint_steps(run) == [1, 2]


# ---- integer arrays: ids in the vocabulary, labels in the classes, 0/1 masks, something to score ----
def _npy(tmp_path, name, column_value=None, dtype=np.int32, width=17):
    blocks = np.random.default_rng(0).integers(0, 512, (64, width)).astype(dtype)
    if column_value is not None:
        blocks[5, -1] = column_value  # the last column: a target
    np.save(tmp_path / name, blocks)
    return tmp_path / name


@pytest.mark.parametrize("value, fragments", [
    (-5, ["holds token id -5 (row 5)", "must be in [0, 512)"]),
    (-100, ["holds token id -100 (row 5)", "-100 marks a label to ignore"]),
])
def test_negative_ids_in_the_last_column_are_one_line(value, fragments, world, tmp_path, capsys):
    code, _, err = train_in(capsys, world, tmp_path / "out", "--train_dataset_dir", _npy(tmp_path, "t.npy", value))
    assert code == 2
    assert_one_error(err, "the training data", *fragments)
    assert not (tmp_path / "out").exists()


CLASSIFIER = ["model.arch.type=GPT2ForSequenceClassification", "--max_steps", "3"]


def _npz(path, change=None, rows=32):
    rng = np.random.default_rng(1)
    arrays = dict(input_ids=rng.integers(0, 511, (rows, 16)).astype(np.int64), attention_mask=np.ones((rows, 16), np.int64),
                  labels=rng.integers(0, 2, rows).astype(np.int64))
    arrays["attention_mask"][:, 12:] = 0  # right padding, as prepared SST-2 rows have
    if change:
        change(arrays)
    np.savez(path, **arrays)
    return path


def _set(key, row, value, dtype=None):
    def change(arrays):
        if dtype is not None:
            arrays[key] = arrays[key].astype(dtype)
        arrays[key][row] = value
    return change


BAD_CLASSIFICATION = {
    "fractional label": (_set("labels", 3, 0.5, np.float64), "labels holds 0.5 (row 3), not a whole number"),
    "fractional input id": (_set("input_ids", 4, 7.25, np.float32), "input_ids holds 7.25 (row 4), not a whole number"),
    "a mask of 7": (_set("attention_mask", 2, 7), "attention_mask holds 7 (row 2)"),
    "all-zero masks": (_set("attention_mask", slice(5, 7), 0), "2 row(s) of the training data have an all-zero "
                                                                "attention_mask (the first: row 5)"),
    "label -100": (_set("labels", 9, -100), "label -100 (row 9) is not a class id in [0, 2)"),
    "a negative id": (_set("input_ids", 1, -1), "holds token id -1 (row 1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLASSIFICATION))
def test_bad_classification_arrays_are_one_line_through_train(case, world, tmp_path, capsys):
    change, fragment = BAD_CLASSIFICATION[case]
    data = _npz(tmp_path / "cls.npz", change)
    code, _, err = train_in(capsys, world, tmp_path / "out", "--train_dataset_dir", data, *CLASSIFIER)
    assert code == 2
    assert_one_error(err, fragment)
    assert not (tmp_path / "out").exists()


def test_whole_numbers_in_a_float_array_train_as_integers(world, tmp_path, capsys):
    as_float = _npz(tmp_path / "float.npz", lambda a: a.update(input_ids=a["input_ids"].astype(np.float32),
                                                                labels=a["labels"].astype(np.float64)))
    runs = {}
    for name, data in (("int", _npz(tmp_path / "int.npz")), ("float", as_float)):
        code, _, err = train_in(capsys, world, tmp_path / name, "--train_dataset_dir", data, *CLASSIFIER)
        assert code == 0, err
        runs[name] = losses(tmp_path / name)
    assert runs["float"] == runs["int"] and len(runs["int"]) == 3


@pytest.fixture(scope="session")
def classifier_dir(world, tmp_path_factory):
    """A tiny classifier trained by train.py (vocab 512, rows of 16)."""
    out = tmp_path_factory.mktemp("classifier") / "run"
    data = _npz(tmp_path_factory.mktemp("cls_data") / "train.npz")
    with one_thread():
        assert train.main(["--config", world["recipe"], "--output_dir", str(out), "--train_dataset_dir", str(data),
                           *CLASSIFIER]) == 0
    return out / "final"


@pytest.mark.parametrize("case", ["fractional label", "all-zero masks", "a mask of 7"])
def test_bad_classification_arrays_are_one_line_through_evaluate(case, classifier_dir, tmp_path, capsys):
    change, fragment = BAD_CLASSIFICATION[case]
    data = _npz(tmp_path / "dev.npz", change)
    code, out, err = call(evaluate.main, capsys, "--task", "text_classification", "--model", classifier_dir,
                          "--eval_dataset_dir", data, "--max_length", "16", "--device", "cpu", "--no_progress")
    assert code == 2 and out == ""  # no accuracy printed (it was, exit 0: issue 23, 4)
    assert_one_error(err, f"evaluation data {data}", fragment.replace("training data", f"evaluation data {data}"))


def test_negative_ids_are_one_line_through_evaluate_perplexity(run, tmp_path, capsys):
    data = _npy(tmp_path, "valid.npy", -5, width=16)
    code, out, err = call(evaluate.main, capsys, "--model", run / "final", "--eval_dataset_dir", data,
                          "--seq_length", "16", "--device", "cpu", "--no_progress")
    assert code == 2 and out == ""
    assert_one_error(err, f"evaluation data {data} holds token id -5 (row 5)")


def test_in_memory_data_is_checked_like_files():
    from gpt2_ascend.eval import classification_accuracy
    from gpt2_ascend.train import run_training
    from gpt2_ascend.train.job import ModelSpec, TrainJob
    blocks = torch.randint(0, 512, (8, 17)).float()
    blocks[2, 3] = 0.5
    job = TrainJob(model=ModelSpec(config=tiny_config(), seq_length=16), train_data=blocks, batch_size=2,
                   device="cpu", settings=dataclasses.replace(TrainSettings(), total_steps=1, progress=False))
    with pytest.raises(ValueError, match=r"the training data's input_ids holds 0.5 \(row 2\), not a whole number"):
        run_training(job, log=lambda *_: None)
    data = dict(input_ids=np.ones((4, 8), np.int64), attention_mask=np.ones((4, 8), np.int64),
                labels=np.array([0, 1, 0.5, 1]))
    with pytest.raises(ValueError, match=r"labels holds 0.5 \(row 2\)"):
        classification_accuracy(GPT2ForSequenceClassification(tiny_config()), data)


# ---- the memory budget: sizes from the config, compared with free memory, before anything is allocated ----
BOMB_RUNNER = """
import contextlib, importlib, io, json, resource, sys, time
sys.path.insert(0, {repo!r})
import peft, torch  # imported before anything is timed (LoRA paths import peft inside main())


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


results = {{}}
for case, module, argv in {cases!r}:
    main = importlib.import_module(module).main
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from here
        peak_of = lambda: status("VmHWM")
    except OSError:  # (not writable here: the whole process's peak, an upper bound)
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before, err, start = status("VmRSS"), io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    results[case] = dict(code=code, err=err.getvalue(), seconds=time.perf_counter() - start,
                         grew=peak_of() - before)
with open({out!r}, "w") as f:
    json.dump(results, f)
"""
BOMB_GUARD_S = 300  # a last guard for the whole batch: the bombs hung past 120 s each before the budget existed
GROWTH_LIMIT = 200_000_000  # what a refused bomb may add to the process's peak (it asked for terabytes)


def _config_bomb(source, target, **changes):
    """A copy of a model folder (or of a training checkpoint, its manifest updated) whose config.json says more."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    if (target / "manifest.json").exists():
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["files"]["config.json"] = ckpt.describe(str(target / "config.json"))
        (target / "manifest.json").write_text(json.dumps(manifest))
    return target


BIG_GPT2 = dict(n_layer=1_000_000, n_embd=768, n_head=12)  # the issue's n_layer on GPT-2 small's width: 14 TB


def _bomb_cases(world, lm_dirs, tmp):
    """{case: (command module, argv, fragments of the line)}: sizes from a recipe, config.json, a training
    checkpoint's config.json, a LoRA rank and an adapter_config.json."""
    final = world["reference"] / "final"
    huge_adapter = _adapter_on(final, tmp / "adapter")
    config = json.loads((huge_adapter / "adapter_config.json").read_text())
    (huge_adapter / "adapter_config.json").write_text(json.dumps(dict(config, r=100_000_000_000)))
    train_args = ["--config", world["recipe"], "--output_dir", tmp / "out"]
    return {
        "train.py model.model_config.num_layers=1000000": (
            "gpt2_ascend.commands.train", [*train_args, "model.model_config.num_layers=1000000",
                                           "model.model_config.hidden_size=768", "model.model_config.num_heads=12"],
            ["training the model (n_layer=1000000, n_embd=768", "x 16 bytes of weights, gradients and AdamW states"]),
        "train.py lora_rank 1e11": (
            "gpt2_ascend.commands.train", [*train_args, "--run_mode", "finetune", "--load_checkpoint", final,
                                           "model.model_config.pet_config.pet_type=lora",
                                           "model.model_config.pet_config.lora_rank=100000000000"],
            ["model.model_config.pet_config.lora_rank", "expected an integer in [1, 16777216]"]),
        "generate.py config.json n_layer 1000000": (
            "gpt2_ascend.commands.generate", ["--model", _config_bomb(lm_dirs / "sound", tmp / "g", **BIG_GPT2),
                                              "--prompt", "Hello", "--device", "cpu"],
            ["(n_layer=1000000, n_embd=768, vocab_size=50257"]),
        "evaluate.py config.json n_layer 1000000": (
            "gpt2_ascend.commands.evaluate", ["--model", _config_bomb(lm_dirs / "sound", tmp / "e", **BIG_GPT2),
                                              "--eval_dataset_dir", lm_dirs / "valid.npy", "--seq_length", "32",
                                              "--device", "cpu", "--no_progress"],
            ["(n_layer=1000000, n_embd=768"]),
        "evaluate.py training checkpoint n_layer 1000000": (
            "gpt2_ascend.commands.evaluate",
            ["--model", _config_bomb(world["reference"] / "checkpoint" / "step_0000100", tmp / "c", **BIG_GPT2),
             "--eval_dataset_dir", world["root"] / "train.npy", "--seq_length", "17", "--device", "cpu",
             "--no_progress"], ["the model in", "(n_layer=1000000, n_embd=768"]),
        "generate.py --adapter r 1e11": (
            "gpt2_ascend.commands.generate", ["--model", final, "--adapter", huge_adapter, "--prompt", "x",
                                              "--device", "cpu", "--tokenizer", default_tokenizer_dir()],
            [f"{huge_adapter}", "'r'", "expected an integer in [1, 16777216]"]),
    }


BOMBS = ["train.py model.model_config.num_layers=1000000", "train.py lora_rank 1e11",
         "generate.py config.json n_layer 1000000", "evaluate.py config.json n_layer 1000000",
         "evaluate.py training checkpoint n_layer 1000000", "generate.py --adapter r 1e11"]


@pytest.fixture(scope="session")
def bombs(world, lm_dirs, tmp_path_factory):
    """Every bomb's main() run in one fresh process (a process of its own, so that its peak memory is the bombs'):
    {case: dict(code, err, seconds, grew: bytes the peak resident size rose by), fragments}."""
    tmp = tmp_path_factory.mktemp("bombs")
    cases = _bomb_cases(world, lm_dirs, tmp)
    script = BOMB_RUNNER.format(repo=REPO, cases=[(c, m, [str(a) for a in argv]) for c, (m, argv, _) in cases.items()],
                                out=str(tmp / "results.json"))
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                   check=True, timeout=BOMB_GUARD_S)
    results = json.loads((tmp / "results.json").read_text())
    return {case: dict(results[case], fragments=fragments) for case, (_, _, fragments) in cases.items()}


@pytest.mark.parametrize("case", BOMBS)
def test_a_size_bomb_is_one_line_fast_and_allocates_nothing(case, bombs):
    r = bombs[case]
    assert r["code"] == 2
    if "expected an integer in" in r["fragments"][-1]:  # a LoRA rank beyond the schema's range: refused as it is read
        assert_one_error(r["err"], *r["fragments"])
    else:  # sizes within the schema's ranges whose product no machine has: the memory budget refuses them
        last = assert_one_error(r["err"], *r["fragments"], "bytes) of cpu memory, but", "nothing was allocated")
        needed = int(last.split(" needs ")[1].split("(")[1].split(" bytes")[0])
        assert needed > 10 ** 12  # terabytes: no test machine has them
    print(f"{case}: {r['seconds']:.3f} s in main(), peak grew {r['grew'] / 1e6:.0f} MB")  # docs/reliability.md
    assert r["seconds"] < 30, f"{r['seconds']:.1f} s"  # measured 0.1-0.6 s; a generous guard for a loaded machine
    assert r["grew"] < GROWTH_LIMIT, f"the peak grew {r['grew'] / 1e9:.2f} GB"


def test_from_pretrained_refuses_a_config_bomb_quickly(lm_dirs, tmp_path):
    from gpt2_ascend.budget import MemoryBudgetError
    bomb = _config_bomb(lm_dirs / "sound", tmp_path / "bomb", **BIG_GPT2)
    start = time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=r"n_layer=1000000.* needs .* bytes\) of cpu memory"):
        GPT2LMHeadModel.from_pretrained(str(bomb))
    assert time.perf_counter() - start < 30  # measured 0.01 s


def test_the_key_value_cache_of_too_many_rows_is_one_line(tmp_path, data_dir, capsys):
    """4000 prompts x 131001 positions x 64 layers x keys and values x 8 x 4 bytes: 2.1 TB of cache."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(vocab_size=50257, n_layer=64, n_embd=8, n_head=2, n_positions=2 ** 17,
                                        eos_token_id=50256, pad_token_id=50256, bos_token_id=50256))
    model.save_pretrained(str(tmp_path / "long"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n" * 4000)
    start = time.perf_counter()
    code, out, err = call(generate.main, capsys, "--model", tmp_path / "long", "--prompt_file", prompts,
                          "--batch_size", "4000", "--max_new_tokens", "131000", "--device", "cpu", "--tokenizer",
                          os.path.join(data_dir, "gpt2"))
    assert code == 2 and out == ""
    assert_one_error(err, "the key/value cache of 4000 row(s) x 131001 positions", "(2146320384000 bytes)",
                     "nothing was allocated", "generate fewer rows at a time")
    assert time.perf_counter() - start < 60  # a generous guard (measured: 2 s, mostly the 4000 prompts' tokenizing)


def test_the_parameter_count_is_torchs_own():
    """The budget counts exactly what torch allocates: tied and untied heads, a classifier, vocab padding."""
    from gpt2_ascend.budget import parameter_count
    for config, head in [(tiny_config(), None), (tiny_config(tie_word_embeddings=False), None),
                         (tiny_config(pad_vocab_size_multiple=64, vocab_size=500), None),
                         (tiny_config(n_inner=48), None), (tiny_config(num_labels=3), 3)]:
        model = (GPT2ForSequenceClassification if head else GPT2LMHeadModel)(config)
        assert parameter_count(config, head) == sum(p.numel() for p in model.parameters())


def test_the_budget_compares_with_the_free_memory_it_reads(monkeypatch):
    from gpt2_ascend import budget
    monkeypatch.setattr(budget, "available_memory", lambda device: (1000, "a test's limit"))
    budget.require_memory(1000, "exactly the free bytes")
    with pytest.raises(budget.MemoryBudgetError, match=r"^a buffer needs 1.0 KB \(1001 bytes\) of cpu memory, but "
                                                       r"1.0 KB \(1000 bytes\) is available \(a test's limit\)"):
        budget.require_memory(1001, "a buffer")
    monkeypatch.setattr(budget, "available_memory", lambda device: None)
    budget.require_memory(10 ** 20, "anything, where the free memory cannot be read")


# ---- paths ----
@pytest.mark.parametrize("case", ["newline", "tab", "symlink loop", "dangling symlink"])
def test_an_output_dir_with_a_control_character_or_a_bad_link_is_one_line(case, world, tmp_path, capsys):
    target = {"newline": tmp_path / "a\nb", "tab": tmp_path / "a\tb", "symlink loop": tmp_path / "loop",
              "dangling symlink": tmp_path / "dangling"}[case]
    if case == "symlink loop":
        os.symlink(target, target)  # a link to itself
    if case == "dangling symlink":
        os.symlink(tmp_path / "nowhere", target)
    before = sorted(os.listdir(tmp_path))
    code, _, err = train_in(capsys, world, target, "--max_steps", "1")
    assert code == 2
    fragment = {"newline": r"holds a control character ('\n' at position", "tab": r"('\t' at position",
                "symlink loop": f"{target} is a symlink loop", "dangling symlink": "is a dangling symlink"}[case]
    assert_one_error(err, fragment)
    assert sorted(os.listdir(tmp_path)) == before  # in particular no "a b" (YAML folded the newline into a space)


def test_inputs_with_control_characters_or_symlink_loops_are_named(world, lm_dirs, tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    code, _, err = train_in(capsys, world, tmp_path / "out", "--train_dataset_dir", "train\n.npy")
    assert code == 2
    assert_one_error(err, r"--train_dataset_dir 'train\n.npy' holds a control character")
    code, out, err = call(evaluate.main, capsys, "--model", tmp_path / "loop", "--eval_dataset_dir",
                          lm_dirs / "valid.npy", "--device", "cpu", "--no_progress")
    assert code == 2 and out == ""
    assert_one_error(err, f"model path {tmp_path / 'loop'} cannot be resolved: {tmp_path / 'loop'} is a symlink loop")
    code, out, err = call(generate.main, capsys, "--model", lm_dirs / "sound", "--prompt", "Hi", "--device", "cpu",
                          "--max_new_tokens", "2", "--output_json", tmp_path / "r\r.json")
    assert code == 2 and out.startswith("Hi")  # the texts are printed first
    assert_one_error(err, "holds a control character ('\\r'")


KILLED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import {module} as target
original = target.{writer}.write

def write_then_wait(self, *args):
    original(self, *args)
    open({marker!r}, "w").close()
    signal.pause()  # until the test's kill -9
target.{writer}.write = write_then_wait
from gpt2_ascend.commands import {command}
sys.exit({command}.main({argv!r}))
"""


@pytest.mark.parametrize("command", ["merge_checkpoint", "hf_to_mindspore"])
def test_a_rerun_after_kill_9_clears_its_own_stale_temporaries(command, run, tmp_path, capsys):
    """kill -9 in the middle of the write (the writer waits after its first tensor: an event, not a delay); the
    rerun removes that temporary (this host's, its process dead) but not one of a live process or another host."""
    from gpt2_ascend import fileio
    out = tmp_path / ("merged" if command == "merge_checkpoint" else "model.ckpt")
    argv = (["--src_ckpt_dir", run / "checkpoint" / "step_0000100", "--dst_dir", out] if command == "merge_checkpoint"
            else ["--torch_path", run / "final", "--mindspore_path", out])
    module, writer = (("gpt2_ascend.hf", "SafetensorsWriter") if command == "merge_checkpoint"
                      else ("gpt2_ascend.mindspore_io.ckpt", "CkptWriter"))
    marker = tmp_path / "writing"
    script = KILLED_MID_WRITE.format(repo=REPO, module=module, writer=writer, marker=str(marker), command=command,
                                     argv=[str(a) for a in argv])
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    Process.running.append(proc)
    deadline = time.time() + BOMB_GUARD_S
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the writer never started"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    stale = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert len(stale) == 1 and f"-{proc.pid}-" in stale[0]  # HOST-PID in its name
    host = fileio.owner_tag().rsplit("-", 1)[0]
    keep = [f".{out.name}.tmp-{host}-{os.getpid()}-alive123", f".{out.name}.tmp-otherhost-{proc.pid}-abcd1234"]
    for name in keep:
        (tmp_path / name).write_text("not ours to remove")
    module_main = {"merge_checkpoint": load_script("convert/merge_checkpoint.py"),
                   "hf_to_mindspore": load_script("convert/hf_to_mindspore.py")}[command].main
    code, _, err = call(module_main, capsys, *argv)
    assert code == 0, err
    assert sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n) == sorted(keep)
    assert out.exists()


def test_a_checkpoint_pruned_while_it_is_read_says_so(run, lm_dirs, capsys, monkeypatch):
    """A training run's pruning (its own remove_checkpoint) lands while generate.py reads step 98: the line says
    the checkpoint was removed, not that a save was interrupted."""
    step = run / "checkpoint" / "step_0000098"
    real_load = ckpt.torch_load

    def pruned_meanwhile(path, *args, **kwargs):
        ckpt.prune(str(run / "checkpoint"), keep=2)  # what the run does after saving step 101
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(ckpt, "torch_load", pruned_meanwhile)
    code, out, err = call(generate.main, capsys, "--model", step, "--prompt", "Hi", "--device", "cpu",
                          "--tokenizer", default_tokenizer_dir())
    assert code == 2 and out == ""
    assert_one_error(err, f"{step} was removed while it was read", "read a newer one")
    assert checkpoint_steps(run) == [99, 100] and not [n for n in os.listdir(run / "checkpoint") if n.startswith(".")]


# ---------------------------------------------------------------------------------------------
# the validation layer (issue 23): every file a user hands us, every recipe range, sampling arguments, .bin files,
# labels. Each file is damaged in one field (a wrong type, a value out of range, NaN, a list for a mapping, a key given
# twice, a file named outside its folder) and read by the real CLI: exit 2, one `error:` line naming the file, the
# field and the value, no traceback, and the damaged folder itself unchanged.
# ---------------------------------------------------------------------------------------------
merge_hf_shards = load_script("convert/merge_hf_shards.py")
merge_checkpoint = load_script("convert/merge_checkpoint.py")


@pytest.fixture(scope="session")
def sharded_lm(lm_dirs, tmp_path_factory):
    """lm_dirs' sound model in shards with an index (its word embedding alone in the first shard), with the real GPT-2
    tokenizer files beside it and an adapter for it."""
    from gpt2_ascend.lora import apply_lora, save_adapter
    root = tmp_path_factory.mktemp("sharded")
    model = GPT2LMHeadModel.from_pretrained(str(lm_dirs / "sound"))
    model.save_pretrained(str(root / "model"), max_shard_size="1MB")
    from gpt2_ascend.data.download import default_data_dir
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(default_data_dir(), "gpt2", name), root / "model" / name)
    save_adapter(apply_lora(GPT2LMHeadModel.from_pretrained(str(lm_dirs / "sound")), rank=2, alpha=4.0),
                 str(root / "adapter"), str(root / "model"))
    return root


def _damaged(source, tmp_path, file: str, change):
    """A copy of the folder `source` whose `file` (JSON) is change(its value): a new value, or the file's text (str)."""
    folder = tmp_path / os.path.basename(str(source))
    shutil.copytree(source, folder)
    path = folder / file
    value = change(json.loads(path.read_text()) if path.exists() else {})
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return folder


def _refused(capsys, main, folder, *args, fragments=()):
    """main(args) on a damaged folder: exit 2, one error line with every fragment, the folder unchanged."""
    before = digest(folder)
    code, out, err = call(main, capsys, *args)
    assert code == 2, err
    line = assert_one_error(err, *fragments)
    assert_kept(before, folder)
    return line


def _generate_with(capsys, model, *args, fragments=()):
    return _refused(capsys, generate.main, model, "--model", model, "--device", "cpu", "--max_new_tokens", "2",
                    "--prompt", "Hello", *args, fragments=fragments)


def _json_text(text: str):
    return lambda value: text


CONFIG_FAULTS = {  # config.json: (change, what the line says)
    "bool as a string": (lambda c: {**c, "tie_word_embeddings": "no"},
                         ["bad value 'no' for 'tie_word_embeddings'", "config.json: expected true or false"]),
    "size as a string": (lambda c: {**c, "n_layer": "2"}, ["bad value '2' for 'n_layer'", "expected an integer"]),
    "size as a float": (lambda c: {**c, "n_embd": 32.0}, ["bad value 32.0 for 'n_embd'", "expected an integer"]),
    "negative size": (lambda c: {**c, "n_embd": -32}, ["bad value -32 for 'n_embd'", "in [1, 16777216]"]),
    "huge int": (lambda c: {**c, "n_layer": 2 ** 70}, [f"bad value {2 ** 70} for 'n_layer'", "in [1, 16777216]"]),
    "NaN": (lambda c: json.dumps(c).replace('"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": NaN'),
            ["config.json is not valid JSON (NaN is not a JSON number)"]),
    "rate of 1": (lambda c: {**c, "resid_pdrop": 1.0}, ["bad value 1.0 for 'resid_pdrop'", "in [0, 1)"]),
    "list for a mapping": (lambda c: {**c, "id2label": ["negative", "positive"]},
                           ["for 'id2label'", "expected a mapping of the label ids 0, 1, ... n-1 to label names"]),
    "file is a list": (lambda c: [c], ["config.json must hold a mapping of keys to values, got a list"]),
    "key given twice": (lambda c: json.dumps(c)[:-1] + ', "n_layer": 5}',
                        ["config.json is not valid JSON (the key 'n_layer' appears twice in one object)"]),
    "wrong nesting": (lambda c: {**c, "gpt2_ascend": ["sdpa"]}, ["'gpt2_ascend' in", "must be a section"]),
    "misspelt key": (lambda c: {**c, "n_embed": 32}, ["unknown key 'n_embed'", "did you mean n_embd"]),
    "heads that do not divide the width": (lambda c: {**c, "n_head": 3}, ["n_embd (32) must be divisible by n_head (3)"]),
    "regression head": (lambda c: {**c, "problem_type": "regression"},
                        ["bad value 'regression' for 'problem_type'", "expected one of single_label_classification"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FAULTS))
def test_config_json_is_checked_field_by_field(case, lm_dirs, tmp_path, capsys):
    change, fragments = CONFIG_FAULTS[case]
    model = _damaged(lm_dirs / "sound", tmp_path, "config.json", change)
    _generate_with(capsys, model, fragments=[str(model / "config.json")] + fragments)


GENERATION_FAULTS = {  # generation_config.json
    "bool as a string": (lambda g: {**g, "do_sample": "no"}, ["bad value 'no' for 'do_sample'"]),
    "file is a list": (lambda g: [g], ["generation_config.json must hold a mapping"]),
    "denormal temperature when sampling": (lambda g: {**g, "do_sample": True, "temperature": 1e-45},
                                           ["bad value 1e-45 for 'temperature'", "[1e-06, 1e+06] when do_sample"]),
    "top_p of 0": (lambda g: {**g, "top_p": 0}, ["bad value 0 for 'top_p'", "in (0, 1]"]),
    "token id as a string": (lambda g: {**g, "eos_token_id": "eos"}, ["bad value 'eos' for 'eos_token_id'"]),
}


@pytest.mark.parametrize("case", sorted(GENERATION_FAULTS))
def test_generation_config_json_is_checked(case, lm_dirs, tmp_path, capsys):
    change, fragments = GENERATION_FAULTS[case]
    model = _damaged(lm_dirs / "sound", tmp_path, "generation_config.json", change)
    _generate_with(capsys, model, fragments=[str(model / "generation_config.json")] + fragments)


ADAPTER_FAULTS = {  # adapter_config.json
    "file is a list": (lambda a: [a], ["adapter_config.json must hold a mapping"]),
    "rank as a string": (lambda a: {**a, "r": "2"}, ["bad value '2' for 'r'", "expected an integer"]),
    "dropout of 1.5": (lambda a: {**a, "lora_dropout": 1.5}, ["bad value 1.5 for 'lora_dropout'", "in [0, 1)"]),
    "unknown task": (lambda a: {**a, "task_type": "TOKEN_CLS"}, ["bad value 'TOKEN_CLS' for 'task_type'"]),
    "targets as a number": (lambda a: {**a, "target_modules": 5},
                            ["bad value 5 for 'target_modules'", "a module name or a list of module names"]),
    "bool as a string": (lambda a: {**a, "use_rslora": "yes"}, ["bad value 'yes' for 'use_rslora'"]),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_FAULTS))
def test_adapter_config_json_is_checked(case, sharded_lm, tmp_path, capsys):
    change, fragments = ADAPTER_FAULTS[case]
    adapter = _damaged(sharded_lm / "adapter", tmp_path, "adapter_config.json", change)
    _generate_with(capsys, sharded_lm / "model", "--adapter", adapter,
                   fragments=[str(adapter / "adapter_config.json")] + fragments)


INDEX = "model.safetensors.index.json"
INDEX_FAULTS = {  # the shard index
    "no weight_map": (lambda i: {"metadata": i["metadata"]},
                      ["'weight_map' is missing", "expected a mapping of tensor names to shard files"]),
    "weight_map a list": (lambda i: {**i, "weight_map": sorted(i["weight_map"])}, ["for 'weight_map'"]),
    "file entry a number": (lambda i: {**i, "weight_map": {k: 1 for k in i["weight_map"]}},
                            ["bad value 1 for 'weight_map.", "expected a string"]),
    "empty weight_map": (lambda i: {**i, "weight_map": {}}, ["names no tensors"]),
    "negative total_size": (lambda i: {**i, "metadata": {"total_size": -1}}, ["bad value -1 for 'metadata.total_size'"]),
}


@pytest.mark.parametrize("case", sorted(INDEX_FAULTS))
def test_shard_index_is_checked(case, sharded_lm, tmp_path, capsys):
    change, fragments = INDEX_FAULTS[case]
    model = _damaged(sharded_lm / "model", tmp_path, INDEX, change)
    _generate_with(capsys, model, fragments=[str(model / INDEX)] + fragments)


@pytest.mark.parametrize("where", ["../outside", "absolute"])
def test_a_shard_named_outside_the_model_folder_is_refused(where, sharded_lm, tmp_path, capsys):
    """The index names a real shard file that lies outside the folder (its weights would load, exit 0): refused, for
    generate.py and for the resharding converter alike."""
    outside = tmp_path / "outside"
    outside.mkdir()
    index = json.loads((sharded_lm / "model" / INDEX).read_text())
    first = index["weight_map"]["transformer.wte.weight"]
    shutil.copyfile(sharded_lm / "model" / first, outside / "x.safetensors")
    name = "../outside/x.safetensors" if where == "../outside" else str(outside / "x.safetensors")
    model = _damaged(sharded_lm / "model", tmp_path, INDEX, lambda i: {**i, "weight_map": {
        k: name if v == first else v for k, v in i["weight_map"].items()}})
    fragments = [str(model / INDEX), f"names the shard {name!r}, which is outside {model}"]
    _generate_with(capsys, model, fragments=fragments)
    _refused(capsys, merge_hf_shards.main, model, "--input_dir", model, "--output_dir", tmp_path / "merged",
             fragments=fragments)
    assert not (tmp_path / "merged").exists()


def test_a_damaged_safetensors_header_is_one_line(sharded_lm, tmp_path, capsys):
    """The header's JSON is checked too (the resharding converter reads it itself): an unknown dtype."""
    model = tmp_path / "model"
    shutil.copytree(sharded_lm / "model", model)
    shard = model / json.loads((model / INDEX).read_text())["weight_map"]["transformer.wte.weight"]
    data = bytearray(shard.read_bytes())
    at = data.index(b'"F32"')
    data[at:at + 5] = b'"F99"'
    shard.write_bytes(bytes(data))
    _refused(capsys, merge_hf_shards.main, model, "--input_dir", model, "--output_dir", tmp_path / "merged",
             fragments=[f"bad value 'F99' for 'transformer.wte.weight.dtype' in {shard} (its safetensors header)"])


TOKENIZER_FAULTS = {  # the model folder's own tokenizer files
    "two tokens, one id": ("vocab.json", lambda v: {**v, "Hello": v["world"]}, ["gives the id", "to two tokens"]),
    "negative id": ("vocab.json", lambda v: {**v, "Hello": -1}, ["bad value -1 for 'vocab.Hello'", "in [0, 16777216)"]),
    "token given twice": ("vocab.json", lambda v: json.dumps(v)[:-1] + ', "Hello": 7}',
                          ["vocab.json is not valid JSON (the key 'Hello' appears twice in one object)"]),
    "settings file a list": ("tokenizer_config.json", lambda c: [c], ["tokenizer_config.json must hold a mapping"]),
    "bool as a string": ("tokenizer_config.json", lambda c: {**c, "add_prefix_space": "no"},
                         ["bad value 'no' for 'add_prefix_space' in", "tokenizer_config.json: expected true or false"]),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_FAULTS))
def test_tokenizer_files_are_checked(case, sharded_lm, tmp_path, capsys):
    """(transformers' own errors for tokenizer_config.json named vocab.json + merges.txt)"""
    file, change, fragments = TOKENIZER_FAULTS[case]
    model = _damaged(sharded_lm / "model", tmp_path, file, change)
    _generate_with(capsys, model, fragments=[str(model / file)] + fragments)


@pytest.fixture(scope="session")
def prepared_npy(tmp_path_factory):
    """A prepared token file with its sidecar (evaluate.py reads both)."""
    from gpt2_ascend.data.store import save_blocks
    root = tmp_path_factory.mktemp("prepared")
    save_blocks(np.random.default_rng(2).integers(0, 50257, (4, 33)).astype(np.uint16), str(root / "valid.npy"),
                dict(source="/nowhere/wiki.valid.tokens"))
    return root


SIDECAR_FAULTS = {  # a prepared file's sidecar
    "version as a string": (lambda m: {**m, "format_version": "x"}, ["bad value 'x' for 'format_version'"]),
    "file is a list": (lambda m: [m], ["valid.npy.json must hold a mapping"]),
    "negative count": (lambda m: {**m, "num_blocks": -4}, ["bad value -4 for 'num_blocks'"]),
    "checksum not hex": (lambda m: {**m, "sha256": "not-a-sha"}, ["bad value 'not-a-sha' for 'sha256'"]),
    "another kind's sidecar": (lambda m: {**m, "kind": "txtcls"}, ["describes txtcls data", "belongs to another file"]),
}


@pytest.mark.parametrize("case", sorted(SIDECAR_FAULTS))
def test_data_sidecar_is_checked(case, prepared_npy, lm_dirs, tmp_path, capsys):
    change, fragments = SIDECAR_FAULTS[case]
    data = _damaged(prepared_npy, tmp_path, "valid.npy.json", change)
    _refused(capsys, evaluate.main, data, "--model", lm_dirs / "sound", "--eval_dataset_dir", data / "valid.npy",
             "--seq_length", "32", "--device", "cpu", "--no_progress",
             fragments=[str(data / "valid.npy.json")] + fragments)


MANIFEST_FAULTS = {  # a training checkpoint's manifest.json
    "non-dict entries": (lambda m: {**m, "files": {name: "ok" for name in m["files"]}},
                         ["'files.model.pt' in manifest.json must be a section"]),
    "a file outside": (lambda m: {**m, "files": {**m["files"], "../../../outside.pt": {"bytes": 1}}},
                       ["names the file '../../../outside.pt', which is outside"]),
    "step as a string": (lambda m: {**m, "step": "100"}, ["bad value '100' for 'step'"]),
    "file is a list": (lambda m: [m], ["manifest.json must hold a mapping"]),
    "negative size": (lambda m: {**m, "files": {k: {**v, "bytes": -1} for k, v in m["files"].items()}},
                      ["bad value -1 for 'files.model.pt.bytes'"]),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_FAULTS))
@pytest.mark.parametrize("reader", ["evaluate", "merge_checkpoint"])
def test_checkpoint_manifest_is_checked(case, reader, world, tmp_path, capsys):
    change, fragments = MANIFEST_FAULTS[case]
    step = _damaged(world["reference"] / "checkpoint" / "step_0000100", tmp_path, "manifest.json", change)
    args = (["--model", step, "--eval_dataset_dir", world["root"] / "train.npy", "--seq_length", "16", "--device", "cpu",
             "--no_progress"] if reader == "evaluate" else ["--src_ckpt_dir", step, "--dst_dir", tmp_path / "merged"])
    _refused(capsys, evaluate.main if reader == "evaluate" else merge_checkpoint.main, step, *args,
             fragments=[f"checkpoint {step} has a corrupt manifest.json"] + fragments)
    assert not (tmp_path / "merged").exists()


RECIPE_RANGES = {  # override -> what the line says (an existing run, --overwrite_output_dir: nothing may change)
    "integer set to .inf": ("runner_config.batch_size=.inf", "bad value inf for 'runner_config.batch_size'"),
    "integer set to .nan": ("runner_config.max_steps=.nan", "bad value nan for 'runner_config.max_steps'"),
    "huge integer": ("runner_config.batch_size=100000000000000000000", "expected an integer in [1, 16777216]"),
    "infinite learning rate": ("lr_schedule.learning_rate=.inf", "bad value inf for 'lr_schedule.learning_rate'"),
    "zero learning rate": ("lr_schedule.learning_rate=0", "for 'lr_schedule.learning_rate' in the override"),
    "negative learning rate": ("lr_schedule.learning_rate=-1e-3", "expected a finite number > 0"),
    "zero eps": ("optimizer.eps=0", "bad value 0 for 'optimizer.eps'"),
    "infinite weight decay": ("optimizer.weight_decay=.inf", "bad value inf for 'optimizer.weight_decay'"),
    "negative weight decay": ("optimizer.weight_decay=-0.1", "expected a finite number >= 0"),
    "NaN clip norm": ("runner_wrapper.max_grad_norm=.nan", "bad value nan for 'runner_wrapper.max_grad_norm'"),
    "zero clip norm": ("runner_wrapper.max_grad_norm=0", "bad value 0 for 'runner_wrapper.max_grad_norm'"),
    "infinite loss scale": ("runner_wrapper.scale_sense.loss_scale_value=.inf", "'runner_wrapper.scale_sense."
                                                                                "loss_scale_value'"),
    "loss scale factor of 1": ("runner_wrapper.scale_sense.scale_factor=1", "expected a finite number in (1, 2^64]"),
    "dropout of 1": ("model.model_config.hidden_dropout_rate=1.0", "expected a finite number in [0, 1)"),
    "beta of 1": ("optimizer.beta2=1.0", "bad value 1.0 for 'optimizer.beta2'"),
    "negative warmup": ("lr_schedule.warmup_steps=-1", "bad value -1 for 'lr_schedule.warmup_steps'"),
    "seed past numpy's range": ("seed=4294967296", "expected an integer in [0, 4294967295]"),
    "bool as a string": ("use_parallel=yes please", "bad value 'yes please' for 'use_parallel'"),
    "list for a section": ("runner_config=[1, 2]", "'runner_config' in the override"),
    "wrong nesting": ("runner_config.batch_size={a: 1}", "bad value {'a': 1} for 'runner_config.batch_size'"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_RANGES))
def test_recipe_values_out_of_range_keep_the_old_run(case, world, run, capsys):
    """Every recipe key has a type and a range, refused when the recipe is read (before anything is built or
    deleted), in one line naming the key, the value and where it came from."""
    override, fragment = RECIPE_RANGES[case]
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", override)
    assert code == 2
    assert_one_error(err, fragment)
    assert_kept(before, run)


def test_a_value_in_the_recipe_file_names_the_file_and_a_flag_names_the_flag(world, run, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(open(world["recipe"])),
                                      "optimizer": {"weight_decay": float("nan")}}))
    before = digest(run)
    code, _, err = call(train.main, capsys, "--config", recipe, "--output_dir", run, "--overwrite_output_dir")
    assert code == 2
    assert_one_error(err, f"bad value nan for 'optimizer.weight_decay' in {recipe}: expected a finite number >= 0")
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", "--batch_size", "0")
    assert code == 2
    assert_one_error(err, "bad value 0 for 'runner_config.batch_size' in the flag --batch_size: expected an integer "
                          "in [1, 16777216]")
    assert_kept(before, run)


def _alias_bomb(levels: int = 9) -> str:
    """A YAML value of nested aliases: 9 levels of 9 references expand to 9^9 = 387 million strings."""
    lines = ['  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"  - &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines)


BOMB_SECONDS = 60  # a last guard only: the refusal takes milliseconds; unbounded, the bomb ran past 120 s


def _train_process(*args) -> tuple:
    """train.py as a real process: (exit code, stderr, its peak resident memory in bytes (wait4's ru_maxrss of that
    child alone), seconds). Killed after BOMB_SECONDS."""
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    timer = threading.Timer(BOMB_SECONDS, proc.kill)
    timer.start()
    started = time.perf_counter()
    try:
        err = proc.stderr.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, usage.ru_maxrss * 1024, time.perf_counter() - started


@pytest.mark.parametrize("where", ["recipe file", "override"])
def test_a_yaml_alias_bomb_is_one_line_in_bounded_time_and_memory(where, world, run, tmp_path):
    """A value of nested aliases (9^9 strings expanded) in the recipe file or in a command-line override: one line,
    and the process's peak memory is that of the same command refused for another reason (unbounded, the bomb grew
    past 3 GB). The time is measured and reported; only the guard above bounds it."""
    recipe = tmp_path / "recipe.yaml"
    in_file = where == "recipe file"
    recipe.write_text(open(world["recipe"]).read() + ("report_to:\n" + _alias_bomb() + "\n" if in_file else ""))
    bomb = [] if in_file else ["report_to=[" + _alias_bomb().replace("\n  - ", ", ").replace("  - ", "", 1) + "]"]
    before = digest(run)
    code, err, peak, seconds = _train_process("--config", recipe, "--output_dir", run, "--overwrite_output_dir", *bomb)
    assert code == 2, f"{err[-2000:]} (exit {code} after {seconds:.0f} s)"
    assert_one_error(err, str(recipe) if in_file else "the override 'report_to=[",
                     "expands to more than 100000 values through its aliases")
    _, other_err, other_peak, other_seconds = _train_process("--config", world["recipe"], "--output_dir", run,
                                                             "--overwrite_output_dir", "report_to=5")
    assert_one_error(other_err, "bad value 5 for 'report_to'")
    assert peak < other_peak + (64 << 20), f"peak {peak} bytes against {other_peak} ({seconds:.1f} s against " \
                                           f"{other_seconds:.1f} s)"
    assert_kept(before, run)


SAMPLING_FAULTS = {  # generate.py's flags, refused before the model is loaded
    "denormal temperature": (["--do_sample", "--temperature", "1e-45"], "bad value 1e-45 for 'temperature'"),
    "tiny repetition penalty": (["--repetition_penalty", "1e-300"], "bad value 1e-300 for 'repetition_penalty'"),
    "seed past 2^32": (["--seed", str(2 ** 70)], f"bad value {2 ** 70} for 'seed'"),
    "huge top_k": (["--top_k", str(2 ** 70)], "expected an integer in [0, 16777216]"),
    "huge max_new_tokens": (["--max_new_tokens", str(2 ** 40)], "bad value 1099511627776 for 'max_new_tokens'"),
    "NaN top_p": (["--top_p", "nan"], "bad value nan for 'top_p'"),
}


@pytest.mark.parametrize("flag, value", [("--seq_length", "1"), ("--seq_length", "-5")])
def test_evaluate_flags_out_of_range(flag, value, lm_dirs, capsys):
    code, out, err = _evaluate(capsys, lm_dirs, "sound", flag, value)
    assert code == 2 and out == ""
    assert_one_error(err, f"seq_length must be an integer >= 2 (a block predicts its last seq_length - 1 tokens), "
                          f"got {value}")


@pytest.mark.parametrize("case", sorted(SAMPLING_FAULTS))
def test_sampling_arguments_are_kept_where_the_arithmetic_is_finite(case, lm_dirs, capsys):
    extra, fragment = SAMPLING_FAULTS[case]
    code, out, err = call(generate.main, capsys, "--model", lm_dirs / "sound", "--device", "cpu", "--prompt", "Hello",
                          *extra)
    assert code == 2 and out == ""
    assert_one_error(err, fragment)


def test_the_python_generate_checks_the_same_ranges(lm_dirs):
    """generate() refuses what generate.py refuses; at the edge of the range the sampled logits stay finite."""
    model = GPT2LMHeadModel.from_pretrained(str(lm_dirs / "sound"))
    ids = torch.tensor([[15496, 11]])
    for kwargs, fragment in [(dict(do_sample=True, temperature=1e-45), "for 'temperature'"),
                             (dict(repetition_penalty=1e-300), "for 'repetition_penalty'"),
                             (dict(seed=2 ** 70), "for 'seed'"), (dict(seed=-1), "for 'seed'")]:
        with pytest.raises(ValueError, match=fragment) as e:
            model.generate(ids, max_new_tokens=2, **kwargs)
        assert "\n" not in str(e.value)
    out = model.generate(ids, max_new_tokens=3, do_sample=True, temperature=1e-6, repetition_penalty=1e-6, seed=7)
    assert out.shape == (1, 5) and int(out.max()) < 50257


BIN_FAULTS = {  # pytorch_model.bin that is not a checkpoint
    "random bytes": (lambda path: path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8))),
                     "is not a valid checkpoint: it is not a PyTorch file of tensors"),
    "a pickle of text": (lambda path: path.write_bytes(__import__("pickle").dumps("hello", protocol=0)),
                         "is not a valid checkpoint: it is not a PyTorch file of tensors"),
    "a torch file of text": (lambda path: torch.save("hello", str(path)),
                             "is not a valid checkpoint: it holds text ('hello'), not a state dict of tensors"),
    "a state dict of text": (lambda path: torch.save({"transformer.wte.weight": "hello"}, str(path)),
                             "its entry 'transformer.wte.weight' holds text ('hello'), not a tensor"),
}


@pytest.mark.parametrize("case", sorted(BIN_FAULTS))
def test_a_bin_that_is_not_a_checkpoint_says_so(case, lm_dirs, tmp_path, capsys):
    """Not 'a pickle that could run code' (nothing in these names a global), and no IndexError / AttributeError."""
    write, fragment = BIN_FAULTS[case]
    model = tmp_path / "model"
    model.mkdir()
    shutil.copyfile(lm_dirs / "sound" / "config.json", model / "config.json")
    write(model / "pytorch_model.bin")
    line = _generate_with(capsys, model, fragments=[str(model / "pytorch_model.bin"), fragment])
    assert "could run code" not in line


@pytest.mark.parametrize("head, labels, fragment", [
    ("lm", [[1, 2, 512]], "labels must be in [0, 512) (-100 is skipped), found 1..512"),
    ("lm", [[1, -5, 3]], "labels must be in [0, 512) (-100 is skipped), found -5..3"),
    ("lm", [[1, -1, 3]], "labels must be in [0, 512) (-100 is skipped), found -1..3"),  # the edge below 0
    ("lm", [[1.0, 2.0, 3.0]], "labels must hold integer class ids, got dtype torch.float32"),
    ("classifier", [True, False], "labels must hold integer class ids, got dtype torch.bool"),
    ("classifier", [0, 2], "labels must be in [0, 2), found 0..2"),
    ("classifier", [-100, 1], "labels must be in [0, 2), found -100..1"),
    ("classifier", [-1, 1], "labels must be in [0, 2), found -1..1"),
])
def test_forward_with_labels_it_cannot_score_is_one_value_error(head, labels, fragment):
    from gpt2_ascend.model import GPT2ForSequenceClassification
    model = (GPT2LMHeadModel if head == "lm" else GPT2ForSequenceClassification)(tiny_config())
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])[: len(labels)]
    with pytest.raises(ValueError) as e:
        model(ids, labels=torch.tensor(labels))
    assert fragment in str(e.value) and "\n" not in str(e.value)
    valid = [[-100, 2, 3], [4, 5, -100]] if head == "lm" else [1, 0]  # (-100: not scored)
    assert model(ids, labels=torch.tensor(valid)[: len(ids)]).loss.isfinite()


PYTHON_API_FAULTS = {  # the Python API's settings, named as Python names them
    "learning rate inf": (lambda t: t.TrainJob(optimizer=t.OptimizerSettings(learning_rate=float("inf"))),
                          "bad value inf for 'learning_rate' in OptimizerSettings: expected a finite number > 0"),
    "eps 0": (lambda t: t.OptimizerSettings(eps=0.0), "bad value 0.0 for 'eps' in OptimizerSettings"),
    "weight decay NaN": (lambda t: t.OptimizerSettings(weight_decay=float("nan")),
                         "bad value nan for 'weight_decay' in OptimizerSettings"),
    "clip norm NaN": (lambda t: t.TrainJob(settings=t.TrainSettings(max_grad_norm=float("nan"))),
                      "bad value nan for 'max_grad_norm' in TrainSettings"),
    "loss scale below 1": (lambda t: t.TrainJob(settings=t.TrainSettings(loss_scale=0.5)),
                           "bad value 0.5 for 'loss_scale' in TrainSettings"),
    "batch size 0": (lambda t: t.TrainJob(batch_size=0), "bad value 0 for 'batch_size' in TrainJob"),
    "lora dropout 1": (lambda t: t.LoraSettings(dropout=1.0), "bad value 1.0 for 'dropout' in LoraSettings"),
}


@pytest.mark.parametrize("case", sorted(PYTHON_API_FAULTS))
def test_the_python_api_checks_its_settings_with_the_recipes_ranges(case):
    from gpt2_ascend import train as t
    build, message = PYTHON_API_FAULTS[case]
    with pytest.raises(ValueError) as e:
        build(t)
    assert message in str(e.value) and "\n" not in str(e.value)
