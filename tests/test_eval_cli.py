"""evaluate.py end to end on slices of the real WikiText-2 valid and SST-2 dev files, tiny models."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import load_script, tiny_config
from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.data.sources import load_txtcls
from gpt2_ascend.data.wikitext2 import prepare_wikitext2, wikitext2_token_stream
from gpt2_ascend.eval import classification_accuracy, perplexity
from helpers.fake_hub import FakeHub

SEQ = 32


evaluate = load_script("evaluate.py")


def real_vocab_config(**over):
    return tiny_config(vocab_size=50257, n_embd=32, pad_token_id=50256, eos_token_id=50256, bos_token_id=50256,
                       **over)


def head_of(path, n_lines, out):
    with open(path, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n_lines)]
    out.write_text("".join(lines), encoding="utf-8")
    return str(out)


def run_cli(args, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = evaluate.main(args + ["--output_json", str(out), "--no_progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out.read_text()), captured.out


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """The same random tiny LM saved by transformers and by us."""
    import transformers
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    config = real_vocab_config()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict())).eval()
    hf.save_pretrained(root / "hf")
    ours = GPT2LMHeadModel.from_pretrained(str(root / "hf"))
    ours.save_pretrained(str(root / "ours"))
    return root, ours


def test_perplexity_cli_reproduces_the_api_on_real_wikitext(lm_dirs, data_dir, tmp_path, capsys, monkeypatch):
    root, ours = lm_dirs
    valid = head_of(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), 25, tmp_path / "wiki.valid.tokens")
    blocks = prepare_wikitext2(valid, SEQ)
    assert blocks.shape[0] >= 30
    api = perplexity(ours, blocks, SEQ, batch_size=8)
    for model_dir in ("hf", "ours"):  # written by transformers, and by our save_pretrained
        got, printed = run_cli(["--task", "perplexity", "--model", str(root / model_dir), "--eval_dataset_dir", valid,
                                "--seq_length", str(SEQ)], tmp_path, capsys)
        assert got["ppl"] == pytest.approx(api["ppl"], rel=1e-9)
        assert got["tokens"] == api["tokens"] == blocks.shape[0] * (SEQ - 1)
        assert f"perplexity {api['ppl']:.4f}" in printed
    # MindFormers' batch-mean protocol and a sliding window through the CLI, against the API
    mf = perplexity(ours, blocks, SEQ, batch_size=5, protocol="mindformers")
    got, _ = run_cli(["--model", str(root / "ours"), "--eval_dataset_dir", valid, "--seq_length", str(SEQ),
                      "--protocol", "mindformers", "--batch_size", "5"], tmp_path, capsys)
    assert got["loss"] == pytest.approx(mf["loss"], rel=1e-9) and got["protocol"] == "mindformers"
    stream = wikitext2_token_stream(valid)
    strided = perplexity(ours, stream, SEQ, stride=16)
    assert strided["tokens"] == len(stream) - 1
    # a hub id served from 127.0.0.1
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with FakeHub({"someone/tiny-gpt2": str(root / "hf")}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        got, _ = run_cli(["--model", "someone/tiny-gpt2", "--eval_dataset_dir", valid, "--seq_length", str(SEQ),
                          "--stride", "16"], tmp_path, capsys)
    assert got["loss"] == pytest.approx(strided["loss"], rel=1e-9) and got["tokens"] == strided["tokens"]


def test_perplexity_cli_with_a_lora_adapter(lm_dirs, data_dir, tmp_path, capsys):
    from gpt2_ascend.lora import apply_lora
    root, ours = lm_dirs
    base = GPT2LMHeadModel.from_pretrained(str(root / "ours"))
    peft_model = apply_lora(base, rank=2, alpha=4, dropout=0.0)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    valid = head_of(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), 12, tmp_path / "wiki.valid.tokens")
    blocks = prepare_wikitext2(valid, SEQ)
    expected = perplexity(peft_model, blocks, SEQ)
    assert expected["loss"] != pytest.approx(perplexity(ours, blocks, SEQ)["loss"], rel=1e-6)
    got, _ = run_cli(["--model", str(root / "ours"), "--adapter", str(tmp_path / "adapter"),
                      "--eval_dataset_dir", valid, "--seq_length", str(SEQ)], tmp_path, capsys)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_perplexity_cli_reads_a_training_checkpoint(lm_dirs, data_dir, tmp_path, capsys):
    from gpt2_ascend.checkpoints import save_checkpoint
    root, ours = lm_dirs
    step_dir = save_checkpoint(str(tmp_path / "checkpoint"), 7, {"model": ours.state_dict()},
                               json_files={"config.json": ours.config.to_hf_dict()})
    valid = head_of(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), 12, tmp_path / "wiki.valid.tokens")
    expected = perplexity(ours, prepare_wikitext2(valid, SEQ), SEQ)
    got, _ = run_cli(["--model", step_dir, "--eval_dataset_dir", valid, "--seq_length", str(SEQ)], tmp_path, capsys)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-9)


@pytest.fixture(scope="module")
def sst2_classifier(tmp_path_factory, data_dir):
    """A tiny classifier finetuned for 80 steps on a slice of SST-2 train, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("sst2")
    train = head_of(os.path.join(data_dir, "sst2", "train.tsv"), 401, root / "train.tsv")
    data = load_txtcls(train, 32)
    ids, mask, labels = (torch.as_tensor(np.asarray(data[k])).long() for k in ("input_ids", "attention_mask", "labels"))
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(real_vocab_config())
    before = classification_accuracy(model, data)["accuracy"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):  # lr 1e-3 x 80 steps learns for any seed tried (0.49-0.52 -> 0.89-0.95)
        rows = torch.randint(0, len(labels), (16,), generator=g)
        loss = model(ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = classification_accuracy(model, data)["accuracy"]
    assert after > before + 0.1, (before, after)  # it learned something
    model.save_pretrained(str(root / "model"))
    return root / "model"


def test_text_classification_cli_matches_the_api(sst2_classifier, data_dir, tmp_path, capsys):
    dev = head_of(os.path.join(data_dir, "sst2", "dev.tsv"), 121, tmp_path / "dev.tsv")
    model = GPT2ForSequenceClassification.from_pretrained(str(sst2_classifier))
    api = classification_accuracy(model, load_txtcls(dev, 64), batch_size=32)
    got, printed = run_cli(["--task", "text_classification", "--model", str(sst2_classifier),
                            "--eval_dataset_dir", dev, "--max_length", "64"], tmp_path, capsys)
    assert got["total"] == 120
    assert got["accuracy"] == api["accuracy"] and got["correct"] == api["correct"]
    assert got["per_class"] == {str(k): v for k, v in api["per_class"].items()}
    assert sum(c["total"] for c in got["per_class"].values()) == 120
    assert f"accuracy {api['accuracy']:.4f}" in printed


def test_lengths_default_to_the_models_context_and_max_samples_takes_a_subset(lm_dirs, sst2_classifier, data_dir,
                                                                             tmp_path, capsys):
    """Issue 24: no --seq_length / --max_length reads rows of the model's context (64 here, not 1024 / 128), said on
    stderr; --max_samples N (lm-eval's --limit N, or a fraction) evaluates the first N rows, as the API does on them."""
    root, ours = lm_dirs
    valid = head_of(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), 60, tmp_path / "wiki.valid.tokens")
    blocks = prepare_wikitext2(valid, ours.config.n_positions)
    assert blocks.shape[0] > 5
    for flag in ("--max_samples", "--limit"):
        out = tmp_path / "r.json"
        assert evaluate.main(["--model", str(root / "ours"), "--eval_dataset_dir", valid, flag, "5", "--output_json",
                              str(out), "--no_progress", "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert "rows of 64 tokens: the model's context" in err
        got, api = json.loads(out.read_text()), perplexity(ours, blocks[:5], 64)
        assert got["seq_length"] == 64 and got["tokens"] == 5 * 63 == api["tokens"]
        assert got["ppl"] == pytest.approx(api["ppl"], rel=1e-9)
    got, _ = run_cli(["--model", str(root / "ours"), "--eval_dataset_dir", valid, "--limit", "0.5"], tmp_path, capsys)
    assert got["tokens"] == (blocks.shape[0] // 2) * 63
    dev = head_of(os.path.join(data_dir, "sst2", "dev.tsv"), 41, tmp_path / "dev.tsv")
    model = GPT2ForSequenceClassification.from_pretrained(str(sst2_classifier))
    api = classification_accuracy(model, {k: v[:7] for k, v in load_txtcls(dev, 64).items()})
    got, _ = run_cli(["--task", "text_classification", "--model", str(sst2_classifier), "--eval_dataset_dir", dev,
                      "--max_samples", "7"], tmp_path, capsys)
    assert got["total"] == 7 and got["correct"] == api["correct"] and got["loss"] == pytest.approx(api["loss"])
    for bad in ("0", "1.5", "-2"):
        assert evaluate.main(["--model", str(root / "ours"), "--eval_dataset_dir", valid, "--max_samples", bad]) == 2
        assert "--max_samples must be" in capsys.readouterr().err


def test_cli_errors_are_one_line_with_exit_2(lm_dirs, tmp_path, capsys):
    root, _ = lm_dirs
    tokens, tsv = tmp_path / "x.tokens", tmp_path / "x.tsv"
    tokens.write_text(" = A = \n\n some words here \n")
    tsv.write_text("sentence\tlabel\nfine\t1\n")
    ours = str(root / "ours")
    cases = [
        (["--model", ours, "--eval_dataset_dir", str(tmp_path / "missing.tokens")], "dataset not found"),
        (["--model", str(tmp_path / "nope"), "--eval_dataset_dir", str(tokens)], "model path not found"),
        (["--model", ours, "--eval_dataset_dir", str(tokens), "--seq_length", "1024"], "n_positions=64"),
        (["--model", ours, "--eval_dataset_dir", str(tokens)], "fewer than one block of max_length 64"),  # its context
        (["--model", ours, "--eval_dataset_dir", str(tokens), "--seq_length", "32"], "fewer than one block"),
        (["--model", ours, "--eval_dataset_dir", str(tokens), "--seq_length", "32", "--stride", "64"], "stride"),
        (["--model", ours, "--eval_dataset_dir", str(tokens), "--seq_length", "32", "--stride", "8",
          "--protocol", "mindformers"], "stride"),
        (["--task", "text_classification", "--model", ours, "--eval_dataset_dir", str(tsv)],
         "without a classification head"),
    ]
    for args, message in cases:
        assert evaluate.main(args + ["--device", "cpu", "--no_progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--help"])
    assert exit_.value.code == 0
    assert "examples:" in capsys.readouterr().out
