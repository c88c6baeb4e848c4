"""Fold a PEFT LoRA adapter into its base model and write a plain HF GPT-2 directory.

`python convert/merge_lora.py --help` in a checkout, `gpt2-convert merge-lora --help` once installed;
the command is gpt2_ascend/commands/merge_lora.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gpt2_ascend
from gpt2_ascend.commands.merge_lora import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
