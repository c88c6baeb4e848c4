"""SST-2 preparation on the real GLUE dev.tsv, the .npz store, and the txtcls CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2_ascend.data import txtcls
from gpt2_ascend.data.sources import load_txtcls
from gpt2_ascend.data.store import load_arrays
from gpt2_ascend.data.txtcls import prepare_txtcls, read_sst2
from gpt2_ascend.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(data_dir):
    return os.path.join(data_dir, "gpt2")


@pytest.fixture(scope="module")
def dev_tsv(data_dir):
    return os.path.join(data_dir, "sst2", "dev.tsv")


@pytest.fixture(scope="module")
def dev(dev_tsv, tok_dir):
    return prepare_txtcls(dev_tsv, 64, tok_dir)


def test_read_sst2_rows_labels_and_trailing_space(dev_tsv):
    sentences, labels = read_sst2(dev_tsv)
    assert len(sentences) == 872 and labels.dtype == np.int64
    assert int(labels.sum()) == 444 and set(labels.tolist()) == {0, 1}
    # the header is skipped, and GLUE's space before the tab is kept, as MindFormers does
    assert sentences[0] == "it 's a charming and often affecting journey . " and labels[0] == 1
    assert sentences[1] == "unflinchingly bleak and desperate " and labels[1] == 0


def test_padding_mask_and_labels_on_dev(dev, dev_tsv, tok_dir):
    ids, mask, labels = dev["input_ids"], dev["attention_mask"], dev["labels"]
    assert ids.shape == mask.shape == (872, 64) and labels.shape == (872,)
    assert int(labels.sum()) == 444
    tok = load_tokenizer(tok_dir)
    sentences, _ = read_sst2(dev_tsv)
    for row in (0, 1, 500, 871):
        tokens = tok.encode(sentences[row])
        n = len(tokens)
        assert ids[row, :n].tolist() == tokens and tokens[-1] == 220  # " " before the tab
        assert (ids[row, n:] == 50256).all()  # right padding with eos
        assert mask[row, :n].all() and not mask[row, n:].any()
    assert ids[0, :12].tolist() == [270, 705, 82, 257, 23332, 290, 1690, 13891, 7002, 764, 220, 50256]
    lengths = mask.sum(1)
    assert lengths.min() > 0 and lengths.max() == 61  # the longest dev sentence is 61 tokens


def test_long_rows_are_cut_and_counted(dev_tsv, tok_dir, tmp_path):
    arrays, meta = txtcls.write_txtcls(dev_tsv, str(tmp_path / "dev16.npz"), 16, tok_dir)
    full = prepare_txtcls(dev_tsv, 64, tok_dir)
    lengths = full["attention_mask"].sum(1)
    assert meta["num_truncated"] == int((lengths > 16).sum()) > 100
    np.testing.assert_array_equal(arrays["input_ids"], full["input_ids"][:, :16])
    assert arrays["attention_mask"].sum(1).max() == 16


def test_npz_round_trip_and_load_txtcls(dev, dev_tsv, tok_dir, tmp_path):
    out = tmp_path / "dev.npz"
    assert txtcls.main(["--dataset_name", "sst_2", "--input_file", dev_tsv, "--output_file", str(out),
                        "--max_length", "64", "--tokenizer_type", tok_dir]) == 0
    meta = json.loads(open(str(out) + ".json").read())
    assert meta["num_rows"] == 872 and meta["label_counts"] == {"0": 428, "1": 444}
    assert meta["num_truncated"] == 0 and meta["options"]["pad_token_id"] == 50256
    assert meta["source_sha256"] == "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"
    for key in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(load_arrays(str(out))[key], dev[key])
        np.testing.assert_array_equal(load_txtcls(str(out), 64)[key], dev[key])
        np.testing.assert_array_equal(load_txtcls(dev_tsv, 64, tok_dir, cache_dir=str(tmp_path / "c"))[key], dev[key])
    with pytest.raises(ValueError, match="rows of 64 tokens but max_length is 128"):
        load_txtcls(str(out), 128)


def test_bad_rows_and_files(tmp_path, tok_dir, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\na fine row \t1\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv line 3: expected `sentence<TAB>label`, got 1"):
        read_sst2(str(bad))
    label = tmp_path / "label.tsv"
    label.write_text("sentence\tlabel\ngood \tpositive\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: label 'positive' is not an integer"):
        read_sst2(str(label))
    corrupt = tmp_path / "x.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupt or truncated classification file"):
        load_arrays(str(corrupt))
    assert txtcls.main(["--input_file", str(tmp_path / "none.tsv"), "--output_file", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input file not found") and err.count("\n") == 1


def test_cli_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "gpt2_ascend.data.txtcls", "--help"], capture_output=True,
                         text=True, check=True)
    assert "examples:" in out.stdout and "--dataset_name" in out.stdout and out.stderr == ""
