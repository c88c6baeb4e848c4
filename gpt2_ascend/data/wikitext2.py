"""WikiText-2 -> GPT-2 token blocks, the way MindFormers' wikitext2_data_process.py prepares them.

MindFormers' processing (mindformers/tools/dataset_preprocess/gpt2/wikitext2_data_process.py):
  1. each line is stripped; blank lines are dropped;
  2. a heading line (starts and ends with "=") closes the passage being read and is itself dropped;
  3. every line of a passage goes through `wikitext_clean`; the lines are joined by single spaces;
  4. passages are joined by "\\n" and the whole text is tokenized at once, no EOS token added;
  5. the tokens are cut into blocks of exactly max_length; the remainder is dropped.
MindFormers only appends a passage when the next heading closes it, so the last passage of the file never makes
it into the data. Here it is included by default; mindformers_compat=True leaves it out and reproduces
MindFormers' blocks token for token.

Training uses max_length = seq_length + 1 (inputs and shifted labels come from one block), evaluation seq_length.

    python -m gpt2_ascend.data.wikitext2 --input_file wiki.train.tokens --output_file train.npy \\
        --max_length 1025 --tokenizer_type $GPT2_DATA_DIR/gpt2
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np

from ..cli import ArgumentParser, print_error
from ..fileio import sha256_file
from .store import save_blocks
from .text import pack_blocks, resolve_tokenizer, tokenize_text

__all__ = ["wikitext_clean", "group_passages", "clean_passages", "read_passages", "wikitext2_token_stream",
           "pack_blocks", "prepare_wikitext2", "write_wikitext2", "main"]


def wikitext_clean(string: str) -> str:
    """MindFormers' detokenization rules for one WikiText line, in MindFormers' order (order matters)."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)  # as in MindFormers: matches only a literal "/' 5/"
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" .", ".")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # brackets and quotes: no spaces just inside them
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" \u00b0 ", "\u00b0")
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def _is_heading(line: str) -> bool:
    return line.startswith("=") and line.endswith("=")


def group_passages(lines, mindformers_compat: bool = False) -> list[list[str]]:
    """The raw (stripped, non-blank) lines of each passage, headings removed, from any iterable of lines (a
    file, or the rows of a `datasets` text column: data/hf_datasets.py)."""
    passages, current = [], []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if _is_heading(line):
            if current:
                passages.append(current)
                current = []
        else:
            current.append(line)
    if current and not mindformers_compat:  # MindFormers drops the passage no heading closes
        passages.append(current)
    return passages


def _passage_lines(path: str, mindformers_compat: bool) -> list[list[str]]:
    """The raw (stripped, non-blank) lines of each passage of a file, headings removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return group_passages(f, mindformers_compat)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start} of a "
                         f"read buffer): convert it to UTF-8") from None


def clean_passages(passage_lines: list[list[str]]) -> list[str]:
    """Each passage's lines cleaned and joined by single spaces."""
    return [" ".join(wikitext_clean(line) for line in lines).strip() for lines in passage_lines]


def read_passages(path: str, mindformers_compat: bool = False) -> list[str]:
    """The cleaned passages of a WikiText file: each passage's lines cleaned and joined by single spaces."""
    return clean_passages(_passage_lines(path, mindformers_compat))


def _joined_text(path: str, mindformers_compat: bool) -> str:
    text = "\n".join(read_passages(path, mindformers_compat)).strip()
    if not text:
        raise ValueError(f"{path} contains no WikiText passages (text lines between '= heading =' lines): "
                         f"check that it is a wiki.*.tokens file")
    if mindformers_compat and "\t" in text:
        # MindFormers splits its text at the first tab and pastes the rest into every block: not reproducible
        raise ValueError(f"{path} contains tab characters, which MindFormers' script mangles: "
                         f"prepare it without --mindformers_compat")
    return text


def wikitext2_token_stream(path: str, tokenizer=None, mindformers_compat: bool = False) -> np.ndarray:
    """All tokens of the cleaned WikiText text, 1-D, no EOS added (uint16 for GPT-2's vocab)."""
    tok, _ = resolve_tokenizer(tokenizer)
    return tokenize_text(_joined_text(path, mindformers_compat), tok, desc=os.path.basename(path))


