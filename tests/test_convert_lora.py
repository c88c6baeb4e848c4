"""LoRA export (convert/merge_lora.py): the merged HF directory gives the adapted model's logits."""
import os

import pytest
import torch

from conftest import load_script, max_diff, randomize_lora_b, tiny_config
from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.convert import merge_lora
from gpt2_ascend.lora import apply_lora


def merge_cli(argv):
    return load_script("convert/merge_lora.py").main(argv)


def trained_adapter(cls, config, base_dir, adapter_dir, targets=("c_attn", "c_fc")):
    """A base model on disk and a PEFT adapter whose B matrices are non-zero (as after training)."""
    torch.manual_seed(0)
    base = cls(config).eval()
    base.save_pretrained(base_dir)
    adapted = apply_lora(cls.from_pretrained(base_dir), rank=4, alpha=8, dropout=0.0, target_modules=targets)
    randomize_lora_b(adapted)
    adapted.save_pretrained(adapter_dir)
    return base, adapted.eval()


def test_merged_lm_matches_adapted_model(tmp_path, data_dir):
    import transformers
    config = tiny_config()
    base, adapted = trained_adapter(GPT2LMHeadModel, config, tmp_path / "base", tmp_path / "adapter")
    for name in ("vocab.json", "merges.txt"):  # a base dir with tokenizer files: they travel with the export
        (tmp_path / "base" / name).write_bytes(open(os.path.join(data_dir, "gpt2", name), "rb").read())
    assert merge_cli(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                      "--output_dir", str(tmp_path / "merged")]) == 0
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "generation_config.json", "merges.txt",
                                                        "model.safetensors", "vocab.json"]
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(2))
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        assert max_diff(want, base(ids).logits) > 1e-2  # the adapter changes the model...
        assert max_diff(merged(ids).logits, want) <= 1e-6  # ...and the export keeps that change
        assert max_diff(theirs(ids).logits, want) <= 1e-6


def test_merged_classifier_and_errors(tmp_path, capsys):
    config = tiny_config(num_labels=3)
    _, adapted = trained_adapter(GPT2ForSequenceClassification, config, tmp_path / "base", tmp_path / "adapter",
                                 targets=("c_attn",))
    summary = merge_lora(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype="bf16")
    assert summary["architecture"] == "GPT2ForSequenceClassification" and summary["tokenizer_files"] == []
    merged = GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(merged.float()(ids).logits, adapted(input_ids=ids).logits) <= 0.05  # bf16 rounding only
    assert merge_cli(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "nope"),
                      "--output_dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: adapter directory not found")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_lora(str(tmp_path / "base"), str(tmp_path / "base"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
