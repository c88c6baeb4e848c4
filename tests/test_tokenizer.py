import json

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
