"""Generate text with a GPT-2 checkpoint: `python generate.py --help` from a checkout, `gpt2-generate` once installed.
The command itself is gpt2_ascend/commands/generate.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this checkout's gpt2_ascend, installed or not
from gpt2_ascend.commands.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
