"""`datasets` as a data source (data/hf_datasets.py, read through data/sources.py): the raw files' exact blocks and arrays from save_to_disk folders,
parquet / JSON lines / JSON / CSV / Arrow files, Dataset objects and hub ids (a locally built datasets cache read
with HF_DATASETS_OFFLINE=1, no network), the cache, and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")  # an install requirement; a broken install says so here
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from gpt2_ascend.data import hf_datasets  # noqa: E402
from gpt2_ascend.data.sources import load_token_blocks, load_txtcls  # noqa: E402
from gpt2_ascend.data.store import load_blocks, read_sidecar  # noqa: E402
from gpt2_ascend.data.txtcls import prepare_txtcls  # noqa: E402
from gpt2_ascend.data.wikitext2 import wikitext2_token_stream  # noqa: E402
from conftest import HANG_GUARD_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 129  # tokens per block: any width packs the same stream


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' own cache (where data files without a cache_dir are converted) in the test's folder, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def tok_dir(data_dir):
    return os.path.join(data_dir, "gpt2")


@pytest.fixture(scope="module")
def valid_tokens(data_dir):
    return os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens")


@pytest.fixture(scope="module")
def valid_lines(valid_tokens):
    with open(valid_tokens, encoding="utf-8") as f:
        return f.readlines()


@pytest.fixture(scope="module")
def raw_blocks(valid_tokens, tok_dir):
    return np.asarray(load_token_blocks(valid_tokens, WIDTH, tok_dir))


def build_hub_cache(cache: str, name: str, config: str, splits: dict):
    """A datasets cache holding NAME/CONFIG as load_dataset leaves it after a download (CONFIG/0.0.0/HASH/ with
    dataset_info.json and NAME-SPLIT.arrow files), made by the json builder from local files."""
    from datasets.packaged_modules.json.json import Json
    files, sources = {}, cache + ".sources"
    os.makedirs(sources, exist_ok=True)
    for split, rows in splits.items():
        files[split] = os.path.join(sources, f"{name}-{config}-{split}.jsonl")
        with open(files[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    builder = Json(cache_dir=cache, dataset_name=name, config_name=config, hash="0123456789abcdef",
                   data_files=files)
    builder.download_and_prepare()
    built = os.path.dirname(os.path.dirname(builder.cache_dir))  # NAME/CONFIG-<data files hash>
    os.rename(built, os.path.join(os.path.dirname(built), config))  # a hub config's folder is named by the config


# ------------------------------------------------------------------------------------------------ WikiText-2 lines

def test_wikitext2_valid_as_parquet_and_save_to_disk_gives_the_raw_files_bytes(tmp_path, valid_tokens, valid_lines,
                                                                               raw_blocks, tok_dir, monkeypatch):
    parquet = tmp_path / "wiki.valid.parquet"
    pq.write_table(pa.table({"text": valid_lines}), parquet)  # the file's lines, one row each, "\n" kept
    folder = tmp_path / "wikitext2"
    stripped = [line.rstrip("\n") for line in valid_lines]  # as the hub's rows hold them
    datasets.DatasetDict(validation=datasets.Dataset.from_dict({"text": stripped})).save_to_disk(str(folder))
    cache = str(tmp_path / "cache")

    from_parquet = load_token_blocks(str(parquet), WIDTH, tok_dir, cache_dir=cache, num_proc=2)
    from_folder = load_token_blocks(str(folder), WIDTH, tok_dir, cache_dir=cache, split="validation")
    assert raw_blocks.shape == (1837, WIDTH)
    assert np.asarray(from_parquet).tobytes() == raw_blocks.tobytes()
    assert np.asarray(from_folder).tobytes() == raw_blocks.tobytes()
    assert from_folder.dtype == raw_blocks.dtype == np.uint16
    # MindFormers' reading (the passage no heading closes left out) maps over too
    lines = valid_lines[-60:] + [" \n", " A last passage , unclosed . \n"]
    (tmp_path / "tail.tokens").write_text("".join(lines), encoding="utf-8")
    rows = datasets.Dataset.from_dict({"text": lines})
    for compat in (True, False):
        want = wikitext2_token_stream(str(tmp_path / "tail.tokens"), tok_dir, mindformers_compat=compat)
        got = hf_datasets.token_stream(rows, tok_dir, mindformers_compat=compat, text_format="wikitext")
        assert np.array_equal(got, want)
    assert len(hf_datasets.token_stream(rows, tok_dir, text_format="wikitext", mindformers_compat=True)) < len(want)

    # the cache: the store's .npy + sidecar, served again without tokenizing, and rebuilt when the file changes
    npy = [f for f in os.listdir(cache) if f.startswith("wiki.valid.parquet.L129.") and f.endswith(".npy")]
    assert len(npy) == 1 and read_sidecar(os.path.join(cache, npy[0]))["source_kind"] == "datasets"
    assert np.array_equal(load_blocks(os.path.join(cache, npy[0])), raw_blocks)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(hf_datasets, "tokenize_passages", no_tokenizing)
    assert np.array_equal(load_token_blocks(str(parquet), WIDTH, tok_dir, cache_dir=cache), raw_blocks)
    monkeypatch.undo()
    pq.write_table(pa.table({"text": valid_lines[:2000]}), parquet)
    shorter = load_token_blocks(str(parquet), WIDTH, tok_dir, cache_dir=cache)
    assert 0 < len(shorter) < len(raw_blocks) and np.array_equal(shorter, raw_blocks[:len(shorter)])


def test_text_protocol_reads_rows_as_the_files_of_a_text_folder(tmp_path, tok_dir):
    docs = ["  First document, with spaces around.\n", "", "Second: it's \u200bodd\u200b", "Third\tone\ufeff.",
            "caf\u00e9 \u4e2d\u6587 \U0001F600 end.\n\nTwo paragraphs.", "'s apostrophe start", "Last\u2060"]
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, doc in enumerate(docs):  # a .txt folder: each file one document, read back stripped
        (txt / f"{i}.txt").write_text(doc, encoding="utf-8")
    want = np.asarray(load_token_blocks(str(txt), 4, tok_dir))
    table = pa.table({"text": docs, "id": list(range(len(docs)))})
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 3), tmp_path / "parts" / "a.parquet")
    pq.write_table(table.slice(3), tmp_path / "parts" / "b.parquet")
    pq.write_table(table, tmp_path / "docs.parquet")
    dataset = datasets.Dataset(table)
    dataset.to_json(str(tmp_path / "docs.jsonl"))
    (tmp_path / "docs.json").write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    dataset.to_csv(str(tmp_path / "docs.csv"), index=False)
    with pa.OSFile(str(tmp_path / "docs.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    dataset.save_to_disk(str(tmp_path / "saved"))
    sources = ["parts", "docs.parquet", "docs.jsonl", "docs.json", "docs.csv", "docs.arrow", "saved"]
    for name in sources:
        got = load_token_blocks(str(tmp_path / name), 4, tok_dir, cache_dir=str(tmp_path / "cache"))
        assert np.array_equal(got, want), name
    assert np.array_equal(load_token_blocks(dataset, 4, tok_dir), want)  # the Python API's own object
    # the same rows read as WikiText lines would be another text: the protocol is a real choice
    assert not np.array_equal(load_token_blocks(dataset, 4, tok_dir, text_format="wikitext")[:3], want[:3])


def test_join_pieces_puts_the_separator_between_pieces():
    values, lengths = np.array([1, 2, 3, 4, 5, 6]), np.array([2, 1, 3])
    assert hf_datasets.join_pieces(values, lengths, [9], np.int32).tolist() == [1, 2, 9, 3, 9, 4, 5, 6]
    assert hf_datasets.join_pieces(values, lengths, [7, 8], np.int32).tolist() == [1, 2, 7, 8, 3, 7, 8, 4, 5, 6]
    assert hf_datasets.join_pieces(values[:2], lengths[:1], [9], np.int32).tolist() == [1, 2]


def test_auto_text_format_recognises_wikitext_lines():
    assert hf_datasets.resolve_text_format(["", " = Homarus gammarus = \n", " text \n"]) == "wikitext"
    assert hf_datasets.resolve_text_format(["", "= = Section = =", "x"]) == "wikitext"
    assert hf_datasets.resolve_text_format(["A document.", " = Not first = "]) == "text"
    assert hf_datasets.resolve_text_format(["=x="]) == "text"
    assert hf_datasets.resolve_text_format([" = H = "], "text") == "text"


# ------------------------------------------------------------------------------------------------ SST-2

def test_sst2_dev_as_a_datasets_folder_gives_the_tsv_arrays(tmp_path, data_dir, tok_dir):
    tsv = os.path.join(data_dir, "sst2", "dev.tsv")
    with open(tsv, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]  # GLUE's layout: sentence<TAB>label, a header
    features = datasets.Features(sentence=datasets.Value("string"),
                                 label=datasets.ClassLabel(names=["negative", "positive"]), idx=datasets.Value("int32"))
    glue = datasets.Dataset.from_dict(dict(sentence=[r[0] for r in rows], label=[int(r[1]) for r in rows],
                                           idx=list(range(len(rows)))), features=features)
    datasets.DatasetDict(validation=glue).save_to_disk(str(tmp_path / "sst2"))
    want = prepare_txtcls(tsv, 64, tok_dir)
    cache = str(tmp_path / "cache")
    for _ in range(2):  # prepared, then from the cache
        got = load_txtcls(str(tmp_path / "sst2"), 64, tok_dir, cache_dir=cache, split="validation")
        for key in ("input_ids", "attention_mask", "labels"):
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    assert len(os.listdir(cache)) == 2  # one .npz + sidecar

    renamed = glue.rename_columns({"sentence": "review", "label": "stars"})
    got = load_txtcls(renamed, 64, tok_dir, text_column="review", label_column="stars")
    assert np.array_equal(got["input_ids"], want["input_ids"]) and np.array_equal(got["labels"], want["labels"])


# ------------------------------------------------------------------------------------------------ hub ids

HUB_SCRIPT = r"""
import json, sys
import numpy as np
from gpt2_ascend.data.sources import load_token_blocks, load_txtcls
tok = sys.argv[1]
blocks = load_token_blocks("wikitext:wikitext-2-v1:validation", 129, tok)
cls = load_txtcls("glue:sst2", 64, tok, split="validation")
np.save(sys.argv[2], np.asarray(blocks))
np.savez(sys.argv[3], **cls)
for spec in ("wikitext:wikitext-103-v1:validation", "wikitext:wikitext-2-v1:train", "glue:sst2:test"):
    try:
        load_token_blocks(spec, 129, tok) if spec.startswith("wiki") else load_txtcls(spec, 64, tok)
    except ValueError as e:
        print(json.dumps(str(e)))
