"""WikiText-2 preparation: MindFormers' cleaning rules, passage logic, and MindFormers' blocks on real data."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gpt2_ascend.data import wikitext2
from gpt2_ascend.data.text import split_for_tokenizer, tokenize_text
from gpt2_ascend.data.wikitext2 import (pack_blocks, prepare_wikitext2, read_passages, wikitext2_token_stream,
                                        wikitext_clean)
from gpt2_ascend.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(data_dir):
    return os.path.join(data_dir, "gpt2")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


# ------------------------------------------------------------------------------------------------ cleaning rules

@pytest.mark.parametrize("line, cleaned", [
    ("the players ' union", "the players' union"),                 # contraction "s '"
    ("a /' 5/ b", "a /'[0-9]/ b"),                                  # MindFormers' literal replacement, kept
    ("a 1 @-@ 2 b", "a 1-2 b"),
    ("1 @,@ 000 men", "1,000 men"),
    ("2 @.@ 5 m", "2.5 m"),
    ("as follows : one", "as follows: one"),
    ("one ; two", "one; two"),
    ("end . Next", "end. Next"),
    ("the end .", "the end."),
    ("wow ! yes", "wow! yes"),
    ("why ? because", "why? because"),
    ("red , green", "red, green"),
    ("60 cm ( 24 in ) long", "60 cm (24 in) long"),
    ("see [ 1 ] here", "see [1] here"),
    ("set { a b } here", "set {a b} here"),
    ('he said " hello there " loudly', 'he said "hello there" loudly'),
    ("the ' quoted word ' here", "the 'quoted word' here"),
    ("= = = = Deep = = = =", "==== Deep ===="),
    ("= = = Sub = = =", "=== Sub ==="),
    ("= = Section = =", "== Section =="),
    ("20 \u00b0 C", "20\u00b0C"),
    ("about N people", "about 1 people"),
    ("Ireland 's capital", "Ireland's capital"),
])
def test_wikitext_clean_rule_by_rule(line, cleaned):
    assert wikitext_clean(line) == cleaned


def test_wikitext_clean_applies_rules_in_mindformers_order():
    line = ("Homarus gammarus is a large <unk> , with a body length up to 60 centimetres ( 24 in ) and weighing "
            "up to 5 @-@ 6 kilograms ( 11 @.@ 5 lb ) , although the lobsters ' claws are N 's .")
    # "s '" -> "s'" first, then the quote rule pairs that apostrophe with the one of "'s" and tightens
    # "' claws are N '"; so " N " and " 's" no longer match. MindFormers' output, quirks included.
    assert wikitext_clean(line) == (
        "Homarus gammarus is a large <unk>, with a body length up to 60 centimetres (24 in) and weighing "
        "up to 5-6 kilograms (11.5 lb), although the lobsters'claws are N's.")
    assert wikitext_clean(line) == _mindformers_clean(line)


# ------------------------------------------------------------------------------------------------ passages

SYNTHETIC = (" \n = Title = \n \n First line , one . \n Second line \n \n = = Section = = \n \n Third line \n"
             " = = Empty = = \n \n = = = Also empty = = = \n Last passage , unclosed . \n \n")


@pytest.fixture
def synthetic(tmp_path):
    path = tmp_path / "wiki.synthetic.tokens"
    path.write_text(SYNTHETIC, encoding="utf-8")
    return str(path)


def test_passages_headings_close_and_are_dropped(synthetic):
    assert read_passages(synthetic) == ["First line, one. Second line", "Third line", "Last passage, unclosed."]


def test_passages_mindformers_compat_drops_the_unclosed_last_passage(synthetic):
    assert read_passages(synthetic, mindformers_compat=True) == ["First line, one. Second line", "Third line"]


def test_first_line_without_heading_starts_a_passage(tmp_path):
    path = tmp_path / "x.tokens"
    path.write_text(" opening words \n = H = \n body \n", encoding="utf-8")
    assert read_passages(str(path)) == ["opening words", "body"]


def test_token_stream_joins_passages_with_newline_and_adds_no_eos(synthetic, tok):
    stream = wikitext2_token_stream(synthetic, tok)
    expected = tok.encode("First line, one. Second line\nThird line\nLast passage, unclosed.")
    assert stream.dtype == np.uint16
    assert stream.tolist() == expected
    assert 50256 not in stream.tolist()


def test_headings_only_file_is_an_error(tmp_path, tok):
    path = tmp_path / "h.tokens"
    path.write_text(" = A = \n \n = = B = = \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no WikiText passages"):
        prepare_wikitext2(str(path), 8, tok)


def test_non_utf8_wikitext_is_an_error(tmp_path, tok):
    path = tmp_path / "latin1.tokens"
    path.write_bytes(" caf\xe9 au lait \n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare_wikitext2(str(path), 4, tok)


def test_pack_blocks_drops_the_remainder():
    blocks = pack_blocks(np.arange(11, dtype=np.uint16), 3)
    assert blocks.shape == (3, 3) and blocks.dtype == np.uint16
    assert blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than one block of max_length 12"):
        pack_blocks(np.arange(11), 12)


@pytest.mark.parametrize("n_tokens, width", [(9, 3), (3, 3), (12, 12), (12, 4), (1, 1)])
def test_pack_blocks_keeps_every_block_of_an_exact_multiple(n_tokens, width):
    """No remainder: every token is in a block, the last block too (dropping it passes with 11 tokens)."""
    blocks = pack_blocks(np.arange(n_tokens, dtype=np.uint16), width)
    assert blocks.shape == (n_tokens // width, width)
    assert blocks.reshape(-1).tolist() == list(range(n_tokens))


# ---------------------------------------------------------------------------------------- MindFormers, real data

def _mindformers_clean(string):
    """MindFormers' wikitext_clean, transcribed separately from its source for this test."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" .", "."), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        string = string.replace(a, b)
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        string = string.replace(a, b)
    return string


