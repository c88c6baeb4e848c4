"""Text-classification files -> fixed-length token rows, as MindFormers' txtcls_dataset_to_mindrecord.py
prepares them, for its four datasets (--dataset_name), each read line by line as that script reads it:

    sst_2    GLUE SST-2 .tsv   `sentence<TAB>label`, a header row
    cola     GLUE CoLA .tsv    `source<TAB>label<TAB>mark<TAB>sentence`, no header
    imdb     IMDB .csv         `review,sentiment` (Kaggle's IMDB Dataset.csv): the review is the line without
                               its last 9 characters (",positive" / ",negative"), outer quotes stripped (CSV's
                               doubled quotes inside stay doubled, as in MindFormers); positive = 1, negative = 0
    ag_news  AG News .csv      `"label","title","description"`: the sentence is `title + ". " + description`, outer
                               quotes stripped, labels 1-4 become 0-3

A first row that does not parse as data (SST-2's and IMDB's headers) is skipped. MindFormers' script skips the
first line of every file whatever it holds (its --header flag is an argparse `type=bool`, true for any value),
which drops the first example of CoLA and AG News; mindformers_compat=True does the same.

The GLUE SST-2 files have a space before the tab
("it 's a charming and often affecting journey . <TAB>1"); MindFormers keeps that space, so the sentence's last
token is " " (id 220); kept here too, so that the token ids match MindFormers'. The sentence is tokenized
without special tokens, cut to max_length (MindFormers does not cut; the sidecar counts the rows cut), and
right-padded with the eos id 50256; attention_mask is 1 on tokens, 0 on padding. The classifier pools the last
non-pad token.

    python -m gpt2_ascend.data.txtcls --dataset_name sst_2 --input_file train.tsv --output_file sst2.train.npz
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ..cli import ArgumentParser, print_error
from ..fileio import sha256_file
from .store import save_arrays
from .text import encode_many, resolve_tokenizer

DATASETS = ("sst_2", "cola", "imdb", "ag_news")
LAYOUTS = {"sst_2": "sentence<TAB>label", "cola": "source<TAB>label<TAB>mark<TAB>sentence",
           "imdb": "review,positive|negative", "ag_news": '"label","title","description"'}
NUM_LABELS = {"sst_2": 2, "cola": 2, "imdb": 2, "ag_news": 4}  # each dataset's label set: 0 .. n-1 after parsing
FILE_LABELS = {"sst_2": "0 or 1", "cola": "0 or 1", "imdb": "positive or negative", "ag_news": "1 to 4"}


def parse_line(dataset_name: str, line: str) -> tuple[str, int]:
    """(sentence, label) of one line in the dataset's layout; ValueError saying why when it is not a data row."""
    text = line.strip()
    if dataset_name == "imdb":
        if len(text) < 10 or text[-9] != "," or text[-8:] not in ("positive", "negative"):
            raise ValueError(f"expected `{LAYOUTS['imdb']}`, got {text[-20:]!r} at its end")
        return text[:-9].strip('"'), int(text[-8:] == "positive")
    if dataset_name == "ag_news":
        fields = text.split('","')
        if len(fields) < 3:
            raise ValueError(f"expected `{LAYOUTS['ag_news']}`, got {len(fields)} quoted field(s)")
        label, title, description = fields[0].strip('"'), fields[1], '","'.join(fields[2:])
        if not label.isdigit():
            raise ValueError(f"label {label!r} is not an integer")
        return (title + ". " + description).strip('"'), int(label) - 1
    fields = text.split("\t")
    if len(fields) != (4 if dataset_name == "cola" else 2):
        raise ValueError(f"expected `{LAYOUTS[dataset_name]}`, got {len(fields)} tab-separated fields: "
                         f"check dataset_name")
    sentence, label = (fields[3], fields[1]) if dataset_name == "cola" else (fields[0], fields[1])
    try:
        return sentence, int(label)
    except ValueError:
        raise ValueError(f"label {label!r} is not an integer") from None


def read_txtcls(path: str, dataset_name: str = "sst_2", skip_first_line: bool = False) -> tuple[list[str], np.ndarray]:
    """Sentences and int64 labels of a text-classification file in one of DATASETS' layouts. A first line that is
    not a data row is the header; skip_first_line drops the first line whatever it is (MindFormers' script)."""
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset_name {dataset_name!r}: use one of {', '.join(DATASETS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    sentences, labels = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip() or (skip_first_line and number == 1):
                    continue
                try:
                    sentence, label = parse_line(dataset_name, line)
                except ValueError as e:
                    if number == 1:  # a header row
                        continue
                    raise ValueError(f"{path} line {number}: {e}") from None
                if not 0 <= label < NUM_LABELS[dataset_name]:  # here, not at the first training step that meets it
                    shown = label + 1 if dataset_name == "ag_news" else label  # as the file writes it
                    raise ValueError(f"{path} line {number}: label {shown} is not a {dataset_name} label (expected "
                                     f"{FILE_LABELS[dataset_name]})")
                sentences.append(sentence)
                labels.append(label)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}): convert it to UTF-8") from None
    if not sentences:
        raise ValueError(f"{path} has no rows: expected `{LAYOUTS[dataset_name]}` rows ({dataset_name})")
    return sentences, np.asarray(labels, dtype=np.int64)