def wikitext2_blocks_and_meta(path: str, max_length: int, tokenizer, tok_info: dict,
                              mindformers_compat: bool = False):
    tokens = tokenize_text(_joined_text(path, mindformers_compat), tokenizer, desc=os.path.basename(path))
    blocks = pack_blocks(tokens, max_length, source=path)
    meta = dict(source=os.path.abspath(path), source_sha256=sha256_file(path), source_kind="wikitext",
                tokenizer=tok_info["path"], tokenizer_sha256=tok_info["files_sha256"], tokenizer_id=tok_info["id"],
                options={"mindformers_compat": bool(mindformers_compat)},
                num_tokens=int(len(tokens)), num_tokens_used=int(blocks.size))
    return blocks, meta


def prepare_wikitext2(input_file: str, max_length: int, tokenizer=None, mindformers_compat: bool = False) -> np.ndarray:
    """(blocks, max_length) token blocks of a WikiText file."""
    tok, info = resolve_tokenizer(tokenizer)
    return wikitext2_blocks_and_meta(input_file, max_length, tok, info, mindformers_compat)[0]


def write_wikitext2(input_file: str, output_file: str, max_length: int, tokenizer=None,
                    mindformers_compat: bool = False) -> np.ndarray:
    """prepare_wikitext2, saved as .npy + JSON sidecar."""
    tok, info = resolve_tokenizer(tokenizer)
    blocks, meta = wikitext2_blocks_and_meta(input_file, max_length, tok, info, mindformers_compat)
    save_blocks(blocks, output_file, meta)
    return blocks


EXAMPLES = """examples:
  # training data for seq_length 1024 (blocks of 1025 = inputs + shifted labels)
  %(prog)s --input_file ../shared/data/wikitext-2/wiki.train.tokens \\
      --output_file data/wikitext2.train.1025.npy --max_length 1025 --tokenizer_type ../shared/data/gpt2
  # evaluation data, exactly the blocks MindFormers' wikitext2_data_process.py makes
  %(prog)s --input_file wiki.valid.tokens --output_file valid.npy \\
      --max_length 1024 --mindformers_compat
  # any UTF-8 .txt file or folder of .txt files works too
  %(prog)s --input_file my_corpus/ --output_file mine.npy --max_length 1025
"""


def main(argv=None) -> int:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes a .npy of "
        "shape (blocks, max_length) plus a JSON sidecar (source and tokenizer sha256, options).",
        epilog=EXAMPLES)
    parser.add_argument("--input_file", required=True,
                        help="wiki.{train,valid,test}.tokens, or a UTF-8 .txt file / folder of .txt files")
    parser.add_argument("--output_file", required=True, help="output .npy (a .json sidecar is written beside it)")
    parser.add_argument("--max_length", type=int, default=1024,
                        help="tokens per block: seq_length + 1 for training, seq_length for evaluation (default 1024)")
    parser.add_argument("--tokenizer_type", default=None,
                        help="tokenizer directory (vocab.json + merges.txt); default: $GPT2_DATA_DIR/gpt2")
    parser.add_argument("--mindformers_compat", action="store_true",
                        help="leave out the file's last passage, as MindFormers does, for identical blocks")
    args = parser.parse_args(argv)
    try:
        if os.path.isdir(args.input_file) or args.input_file.endswith(".txt"):
            from .text import write_text_corpus
            if args.mindformers_compat:
                raise ValueError("--mindformers_compat applies to WikiText *.tokens files, not plain text")
            blocks = write_text_corpus(args.input_file, args.output_file, args.max_length, args.tokenizer_type)
        else:
            blocks = write_wikitext2(args.input_file, args.output_file, args.max_length, args.tokenizer_type,
                                     args.mindformers_compat)
    except (OSError, ValueError) as e:
        print_error(e)
        return 2
    print(f"wrote {args.output_file}: {blocks.shape[0]} blocks x {blocks.shape[1]} tokens ({blocks.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
