"""gpt2-prepare: data preparation as subcommands (also `python -m gpt2_ascend.data.wikitext2 / .txtcls`)."""
import sys

from ..cli import run_subcommand

SUBCOMMANDS = {
    "wikitext2": ("gpt2_ascend.data.wikitext2", "WikiText-2 *.tokens or plain .txt -> token blocks (.npy)"),
    "txtcls": ("gpt2_ascend.data.txtcls", "GLUE .tsv (SST-2) -> input_ids / attention_mask / labels (.npz)"),
}


def main(argv=None) -> int:
    return run_subcommand("gpt2-prepare", SUBCOMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
