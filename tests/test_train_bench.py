"""bench/train.py: it parses, refuses to run without CUDA, and its whole flow runs as a CPU smoke test
(numbers meaningless; the real measurements are on a GPU, in docs/performance.md)."""
import json

import pytest
import torch

from conftest import load_script

bench = load_script("bench/train.py")


def test_help_and_clear_failure_without_cuda(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0 and "--lora" in capsys.readouterr().out
    assert bench.main(["--device", "cpu", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True])
def test_cpu_smoke_run_reports_ours_the_baseline_and_the_ratio(tmp_path, capsys, lora):
    out = tmp_path / "train.jsonl"
    argv = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
            "--baseline_eager", "--loss_chunk_size", "8", "--output_jsonl", str(out)] + (["--lora"] if lora else [])
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line.get("impl") for line in lines] == ["gpt2_ascend", "transformers+peft" if lora else "transformers", None]
    assert all(line["tokens_per_s"] > 0 for line in lines[:2]) and lines[2]["ratio"] > 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
