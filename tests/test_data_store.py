"""The .npy + sidecar store, load_token_blocks on raw and prepared input, and plain-text corpora."""
import hashlib
import json
import os
import re

import numpy as np
import pytest

from gpt2_ascend.data.sources import load_token_blocks
from gpt2_ascend.data.store import DamagedDataError, load_blocks, save_blocks, token_dtype
from gpt2_ascend.data.text import prepare_text_corpus, resolve_tokenizer
from gpt2_ascend.data.wikitext2 import write_wikitext2


@pytest.fixture(scope="module")
def tok_dir(data_dir):
    return os.path.join(data_dir, "gpt2")


@pytest.fixture(scope="module")
def wiki_slice(data_dir, tmp_path_factory):
    """The first 400 lines of wiki.valid.tokens (a few articles, ~25k tokens): real data, fast to tokenize."""
    with open(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(400)]
    path = tmp_path_factory.mktemp("wiki") / "wiki.slice.tokens"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------ save / load

def test_save_load_round_trip_with_sidecar(tmp_path):
    blocks = (np.arange(6 * 5) * 1000 % 50257).astype(np.uint16).reshape(6, 5)
    path = str(tmp_path / "sub" / "b.npy")
    save_blocks(blocks, path, {"source": "x", "options": {"mindformers_compat": False}})
    loaded = load_blocks(path)
    assert isinstance(loaded, np.memmap) and not loaded.flags.writeable
    np.testing.assert_array_equal(loaded, blocks)
    assert loaded.dtype == np.uint16
    meta = json.loads(open(path + ".json").read())
    assert meta == {"source": "x", "options": {"mindformers_compat": False}, "format_version": 1,
                    "kind": "token_blocks", "dtype": "uint16", "num_blocks": 6, "max_length": 5,
                    "sha256": hashlib.sha256(blocks.tobytes()).hexdigest()}
    assert sorted(os.listdir(tmp_path / "sub")) == ["b.npy", "b.npy.json"]  # no temporary files left


def test_token_dtype_by_vocab_size():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32 and token_dtype(152064) == np.int32


def test_truncated_npy_is_rejected(tmp_path):
    path = str(tmp_path / "b.npy")
    save_blocks(np.ones((50, 8), np.uint16), path, {})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match="corrupt or truncated token file"):
        load_blocks(path)


def test_sidecar_mismatch_is_rejected(tmp_path):
    path = str(tmp_path / "b.npy")
    save_blocks(np.ones((4, 8), np.uint16), path, {})
    np.save(path, np.ones((3, 8), np.uint16))  # array replaced behind the sidecar's back
    with pytest.raises(ValueError, match="does not match its sidecar"):
        load_blocks(path)


