"""Train or finetune GPT-2 from a recipe: `python train.py --help` from a checkout, `gpt2-train` once installed.
The command itself is gpt2_ascend/commands/train.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this checkout's gpt2_ascend, installed or not
from gpt2_ascend.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
