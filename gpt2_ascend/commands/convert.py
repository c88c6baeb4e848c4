"""gpt2-convert: the weight converters as subcommands (each one is also convert/NAME.py in a checkout)."""
import sys

from ..cli import run_subcommand

SUBCOMMANDS = {
    "hf-to-mindspore": ("gpt2_ascend.commands.hf_to_mindspore", "HF GPT-2 checkpoint -> MindFormers .ckpt"),
    "mindspore-to-hf": ("gpt2_ascend.commands.mindspore_to_hf", "MindFormers .ckpt -> HF GPT-2 directory"),
    "merge-hf-shards": ("gpt2_ascend.commands.merge_hf_shards", "reshard an HF checkpoint"),
    "merge-lora": ("gpt2_ascend.commands.merge_lora", "fold a PEFT LoRA adapter into its base model"),
    "merge-checkpoint": ("gpt2_ascend.commands.merge_checkpoint", "training checkpoint -> HF directory"),
    "transform-ckpt": ("gpt2_ascend.commands.transform_ckpt",
                       "MindFormers distributed checkpoint -> one .ckpt, or cut for another layout"),
}


def main(argv=None) -> int:
    return run_subcommand("gpt2-convert", SUBCOMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
