"""HF GPT-2 checkpoint -> MindSpore/MindFormers GPT-2 .ckpt.

`python convert/hf_to_mindspore.py --help` in a checkout, `gpt2-convert hf-to-mindspore --help` once installed;
the command is gpt2_ascend/commands/hf_to_mindspore.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gpt2_ascend
from gpt2_ascend.commands.hf_to_mindspore import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
