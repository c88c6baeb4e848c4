"""generate.py end to end with a tiny real-vocabulary model: recipe defaults, streaming, batches, errors."""
import json

import pytest
import torch

from conftest import load_script, tiny_config
from gpt2_ascend import GPT2LMHeadModel, load_tokenizer
from gpt2_ascend.generation import generate, generate_text

cli = load_script("generate.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=50257, n_embd=32, pad_token_id=50256, eos_token_id=50256, bos_token_id=50256,
                         initializer_range=0.2)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(root / "model"))
    return str(root / "model"), model, load_tokenizer()


def run(args, capsys):
    code = cli.main(args + ["--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_defaults_come_from_the_predict_recipe(setup, capsys, tmp_path):
    path, model, tok = setup
    prompt = "The meaning of life is"
    n = len(tok(prompt).input_ids)
    out = run(["--model", path, "--prompt", prompt, "--ignore_eos"], capsys)
    # max_decode_length 1024 (prompt + new) capped by this model's 64 positions; greedy
    ids = generate(model, torch.tensor([tok(prompt).input_ids]), max_new_tokens=64 - n, eos_token_id=None)
    assert ids.size(1) == 64
    assert out == prompt + tok.decode(ids[0, n:], skip_special_tokens=True) + "\n"
    # a recipe of our own: max_decode_length 12, sampling with top_k 1 (= greedy), seed from the recipe
    recipe = tmp_path / "predict.yaml"
    recipe.write_text("seed: 3\nmodel:\n  model_config:\n    max_decode_length: 12\n    do_sample: true\n    top_k: 1\n")
    out = run(["--config", str(recipe), "--load_checkpoint", path, "--prompt", prompt, "--ignore_eos"], capsys)
    assert out == prompt + tok.decode(ids[0, n:12], skip_special_tokens=True) + "\n"


def test_stream_prints_the_same_text(setup, capsys):
    path, _, _ = setup
    args = ["--model", path, "--prompt", "Hello there", "--max_new_tokens", "12", "--ignore_eos"]
    assert run(args + ["--stream"], capsys) == run(args, capsys)


def test_prompt_file_batches_and_json_equal_one_by_one(setup, capsys, tmp_path):
    path, model, tok = setup
    prompts = ["A short one", "A somewhat longer prompt for the batch", "Third"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    out_json = tmp_path / "out.json"
    printed = run(["--model", path, "--prompt_file", str(tmp_path / "prompts.txt"), "--batch_size", "2",
                   "--max_new_tokens", "8", "--repetition_penalty", "1.3", "--output_json", str(out_json)], capsys)
    result = json.loads(out_json.read_text())
    alone = [generate_text(model, tok, p, max_new_tokens=8, repetition_penalty=1.3) for p in prompts]
    assert [r["text"] for r in result["results"]] == alone
    assert printed == "".join(p + t + "\n" for p, t in zip(prompts, alone))


def test_sampling_with_a_seed_is_reproducible(setup, capsys):
    path, _, _ = setup
    args = ["--model", path, "--prompt", "Once upon a time", "--max_new_tokens", "10", "--do_sample",
            "--temperature", "1.2", "--top_p", "0.9", "--ignore_eos"]
    a = run(args + ["--seed", "5"], capsys)
    assert a == run(args + ["--seed", "5"], capsys)
    assert a != run(args + ["--seed", "6"], capsys)


def test_bad_arguments_are_one_line_with_exit_2(setup, capsys, tmp_path):
    path, _, _ = setup
    base = ["--model", path, "--prompt", "x"]
    cases = [
        (base + ["--top_p", "0"], "top_p"),
        (base + ["--top_p", "1.5"], "top_p"),
        (base + ["--do_sample", "--temperature", "0"], "temperature"),
        (base + ["--top_k", "-1"], "top_k"),
        (["--model", path], "no prompt"),
        (["--model", str(tmp_path / "missing"), "--prompt", "x"], "model path not found"),
        (base + ["--stream", "--batch_size", "2"], "--batch_size 1"),
        (["--model", path, "--prompt", "word " * 40, "--max_new_tokens", "40"], "n_positions=64"),
        (["--model", path, "--prompt_file", str(tmp_path / "none.txt")], "prompt file not found"),
    ]
    for args, message in cases:
        assert cli.main(args + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    # the explicit truncation flag keeps the last tokens instead
    out = run(["--model", path, "--prompt", "word " * 40, "--max_new_tokens", "40", "--truncate_prompt"], capsys)
    assert out.startswith("word word")


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "examples:" in capsys.readouterr().out
