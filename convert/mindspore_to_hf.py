"""MindSpore/MindFormers GPT-2 .ckpt -> HF GPT-2 directory.

`python convert/mindspore_to_hf.py --help` in a checkout, `gpt2-convert mindspore-to-hf --help` once installed;
the command is gpt2_ascend/commands/mindspore_to_hf.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gpt2_ascend
from gpt2_ascend.commands.mindspore_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
