"""bench/gpu_session.py: the one-call GPU session runs its steps in order inside a budget and prints the table
(here its CPU smoke flow; the real run is on the GPU machine)."""
import json
import os

from conftest import load_script

session = load_script("bench/gpu_session.py")


def test_list_and_unknown_step(capsys):
    assert session.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(step.name in listed for step in session.STEPS)
    assert session.main(["--only", "train-huge"]) == 2
    assert "unknown step 'train-huge'" in capsys.readouterr().err


def test_smoke_steps_run_and_skip_inside_the_budget(tmp_path, capsys):
    out = tmp_path / "out"
    assert session.main(["--smoke", "--only", "ceilings,train-small,gen-small", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| train-small | 0 |" in text and "| gen-small | 0 |" in text
    summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rc"]) for r in summary] == [("ceilings", 0), ("train-small", 0), ("gen-small", 0)]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    train = [line for line in results if line["step"] == "train-small" and "tokens_per_s" in line]
    assert [line["impl"] for line in train] == ["gpt2_ascend", "transformers"]
    log = (out / "session.log").read_text()
    assert "===== train-small: rc 0" in log and "===== gen-small: rc 0" in log
    assert sorted(os.listdir(out)) == ["results.jsonl", "session.log", "summary.jsonl"]  # the device returns 8
    # no budget left: every step is skipped, and says so
    assert session.main(["--smoke", "--only", "train-small", "--out", str(out), "--budget_s", "1"]) == 0
    assert "[train-small] skipped" in capsys.readouterr().out
