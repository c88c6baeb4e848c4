"""Reshard an HF GPT-2 checkpoint (merge shards, or split one file).

`python convert/merge_hf_shards.py --help` in a checkout, `gpt2-convert merge-hf-shards --help` once installed;
the command is gpt2_ascend/commands/merge_hf_shards.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gpt2_ascend
from gpt2_ascend.commands.merge_hf_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
