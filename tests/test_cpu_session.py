"""bench/cpu_session.py: its whole flow on tiny shapes (--smoke), one JSON line per case, and its arguments. The
speed itself is measured by running it (docs/performance.md), never in a test."""
import json

import pytest

from conftest import load_script

bench = load_script("bench/cpu_session.py")


def test_unknown_case_is_one_line(capsys):
    assert bench.main(["--cases", "decode-huge"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown case 'decode-huge': use train-small, ")


def test_smoke_session_prints_one_json_line_per_case(tmp_path, capsys):
    out = tmp_path / "cpu.jsonl"
    assert bench.main(["--smoke", "--cases", "train-small,decode-small-b8-fp32,eval-tiny",
                       "--output_jsonl", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    machine, train, decode, evaluation = lines
    assert machine["case"] == "machine" and machine["mode"] == "smoke"
    assert all(machine[k] > 0 for k in ("matmul_gflops", "read_gbps", "copy_gbps"))
    for line in (train, decode, evaluation):
        assert {"case", "ours", "transformers", "ratio", "pct_of_bound"} <= set(line)
        assert line["ours"] > 0 and line["transformers"] > 0
        assert line["ratio"] == pytest.approx(line["ours"] / line["transformers"], rel=0.01)
    assert [train["case"], decode["case"], evaluation["case"]] == ["train-small", "decode-small-b8-fp32", "eval-tiny"]
    assert train["optimizer"] == "AdamW fused"
    for line in (train, evaluation):  # a compute bound: the matmul rate over nanoGPT's FLOPs per token
        # (the line's numbers are rounded: 0.1% of slack)
        assert line["pct_of_bound"] == pytest.approx(100 * line["ours"] / line["bound_tokens_per_s"], rel=1e-3, abs=0.1)
        assert line["largest_possible_ratio"] == pytest.approx(line["bound_tokens_per_s"] / line["transformers"],
                                                               rel=1e-3, abs=0.01)
    assert decode["same_tokens"] is True and decode["eager_same_tokens"] is True  # fp32 greedy, same weights
    assert 0 < decode["pct_of_bound"] < 100
    # our chunked perplexity and transformers' loss on the same WikiText-2 blocks
    assert evaluation["tokens"] == 8 * 127 and evaluation["loss_difference"] <= 1e-5
    assert "| train-small |" in captured.err and "| eval-tiny |" in captured.err
