"""Evaluate a GPT-2 checkpoint: perplexity or text-classification accuracy: `python evaluate.py --help`
from a checkout, `gpt2-evaluate` once installed.
The command itself is gpt2_ascend/commands/evaluate.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this checkout's gpt2_ascend, installed or not
from gpt2_ascend.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