"""


def test_hub_ids_load_offline_from_a_local_datasets_cache(tmp_path, valid_lines, raw_blocks, data_dir, tok_dir):
    cache = str(tmp_path / "hf_cache")
    build_hub_cache(cache, "wikitext", "wikitext-2-v1", {"validation": [{"text": t} for t in valid_lines]})
    with open(os.path.join(data_dir, "sst2", "dev.tsv"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    build_hub_cache(cache, "glue", "sst2", {
        "validation": [dict(sentence=s, label=int(y), idx=i) for i, (s, y) in enumerate(rows)],
        "test": [dict(sentence=s, label=-1, idx=i) for i, (s, _) in enumerate(rows[:5])]})
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=cache,
               PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, tok_dir, str(tmp_path / "wiki.npy"),
                          str(tmp_path / "sst2.npz")], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.load(tmp_path / "wiki.npy").tobytes() == raw_blocks.tobytes()
    want = prepare_txtcls(os.path.join(data_dir, "sst2", "dev.tsv"), 64, tok_dir)
    with np.load(tmp_path / "sst2.npz") as got:
        assert all(np.array_equal(got[k], want[k]) for k in ("input_ids", "attention_mask", "labels"))
    missing_config, missing_split, unlabelled = map(json.loads, out.stdout.splitlines())
    assert missing_config.startswith("could not load wikitext:wikitext-103-v1:validation with datasets.load_dataset")
    assert "HF_DATASETS_OFFLINE=1 reads only the datasets cache" in missing_config and "\n" not in missing_config
    assert "Unknown split \"train\"" in missing_split
    assert "5 rows of glue:sst2:test have label -1" in unlabelled


# ------------------------------------------------------------------------------------------------ sources and errors

@pytest.mark.parametrize("spec, kind", [
    ("wikitext:wikitext-2-raw-v1:train", ("hub", "wikitext", "wikitext-2-raw-v1", "train")),
    ("glue:sst2", ("hub", "glue", "sst2", None)),
    ("Salesforce/wikitext::test", ("hub", "Salesforce/wikitext", None, "test")),
    ("imdb", ("hub", "imdb", None, None)),
])
def test_hub_id_syntax(spec, kind):
    source = hf_datasets.parse_source(spec)
    assert (source.kind, source.where, source.config, source.split) == kind


def test_what_is_a_datasets_source(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    for path in ("a.txt", "a.npy", "a.tokens", "x.tsv", "/abs/missing", "./rel/missing", "missing.npy"):
        assert not hf_datasets.is_datasets_source(path), path
    assert not hf_datasets.is_datasets_source(str(tmp_path / "text"))
    assert hf_datasets.is_datasets_source(str(tmp_path / "a.parquet"))
    assert hf_datasets.is_datasets_source("wikitext:wikitext-2-raw-v1")
    assert hf_datasets.is_datasets_source(str(tmp_path / "a.csv")) is False  # missing, and a file name
    (tmp_path / "a.csv").write_text("sentence,label\nx,1\n")
    assert hf_datasets.is_datasets_source(str(tmp_path / "a.csv"))
    assert not hf_datasets.is_datasets_source(str(tmp_path / "a.csv"), raw_csv=True)  # IMDB / AG News layouts


def test_bad_datasets_inputs_are_one_line_errors(tmp_path, tok_dir):
    data = datasets.Dataset.from_dict({"content": ["a b c d e f g h"] * 4, "label": ["pos"] * 4, "blank": [" \n"] * 4})
    data.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(train=data).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "mixed").mkdir()
    data.to_parquet(str(tmp_path / "mixed" / "a.parquet"))
    data.to_json(str(tmp_path / "mixed" / "b.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"x")
    cases = [
        (lambda: load_token_blocks(str(tmp_path / "one"), 4, tok_dir),
         "has no column 'text' (its columns: content, label, blank): pass --text_column NAME"),
        (lambda: load_token_blocks(str(tmp_path / "dict"), 4, tok_dir, text_column="content", split="validation"),
         "has no split 'validation' (its splits: train): name one, e.g. " + str(tmp_path / "dict") + ":train"),
        (lambda: load_token_blocks(str(tmp_path / "mixed"), 4, tok_dir), "mixes data formats (json, parquet)"),
        (lambda: load_token_blocks(str(tmp_path / "bad.parquet"), 4, tok_dir), "could not read"),
        (lambda: load_token_blocks(str(tmp_path / "one"), 4, tok_dir, text_column="blank"),
         "holds no text in column 'blank'"),
        (lambda: load_txtcls(str(tmp_path / "one"), 8, tok_dir, text_column="content"),
         "column 'label' of " + str(tmp_path / "one") + " holds string, not integer labels"),
        (lambda: load_token_blocks(str(tmp_path / "mixed" / "a.parquet") + ":train", 4, tok_dir),
         "a split (:train) belongs to a hub id or a save_to_disk DatasetDict folder"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    got = load_token_blocks(str(tmp_path / "dict") + ":train", 4, tok_dir, text_column="content")
    assert got.shape == (8, 4)  # 4 rows of 8 tokens and 3 "\\n" between them: 35 tokens
