"""The fault suite: what a careless user, a crash or a signal can do to a run, through the real CLIs.

Each case asserts the exit code, that stderr ends in one `error: ...` line naming the problem (no traceback),
and that nothing that existed before was lost or changed (a digest of the run directory before and after).
The CLIs' main() runs in-process where a process of its own adds nothing; signals, kill -9 and the output
directory lock run real processes. docs/reliability.md lists every case with the behaviour it guards.

Shapes are tiny (vocab 512, width 32, 16-token rows) and the learning rate is constant, so that runs of any
length share their first steps exactly: a resumed run is compared bit for bit with one uninterrupted run.
"""
import contextlib
import json
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
from gpt2_ascend import GPT2LMHeadModel
from gpt2_ascend import checkpoints as ckpt
from gpt2_ascend.train.interrupt import Interrupted, StopOnSignal
from gpt2_ascend.train.metrics import read_metrics
from gpt2_ascend.train.rundir import OutputDirLock
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


def test_seq_length_past_the_models_positions_keeps_the_old_run(world, run, capsys):
    before = digest(run)
    code, _, err = train_in(capsys, world, run, "--overwrite_output_dir", "--run_mode", "finetune",
                            "--load_checkpoint", run / "final", "--train_dataset_dir", world["root"] / "wide.npy",
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
    assert code == 2
    assert_one_error(err, "at step 1: training stopped (no checkpoint was saved yet)", "lower the learning rate")
    assert checkpoint_steps(tmp_path / "out") == []


def test_fp16_overflow_skips_then_stops(world, tmp_path, capsys):
    code, _, err = train_in(capsys, world, tmp_path / "out", "model.model_config.compute_dtype=float16",
                            "runner_wrapper.max_consecutive_skips=3")
    assert code == 2
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
    assert_one_error(err, "interrupted by SIGINT: stopped at once (complete checkpoints are intact)", "--resume auto")
    for step in checkpoint_steps(out):  # whatever was written is complete
        ckpt.verify_checkpoint(str(out / "checkpoint" / ckpt.step_dir_name(step)))
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
