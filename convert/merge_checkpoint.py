"""A training checkpoint (sharded or not) -> one HF GPT-2 directory.

`python convert/merge_checkpoint.py --help` in a checkout, `gpt2-convert merge-checkpoint --help` once installed;
the command is gpt2_ascend/commands/merge_checkpoint.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gpt2_ascend
from gpt2_ascend.commands.merge_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
