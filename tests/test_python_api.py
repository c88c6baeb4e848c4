"""The Python training API as a notebook uses it: docs/training.md's "From Python" section, run as written (in a
temporary directory), then its numbers checked."""
import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def from_python_code() -> str:
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 4, "the From Python section lost its examples"
    return "\n".join(blocks)


def test_the_from_python_section_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(from_python_code(), "docs/training.md", "exec"), scope)  # noqa: S102 - our own documentation
    said = capsys.readouterr().out
    summary, result, trainer = scope["summary"], scope["result"], scope["trainer"]
    assert summary["steps"] == 12 and [r["step"] for r in summary["history"]] == list(range(1, 13))
    losses = [r["loss"] for r in summary["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # the model held in memory was trained
    assert abs(summary["eval_ppl"] - np.exp(summary["eval_loss"])) <= 1e-9 * summary["eval_ppl"]
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and np.isfinite(result["eval_loss"])
    assert "already holds a training run: pass resume='auto' to continue it, overwrite=True to start over, or " \
           "another output_dir" in said
    assert os.path.isfile(tmp_path / "out" / "notebook" / "final" / "model.safetensors")
    assert trainer.step == 10 and scope["last"]["step"] == 10