def _mindformers_blocks(input_file, tokenizer, block_size):
    """wikitext2_data_process.py's preprocess_data + main, step by step, without MindRecord."""
    dataset_valid, passage = [], []
    with open(input_file, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                if line.startswith("=") and line.endswith("=") and passage:
                    dataset_valid.append(passage)
                    passage = []
                elif line.startswith("=") and line.endswith("="):
                    continue
                else:
                    passage.append(line)
    res = []
    for lines in dataset_valid:
        text = ""
        for sentence in lines:
            text = text + " " + _mindformers_clean(sentence)
        res.append(text.strip())
    sentence = "\n".join(res).strip().split("\t")
    total_ids = tokenizer.encode(sentence[0])
    total_length = (len(total_ids) // block_size) * block_size
    return [total_ids[block_size * i:block_size * (i + 1)] for i in range(total_length // block_size)]


@pytest.fixture(scope="module")
def mindformers_valid_blocks(data_dir, tok):
    return _mindformers_blocks(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), tok, 1025)


def test_mindformers_compat_reproduces_valid_blocks(data_dir, tok_dir, mindformers_valid_blocks):
    ours = prepare_wikitext2(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), 1025, tok_dir,
                             mindformers_compat=True)
    expected = np.asarray(mindformers_valid_blocks)
    assert len(mindformers_valid_blocks) == 231
    assert ours.shape == (231, 1025) and ours.dtype == np.uint16
    # " = Homarus gammarus = " is a heading: the first block starts with the article's first sentence
    assert ours[0, :6].tolist() == [28718, 20272, 9106, 3876, 385, 11]  # "Homarus gammarus,"
    np.testing.assert_array_equal(ours[0], expected[0])
    np.testing.assert_array_equal(ours, expected)


def test_default_mode_keeps_the_last_passage(data_dir, tok):
    path = os.path.join(data_dir, "wikitext-2", "wiki.test.tokens")
    compat, full = read_passages(path, mindformers_compat=True), read_passages(path)
    assert full[:-1] == compat and len(full) == len(compat) + 1
    assert full[-1].endswith("including Ronnie Allen, Ed Taylor, Ed Parker, and Eddie <unk>.")
    n_compat = len(wikitext2_token_stream(path, tok, mindformers_compat=True))
    n_full = len(wikitext2_token_stream(path, tok))
    assert n_full - n_compat == len(tok.encode("\n" + full[-1])) > 100


def test_chunked_tokenization_equals_whole_text(data_dir, tok):
    text = "\n".join(read_passages(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens")))
    whole = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert len(split_for_tokenizer(text, 2000)) > 100
    np.testing.assert_array_equal(tokenize_text(text, tok, chunk_chars=2000), whole)


def test_split_never_cuts_next_to_whitespace():
    text = "alpha\n beta\n\ngamma \ndelta\nepsilon"
    pieces = split_for_tokenizer(text, 1)
    assert "".join(pieces) == text
    assert pieces == ["alpha\n beta\n\ngamma \ndelta", "\nepsilon"]
    # a newline at the very end, or right after a space at the start, is no cut; one between letters is
    assert split_for_tokenizer("abcdef\n", 2) == ["abcdef\n"]
    assert split_for_tokenizer("a\n bc\nde", 1) == ["a\n bc", "\nde"]
    # cuts are searched from chunk_chars on, never before it: a text without one there is one piece
    assert split_for_tokenizer("a\nbc d", 5) == ["a\nbc d"]
    assert split_for_tokenizer("ab\nc", 1) == ["ab", "\nc"]  # one letter after the newline is enough


def test_a_tokenizer_object_without_files_is_identified_by_its_whole_serialized_form():
    """Two in-memory tokenizers with the same vocabulary but different merges tokenize differently: their ids (the
    data cache's key) must differ, so the id hashes the serialized tokenizer, not only its vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from gpt2_ascend.data.text import resolve_tokenizer
    vocab = {"a": 0, "b": 1, "ab": 2}
    merged, unmerged = (PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges)))
                        for merges in ([("a", "b")], []))
    assert merged.encode("ab") != unmerged.encode("ab")
    (_, info_merged), (_, info_unmerged) = resolve_tokenizer(merged), resolve_tokenizer(unmerged)
    assert info_merged["id"] != info_unmerged["id"] and info_merged["path"] is None
    assert resolve_tokenizer(merged)[1]["id"] == info_merged["id"]  # and the same object, the same id


def test_a_tokenizer_object_loaded_from_a_folder_is_identified_by_the_folders_files(tok_dir, tok):
    """A tokenizer object that remembers its folder (name_or_path) gets the folder's file checksums as its id, the
    id the folder itself gets: data prepared with either is the same cache entry."""
    from gpt2_ascend.data.text import resolve_tokenizer
    _, by_object = resolve_tokenizer(tok)
    assert by_object == resolve_tokenizer(tok_dir)[1]
    assert by_object["path"] == os.path.abspath(tok_dir)
    assert by_object["files_sha256"]["vocab.json"] == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def test_tokenizing_adds_no_special_tokens_even_where_the_tokenizer_would():
    """A corpus is its text's tokens only: a fast tokenizer whose post-processor appends </s> (GPT-2's adds
    nothing, so it cannot tell) gets none appended."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2, "</s>": 3}, [("a", "b")]))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tok("ab").input_ids == [2, 3]  # what the tokenizer does when asked for its special tokens
    assert tokenize_text("abab", tok).tolist() == [2, 2]


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_writes_npy_and_sidecar(tmp_path, synthetic, tok_dir, capsys):
    out = tmp_path / "out" / "syn.npy"
    rc = wikitext2.main(["--input_file", synthetic, "--output_file", str(out), "--max_length", "4",
                         "--tokenizer_type", tok_dir, "--mindformers_compat"])
    assert rc == 0
    blocks = np.load(out, mmap_mode="r")
    meta = json.loads((tmp_path / "out" / "syn.npy.json").read_text())
    tokens = load_tokenizer(tok_dir).encode("First line, one. Second line\nThird line")
    assert blocks.shape == (len(tokens) // 4, 4)
    assert blocks.ravel().tolist() == tokens[:blocks.size]
    assert meta["options"] == {"mindformers_compat": True} and meta["max_length"] == 4
    assert meta["num_tokens"] == len(tokens) and meta["num_blocks"] == blocks.shape[0]
    assert meta["tokenizer_sha256"]["vocab.json"] == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    assert meta["format_version"] == 1 and len(meta["source_sha256"]) == 64
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_exit_2_with_one_line(tmp_path, synthetic, tok_dir, capsys):
    assert wikitext2.main(["--input_file", str(tmp_path / "missing.tokens"), "--output_file",
                           str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input file not found") and err.count("\n") == 1
    assert wikitext2.main(["--input_file", synthetic, "--output_file", str(tmp_path / "o.npy"),
                           "--max_length", "100000", "--tokenizer_type", tok_dir]) == 2
    assert "fewer than one block of max_length 100000" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_cli_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "gpt2_ascend.data.wikitext2", "--help"], capture_output=True,
                         text=True, check=True)
    assert "examples:" in out.stdout and "--mindformers_compat" in out.stdout and out.stderr == ""


def test_tokenizing_shows_a_progress_bar_from_one_mebichar(monkeypatch):
    """Texts of 2^20 characters and more get a progress bar (WikiText-103 takes minutes); shorter ones tokenize
    silently. A stand-in tokenizer keeps it fast: each piece is one token per character."""
    import gpt2_ascend.progress as progress

    class PerChar:
        def __len__(self):
            return 256

        def encode(self, text, add_special_tokens=True):  # a slow tokenizer that adds an eos when asked to
            return [ord(c) % 256 for c in text] + ([255] if add_special_tokens else [])

    shown = []
    real = progress.progress_bar
    monkeypatch.setattr(progress, "progress_bar", lambda **kw: shown.append(
        (not kw["disable"], kw["leave"], kw["unit"], kw["unit_scale"])) or real(**kw))
    for length in ((1 << 20) - 1, 1 << 20):
        text = ("abc\n" * (length // 4 + 1))[:length]
        tokens = tokenize_text(text, PerChar(), chunk_chars=1 << 18)
        assert len(tokens) == length and tokens.dtype == np.uint16
    # a bar counts characters in k / M and is cleared when done (tokenizing is one step of a preparation)
    assert shown == [(False, False, "char", True), (True, False, "char", True)]
    empty = tokenize_text("", PerChar())
    assert empty.shape == (0,) and empty.dtype == np.uint16


def test_pack_blocks_refuses_a_length_that_is_not_a_positive_integer():
    tokens = np.arange(12)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"^max_length must be a positive integer, got {bad}$"):
            pack_blocks(tokens, bad)
    assert pack_blocks(tokens, 4.0).shape == (3, 4)  # an integral float is a length


def test_a_folders_checksum_covers_every_file_name_and_content(tmp_path):
    """A text folder's source_sha256 (the data cache's key) is the sha256 of each file's name and sha256, in order:
    editing, renaming or adding a file changes it."""
    import hashlib
    from gpt2_ascend.data.text import source_sha256
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    (folder / "b.txt").write_text("beta")
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    expected = sha(b"".join(f"{n}\0{sha(t)}\n".encode() for n, t in (("a.txt", b"alpha"), ("b.txt", b"beta"))))
    assert source_sha256(str(folder)) == expected
    (folder / "b.txt").write_text("beta!")
    assert source_sha256(str(folder)) != expected
