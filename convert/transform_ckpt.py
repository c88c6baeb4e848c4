"""MindFormers' distributed checkpoints (rank slices + strategy) merged into one .ckpt, or cut for another layout.

`python convert/transform_ckpt.py --help` in a checkout, `gpt2-convert transform-ckpt --help` once installed;
the command is gpt2_ascend/commands/transform_ckpt.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gpt2_ascend
from gpt2_ascend.commands.transform_ckpt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
