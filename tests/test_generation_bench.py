"""bench/generate.py: it parses, refuses to run without CUDA, and its whole flow runs as a CPU smoke test."""
import json

import pytest
import torch

from conftest import load_script

bench = load_script("bench/generate.py")


def test_help_and_clear_failure_without_cuda(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0 and "examples:" in capsys.readouterr().out
    assert bench.main(["--cases", "nope"]) == 2
    assert "unknown case 'nope'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_cpu_smoke_run_writes_one_json_line_per_measurement(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert bench.main(["--device", "cpu", "--cases", "tiny-b2", "--dtype", "fp32", "--new_tokens", "6",
                       "--prompt_len", "8", "--repeats", "1", "--output_jsonl", str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    hf_line, ours_line = lines
    assert hf_line["impl"] == "transformers" and ours_line["impl"] == "gpt2_ascend"
    for line in lines:
        assert line["generated"] == 6 and line["batch_size"] == 2 and line["tokens_per_s"] > 0
        assert line["device"] == "cpu"
    assert ours_line["same_tokens_as_transformers"] is True  # same weights, fp32, greedy
    assert ours_line["ratio_vs_transformers"] == pytest.approx(ours_line["tokens_per_s"] / hf_line["tokens_per_s"],
                                                              rel=0.02)
