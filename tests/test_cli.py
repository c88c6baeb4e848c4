"""What every program shares (gpt2_ascend/cli.py): flags spelled with dashes or underscores, no silent
abbreviations, the closest flag suggested for a mistyped one, one-line errors, and each program naming itself as
the user invoked it (in --help examples and in the resume hint)."""
import subprocess
import sys
import types

import pytest

from conftest import HANG_GUARD_S, REPO
from gpt2_ascend import cli


def parser():
    p = cli.ArgumentParser(prog="prog", epilog="examples:\n  %(prog)s --max_steps 3")
    p.add_argument("--max_steps", type=int)
    p.add_argument("--output_dir")
    p.add_argument_group("trackers").add_argument("--report_to")
    return p


def test_dashes_and_underscores_are_one_flag_shown_once():
    args = parser().parse_args(["--max-steps", "3", "--output_dir", "o", "--report-to", "wandb"])
    assert (args.max_steps, args.output_dir, args.report_to) == (3, "o", "wandb")
    help_text = parser().format_help()
    assert "--max_steps" in help_text and "--max-steps" not in help_text and "--report-to" not in help_text
    assert "prog --max_steps 3" in help_text  # %(prog)s in the examples


@pytest.mark.parametrize("typed, suggestion", [
    ("--max-step", "--max_steps"),       # a typo with dashes
    ("--max_step", "--max_steps"),       # an abbreviation: refused, not silently taken
    ("--max", "--max_steps"),
    ("--outputdir", "--output_dir"),
])
def test_a_mistyped_flag_is_one_line_with_the_closest_one(capsys, typed, suggestion):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args([typed, "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"{typed}: did you mean {suggestion}?" in err and "(see prog --help)" in err


def test_an_unknown_flag_with_nothing_close_says_so(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--zzz"])
    assert "--zzz: no such flag" in capsys.readouterr().err


@pytest.mark.parametrize("argv0, spec, subcommand, expected", [
    ("train.py", None, None, "python train.py"),
    ("convert/mindspore_to_hf.py", None, None, "python convert/mindspore_to_hf.py"),
    ("/venv/bin/gpt2-train", None, None, "gpt2-train"),
    ("/venv/bin/gpt2-convert", None, "mindspore-to-hf", "gpt2-convert mindspore-to-hf"),
    ("/x/gpt2_ascend/data/wikitext2.py", "gpt2_ascend.data.wikitext2", None, "python -m gpt2_ascend.data.wikitext2"),
    ("/dir with space/train.py", None, None, "python '/dir with space/train.py'"),
])
def test_a_program_names_itself_as_invoked(monkeypatch, argv0, spec, subcommand, expected):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=spec) if spec else None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    monkeypatch.setattr(cli, "_subcommand", subcommand)
    assert cli.invoked_as() == expected
    assert cli.invoked_as("python train.py") == "python train.py"  # main(argv) called from Python


@pytest.mark.parametrize("argv0, world, expected", [
    ("train.py", "1", "python train.py --config r.yaml --output_dir o --resume auto"),
    ("/venv/bin/gpt2-train", "1", "gpt2-train --config r.yaml --output_dir o --resume auto"),
    ("train.py", "2", "torchrun --nproc_per_node 2 train.py --config r.yaml --output_dir o --resume auto"),
    ("/venv/bin/gpt2-train", "2",
     "torchrun --nproc_per_node 2 --no-python gpt2-train --config r.yaml --output_dir o --resume auto"),
])
def test_the_resume_hint_names_the_program_as_invoked(monkeypatch, argv0, world, expected):
    from gpt2_ascend.commands.train import resume_command
    main = types.ModuleType("__main__")
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [argv0, "--config", "r.yaml", "--output_dir", "o", "--overwrite-output-dir"])
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", world)
    assert resume_command() == expected


def test_train_py_takes_dashed_flags_and_suggests_for_a_typo():
    proc = subprocess.run([sys.executable, "train.py", "--config", "pretrain_gpt2_tiny", "--max-step", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--max-step: did you mean --max_steps?" in proc.stderr and "(see python train.py --help)" in proc.stderr


def test_progress_bars_are_text_unless_a_kernel_can_draw_widgets(monkeypatch):
    """In a Jupyter kernel without ipywidgets, tqdm.auto warns 'IProgress not found' into the cell; ours is text."""
    import importlib.util

    import tqdm
    import tqdm.notebook

    from gpt2_ascend.progress import bar_class
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    real_find_spec = importlib.util.find_spec
    for widgets, expected in ((False, tqdm.std.tqdm), (True, tqdm.notebook.tqdm)):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if widgets else None) if name == "ipywidgets"
                            else real_find_spec(name, *a))
        assert bar_class() is expected