def flip_last_byte(path):
    """Same size, different bytes: what a bad disk or a stray write does."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def test_flipped_bytes_in_prepared_tokens_are_one_line(tmp_path):
    source = tmp_path / "wiki.train.tokens"
    source.write_text("text")
    path = str(tmp_path / "b.npy")
    save_blocks(np.arange(40, dtype=np.uint16).reshape(5, 8), path, {"source": str(source)})
    flip_last_byte(path)
    file, origin = re.escape(path), re.escape(str(source))  # a temporary folder's name may hold '+'
    with pytest.raises(DamagedDataError, match=rf"^{file} is damaged: the sha256 of its tokens differs from the "
                                               rf"one in {file}\.json .*prepare it again from {origin}$"):
        load_blocks(path)
    source.unlink()
    with pytest.raises(DamagedDataError, match=f"its source {origin} is gone"):
        load_token_blocks(path, 8)
    assert load_blocks(path, verify=False)[4, 7] == 39 ^ 0xFF00  # uint16 little-endian: the high byte flipped


def test_damaged_token_cache_is_rebuilt_with_one_warning(tmp_path, tok_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    cache = tmp_path / "cache"
    good = np.array(load_token_blocks(str(corpus), 8, tok_dir, cache_dir=str(cache)))
    cached = str(cache / sorted(os.listdir(cache))[0])
    flip_last_byte(cached)
    capsys.readouterr()
    again = load_token_blocks(str(corpus), 8, tok_dir, cache_dir=str(cache))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: the cached data {cached} is damaged") and \
        err.rstrip().endswith(f"rebuilding it from {corpus}")
    np.testing.assert_array_equal(again, good)
    np.testing.assert_array_equal(load_blocks(cached), good)  # rebuilt in place: verifies again
    meta = json.loads(open(cached + ".json").read())
    del meta["sha256"]  # an entry written before checksums: rebuilt, silently
    open(cached + ".json", "w").write(json.dumps(meta))
    np.testing.assert_array_equal(load_token_blocks(str(corpus), 8, tok_dir, cache_dir=str(cache)), good)
    assert capsys.readouterr().err == "" and "sha256" in json.loads(open(cached + ".json").read())


def test_changed_classification_arrays(tmp_path):
    from gpt2_ascend.data.store import load_arrays, save_arrays
    path = str(tmp_path / "c.npz")
    arrays = dict(input_ids=np.ones((3, 4), np.int32), attention_mask=np.ones((3, 4), np.int32),
                  labels=np.array([0, 1, 1]))
    save_arrays(arrays, path, {})
    with open(path, "wb") as f:  # a valid .npz of the same shapes, other labels, behind the sidecar's back
        np.savez(f, **dict(arrays, labels=np.array([1, 1, 1])))
    with pytest.raises(DamagedDataError, match=r"c.npz is damaged: the sha256 of labels differs"):
        load_arrays(path)
    save_arrays(arrays, path, {})
    data = bytearray(open(path, "rb").read())
    data[data.index(arrays["labels"].tobytes())] = 7  # flipped bytes: the zip's CRC-32 catches them
    open(path, "wb").write(bytes(data))
    with pytest.raises(DamagedDataError, match=r"c.npz is damaged \(Bad CRC-32 for file 'labels.npy'"):
        load_arrays(path)


def test_save_rejects_bad_arrays_and_names(tmp_path):
    with pytest.raises(ValueError, match="2-D integer"):
        save_blocks(np.ones(8, np.uint16), str(tmp_path / "a.npy"), {})
    with pytest.raises(ValueError, match="ending in .npy"):
        save_blocks(np.ones((2, 8), np.uint16), str(tmp_path / "a.bin"), {})


# ------------------------------------------------------------------------------------------------ load_token_blocks

def test_raw_and_prepared_input_give_the_same_blocks(wiki_slice, tok_dir, tmp_path):
    prepared = str(tmp_path / "slice.npy")
    expected = write_wikitext2(wiki_slice, prepared, 129, tok_dir)
    assert expected.shape[0] > 100
    from_npy = load_token_blocks(prepared, 129)
    np.testing.assert_array_equal(from_npy, expected)
    np.testing.assert_array_equal(load_token_blocks(str(tmp_path), 129), expected)  # a folder with one .npy

    cache = tmp_path / "cache"
    from_raw = load_token_blocks(wiki_slice, 129, tok_dir, cache_dir=str(cache))
    np.testing.assert_array_equal(from_raw, expected)
    cached = sorted(os.listdir(cache))
    assert len(cached) == 2 and cached[0].endswith(".npy") and cached[1] == cached[0] + ".json"
    stamp = os.path.getmtime(cache / cached[0])
    again = load_token_blocks(wiki_slice, 129, tok_dir, cache_dir=str(cache))  # a cache hit: not written again
    np.testing.assert_array_equal(again, expected)
    assert os.path.getmtime(cache / cached[0]) == stamp and sorted(os.listdir(cache)) == cached
    # another mode or width is another cache entry
    compat = load_token_blocks(wiki_slice, 129, tok_dir, mindformers_compat=True, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 4 and compat.shape[0] <= expected.shape[0]


def test_width_mismatch_is_a_clear_error(wiki_slice, tok_dir, tmp_path):
    prepared = str(tmp_path / "slice.npy")
    write_wikitext2(wiki_slice, prepared, 65, tok_dir)
    with pytest.raises(ValueError, match=r"blocks of 65 tokens but max_length is 1025: prepare it again with "
                                         r"--max_length 1025"):
        load_token_blocks(prepared, 1025)


def test_unknown_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_token_blocks(str(tmp_path / "nope.npy"), 8)
    odd = tmp_path / "data.xyz"  # (.parquet and the other datasets formats: tests/test_hf_datasets.py)
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="don't know how to read"):
        load_token_blocks(str(odd), 8)


# ------------------------------------------------------------------------------------------------ plain text

def test_text_folder_is_sorted_files_joined_by_newline(tmp_path, tok_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("Second file.\n", encoding="utf-8")
    (corpus / "a.txt").write_text("\ufeffFirst file, line one.\r\nLine two.\n\n", encoding="utf-8")  # BOM, CRLF
    (corpus / "empty.txt").write_text("  \n", encoding="utf-8")
    (corpus / "notes.md").write_text("ignored", encoding="utf-8")
    tok, _ = resolve_tokenizer(tok_dir)
    expected = tok.encode("First file, line one.\nLine two.\nSecond file.")
    blocks = prepare_text_corpus(str(corpus), 3, tok_dir)
    assert blocks.dtype == np.uint16
    assert blocks.ravel().tolist() == expected[:len(expected) // 3 * 3]
    np.testing.assert_array_equal(load_token_blocks(str(corpus), 3, tok_dir), blocks)


def test_text_errors(tmp_path, tok_dir):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        prepare_text_corpus(str(latin), 4, tok_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt contains no text"):
        prepare_text_corpus(str(empty), 4, tok_dir)
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short.txt has only 5 tokens, fewer than one block of max_length 1025"):
        prepare_text_corpus(str(short), 1025, tok_dir)
    folder = tmp_path / "no_txt"
    folder.mkdir()
    with pytest.raises(ValueError, match="no .txt files in folder"):
        prepare_text_corpus(str(folder), 4, tok_dir)
