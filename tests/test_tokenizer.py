import json
import re

import pytest

from gpt2_ascend import load_tokenizer


def test_real_vocab(data_dir, tmp_path):
    tok = load_tokenizer(f"{data_dir}/gpt2")
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok(" = Homarus gammarus = ").input_ids == [796, 8074, 20272, 9106, 3876, 385, 796, 220]
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 50256
    assert len(tok) == 50257
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))  # tokenizer.json only
    assert again("Hello world").input_ids == [15496, 995] and again.pad_token_id == 50256


def test_decode_gives_back_the_exact_text_on_every_transformers_version(data_dir, tmp_path):
    """transformers 4.x would "clean up" the spaces WikiText puts before punctuation unless told not to."""
    text = " The film was released in 1998 . It 's a test , isn't it ? Yes ! ( see @-@ below )"
    tok = load_tokenizer(f"{data_dir}/gpt2")
    assert tok.decode(tok(text).input_ids) == text
    tok.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer_config.json") as f:  # what transformers 4.x reads back from a saved model
        assert json.load(f)["clean_up_tokenization_spaces"] is False
    again = load_tokenizer(str(tmp_path))  # the tokenizer.json path
    assert again.decode(again(text).input_ids) == text


def test_default_reads_data_dir(data_dir):
    assert load_tokenizer()("Hello world").input_ids == [15496, 995]


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))


def damaged_copy(data_dir, tmp_path, name, change):
    d = tmp_path / name
    d.mkdir()
    for file in ("vocab.json", "merges.txt"):
        data = open(f"{data_dir}/gpt2/{file}", "rb").read()
        (d / file).write_bytes(change(data) if name.startswith(file.split(".")[0]) else data)
    return d


@pytest.mark.parametrize("name, change, message", [
    ("vocab_truncated", lambda b: b[: len(b) // 2], r"vocab.json is not valid JSON \(Unterminated"),
    ("vocab_garbled", lambda b: b"\xff\xfe" + b[2:], r"vocab.json is not UTF-8 text \(byte 0xff at offset 0\)"),
    ("vocab_list", lambda b: b"[1, 2]", r"bad value \[1, 2\] for 'vocab' in .*vocab.json: expected a mapping of tokens to ids"),
    # cut at a line end: the tokenizers library reads it and tokenizes differently, without a word
    ("merges_truncated", lambda b: b[: b.index(b"\n", len(b) // 2) + 1],
     r"merges.txt has 2\d{4} merges, but 2\d{4} tokens of .*vocab.json \(e.g. .*\) are made by none of them"),
    ("merges_cut_mid_line", lambda b: b[: b.index(b"\n", len(b) // 2) + 3], r"merges.txt is damaged: merge 2\d{4} is"),
    ("merges_garbled", lambda b: b[:100] + b"\xff" + b[101:], r"merges.txt is damaged: not UTF-8 text"),
])
def test_damaged_bpe_files_are_one_line_naming_the_file(data_dir, tmp_path, name, change, message):
    d = damaged_copy(data_dir, tmp_path, name, change)
    with pytest.raises(ValueError, match=message) as e:
        load_tokenizer(str(d))
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_damaged_tokenizer_json_is_one_line(data_dir, tmp_path):
    load_tokenizer(f"{data_dir}/gpt2").save_pretrained(tmp_path)
    data = (tmp_path / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}/tokenizer.json is damaged or not a tokenizer"):
        load_tokenizer(str(tmp_path))


def test_a_saved_model_s_tokenizer_names_its_context(data_dir, tmp_path):
    """Next to a model of 128 positions the tokenizer says model_max_length 128, so `truncation=True` (ours and
    transformers') cuts a long text to what the model can read; GPT-2's own files, which name none, give 1024."""
    import transformers
    from gpt2_ascend.data.tokenizer import copy_tokenizer
    copy_tokenizer(f"{data_dir}/gpt2", str(tmp_path / "tiny"), model_max_length=128)
    copy_tokenizer(f"{data_dir}/gpt2", str(tmp_path / "plain"))
    long_text = "word " * 300
    for tok in (load_tokenizer(str(tmp_path / "tiny")), transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny")):
        assert tok.model_max_length == 128 and len(tok(long_text, truncation=True).input_ids) == 128
    assert load_tokenizer(str(tmp_path / "plain")).model_max_length == 1024
    assert load_tokenizer(f"{data_dir}/gpt2").model_max_length == 1024


def test_a_checked_tokenizer_is_checked_again_once_its_files_change(data_dir, tmp_path):
    """check_bpe_files skips a pair it checked in this process only while both files are unchanged: merges.txt
    truncated afterwards (another size) is refused at the next check."""
    import shutil
    from gpt2_ascend.data.tokenizer import check_bpe_files
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(f"{data_dir}/gpt2/{name}", tmp_path / name)
    check_bpe_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    (tmp_path / "merges.txt").write_text("\n".join(lines[:1000]), encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt is truncated or from another tokenizer"):
        check_bpe_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
