"""demo.py's exits: Ctrl-C / SIGTERM give the shell's 128 + signum and one line, bad input 2 and one line. What the
demo and the training line say to a person, and the third-party noise kept out of their output (and nothing else)."""
import os
import re
import shlex
import signal
import subprocess
import sys
import warnings

import pytest

import demo
from conftest import HANG_GUARD_S, REPO
from gpt2_ascend.train.interrupt import Interrupted, TrainingInterrupted


def run_raising(monkeypatch, capsys, exc) -> tuple[int, str]:
    def raise_it(args):
        raise exc
    monkeypatch.setattr(demo, "run_demo", raise_it)
    code = demo.main(["--output_dir", "unused"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("exc, code, line", [
    (TrainingInterrupted(signal.SIGINT, 11, "out/checkpoint/step_0000011"), 130,
     "error: interrupted by SIGINT after step 11, checkpoint saved: out/checkpoint/step_0000011\n"),
    (TrainingInterrupted(signal.SIGTERM, 3, "c"), 143,
     "error: interrupted by SIGTERM after step 3, checkpoint saved: c\n"),
    (Interrupted(signal.SIGTERM), 143, "error: interrupted by SIGTERM\n"),  # a second signal: stopped at once
    (KeyboardInterrupt(), 130, "error: interrupted by SIGINT\n"),  # Ctrl-C after training (perplexity, sampling)
    (FileNotFoundError("no such file: wiki.train.tokens"), 2, "error: no such file: wiki.train.tokens\n"),
])
def test_demo_exits_with_one_line(monkeypatch, capsys, exc, code, line):
    assert run_raising(monkeypatch, capsys, exc) == (code, line)


# ---------------------------------------------------------------------------------------------
# what a person reads
# ---------------------------------------------------------------------------------------------
def test_the_training_line_names_each_factor_of_a_step():
    """"200 steps of 8 x 1 x 1 rows" left people guessing: each factor is named (a run's own line:
    test_mindformers_numerics.py::test_global_batch_sets_the_accumulation)."""
    from gpt2_ascend.train.run import steps_in_words
    assert steps_in_words(200, 8, 1, 1, 4327) == ("200 steps of 8 sequences each (batch_size 8 x gradient accumulation "
                                                  "1 x 1 data-parallel replica), 4327 steps per epoch")
    assert steps_in_words(200, 8, 2, 4, 10) == ("200 steps of 64 sequences each (batch_size 8 x gradient accumulation "
                                                "2 x 4 data-parallel replicas), 10 steps per epoch")


def test_the_demo_says_why_its_samples_are_noise(tmp_path):
    text = tmp_path / "wiki.train.tokens"
    text.write_text(" = Title = \n The <unk> of the <unk> @-@ era . \n", encoding="utf-8")
    assert demo.unk_share(str(text)) == 2 / 11
    said = demo.why_samples_are_noise(200, 2 / 11)
    assert "<unk> (18.2% of its words)" in said and "after 200 steps" in said and "@-@" in said


def test_the_demo_ends_with_three_commands_that_run(tmp_path):
    """Each printed command is parsed by the program it names (flags that exist, values they take), on the paths the
    demo wrote; a path with a space stays one argument."""
    from gpt2_ascend.commands import generate, train
    final, out = str(tmp_path / "my demo" / "final"), str(tmp_path / "my demo")
    commands = demo.next_commands(final, out, steps=200)
    assert len(commands) == 3 and "--max_steps 2000 " in commands[1][1]
    parsers = {"generate.py": generate.parse_args, "train.py": train.parse_args}
    for what, command in commands:
        python, script, *argv = shlex.split(command)
        assert python == "python" and os.path.isfile(os.path.join(REPO, script)) and what
        args = parsers[script](argv)
        assert final in (getattr(args, "model", None), getattr(args, "load_checkpoint", None)) or \
            args.output_dir.startswith(out)


# ---------------------------------------------------------------------------------------------
# third-party noise: gone, and only it
# ---------------------------------------------------------------------------------------------
def test_ddp_is_built_without_torchs_broadcast_buffers_warning(tmp_path):
    """torch >= 2.13 warns (FutureWarning, on every rank) on DDP's broadcast_buffers: the new spelling is used where
    torch has it, the old one elsewhere; a warning DDP has for real still shows."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from gpt2_ascend.parallel.data_parallel import apply_ddp, no_buffer_sync

    class Old:
        def __init__(self, module, broadcast_buffers=True):
            pass
    assert no_buffer_sync(Old) == {"broadcast_buffers": False}

    class Mesh:
        def get_group(self):
            return dist.group.WORLD
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_ddp(torch.nn.Linear(2, 2), Mesh(), torch.device("cpu"))
            DistributedDataParallel(torch.nn.Linear(2, 2), check_reduction=True)  # deprecated for real
    finally:
        dist.destroy_process_group()
    said = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not [s for s in said if "broadcast_buffers" in s], said
    assert any(s.startswith("FutureWarning: The `check_reduction` argument") for s in said), said


def test_setup_filters_setuptools_editable_banner_and_nothing_else():
    """scripts/setup.sh's filter, applied as pip's processes apply it (PYTHONWARNINGS): the banner is gone; another
    message, or the same words as another category, still shows."""
    with open(os.path.join(REPO, "scripts", "setup.sh"), encoding="utf-8") as f:
        banner_filter = re.search(r'^EDITABLE_BANNER="([^"]+)"$', f.read(), re.M).group(1)
    emit = """if True:
        import warnings
        class BuildBackendWarning(UserWarning):
            pass
        warnings.warn("Editable installation.\\n!!\\n  Please be careful with folders ...", BuildBackendWarning)
        warnings.warn("Editable install of gpt2_ascend needs setuptools >= 64", UserWarning)
        warnings.warn("Editable installation.", DeprecationWarning)
        warnings.warn("something real", FutureWarning)
    """
    proc = subprocess.run([sys.executable, "-c", emit], env=dict(os.environ, PYTHONWARNINGS=banner_filter),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0 and "Please be careful" not in proc.stderr, proc.stderr
    for shown in ("UserWarning: Editable install of gpt2_ascend", "DeprecationWarning: Editable installation.",
                  "FutureWarning: something real"):
        assert shown in proc.stderr, proc.stderr
