"""demo.py's exits: Ctrl-C / SIGTERM give the shell's 128 + signum and one line, bad input 2 and one line."""
import signal

import pytest

import demo
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