def read_sst2(path: str) -> tuple[list[str], np.ndarray]:
    """Sentences (with GLUE's trailing space kept) and int64 labels of a GLUE SST-2 train.tsv / dev.tsv."""
    return read_txtcls(path, "sst_2")


def pad_token_id(tokenizer) -> int:
    """GPT-2 pads with its eos token, 50256."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_rows(sentences: list[str], max_length: int, tokenizer) -> tuple[np.ndarray, np.ndarray, int]:
    """Right-padded input_ids and attention_mask (int32, shape (rows, max_length)) and the count of rows cut."""
    if max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length}")
    ids = encode_many(sentences, tokenizer)
    pad_id = pad_token_id(tokenizer)
    input_ids = np.full((len(ids), max_length), pad_id, dtype=np.int32)
    mask = np.zeros((len(ids), max_length), dtype=np.int32)
    truncated = 0
    for row, tokens in enumerate(ids):
        if not tokens:
            raise ValueError(f"row {row + 1} has an empty sentence: remove it from the input file")
        truncated += len(tokens) > max_length
        tokens = tokens[:max_length]
        input_ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return input_ids, mask, truncated


def txtcls_arrays_and_meta(path: str, max_length: int, tokenizer, tok_info: dict, dataset_name: str = "sst_2",
                           mindformers_compat: bool = False):
    sentences, labels = read_txtcls(path, dataset_name, skip_first_line=mindformers_compat)
    input_ids, mask, truncated = encode_rows(sentences, max_length, tokenizer)
    arrays = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    meta = dict(source=os.path.abspath(path), source_sha256=sha256_file(path), source_kind=dataset_name,
                tokenizer=tok_info["path"], tokenizer_sha256=tok_info["files_sha256"], tokenizer_id=tok_info["id"],
                options={"dataset_name": dataset_name, "padding": "right", "mindformers_compat": mindformers_compat,
                         "pad_token_id": int(pad_token_id(tokenizer))},
                num_truncated=int(truncated), max_tokens=int(mask.sum(1).max()),
                label_counts={str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))})
    return arrays, meta


def prepare_txtcls(input_file: str, max_length: int = 128, tokenizer=None, dataset_name: str = "sst_2",
                   mindformers_compat: bool = False) -> dict:
    """dict(input_ids, attention_mask, labels) of a text-classification file: right padding with the eos id, rows
    cut to max_length."""
    tok, info = resolve_tokenizer(tokenizer)
    return txtcls_arrays_and_meta(input_file, max_length, tok, info, dataset_name, mindformers_compat)[0]


def write_txtcls(input_file: str, output_file: str, max_length: int = 128, tokenizer=None,
                 dataset_name: str = "sst_2", mindformers_compat: bool = False) -> tuple[dict, dict]:
    """prepare_txtcls, saved as .npz + JSON sidecar; returns (arrays, sidecar)."""
    tok, info = resolve_tokenizer(tokenizer)
    arrays, meta = txtcls_arrays_and_meta(input_file, max_length, tok, info, dataset_name, mindformers_compat)
    save_arrays(arrays, output_file, meta)
    return arrays, meta


EXAMPLES = """examples:
  %(prog)s --dataset_name sst_2 --input_file ../shared/data/sst2/train.tsv \\
      --output_file data/sst2.train.npz --max_length 128
  %(prog)s --dataset_name sst_2 --input_file ../shared/data/sst2/dev.tsv \\
      --output_file data/sst2.dev.npz
"""


def main(argv=None) -> int:
    parser = ArgumentParser(
        description="Prepare a text-classification file (SST-2 / CoLA .tsv, IMDB / AG News .csv) as a .npz of input_ids, "
                    "attention_mask (right padding with the eos id) and labels, plus a JSON sidecar.",
        epilog=EXAMPLES)
    parser.add_argument("--dataset_name", default="sst_2", choices=DATASETS, help="row layout (default sst_2)")
    parser.add_argument("--input_file", required=True, help="GLUE train.tsv / dev.tsv, IMDB Dataset.csv, AG News train.csv")
    parser.add_argument("--output_file", required=True, help="output .npz (a .json sidecar is written beside it)")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per row, longer rows are cut (default 128)")
    parser.add_argument("--tokenizer_type", default=None,
                        help="tokenizer directory (vocab.json + merges.txt); default: $GPT2_DATA_DIR/gpt2")
    parser.add_argument("--mindformers_compat", action="store_true",
                        help="skip the first line whatever it holds, as MindFormers' script does")
    args = parser.parse_args(argv)
    try:
        arrays, meta = write_txtcls(args.input_file, args.output_file, args.max_length, args.tokenizer_type,
                                    args.dataset_name, args.mindformers_compat)
    except (OSError, ValueError) as e:
        print_error(e)
        return 2
    print(f"wrote {args.output_file}: {len(arrays['labels'])} rows x {args.max_length} tokens, "
          f"labels {meta['label_counts']}, {meta['num_truncated']} rows cut to max_length")
    return 0


if __name__ == "__main__":
    sys.exit(main())
