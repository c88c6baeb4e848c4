"""Fold a LoRA adapter into its base model and write a plain HF GPT-2 directory that transformers and
gpt2_ascend load without peft. The adapter is a PEFT directory (as LoRA finetuning writes it), or MindFormers'
unmerged LoRA .ckpt (its lora_a / lora_b tensors beside the base weights)."""
import sys
from ..cli import ArgumentParser


EXAMPLES = """examples:
  %(prog)s --base gpt2-small/ --adapter runs/lora/adapter --output_dir gpt2-small-merged
  %(prog)s --base gpt2-small/ --adapter runs/lora/adapter --output_dir merged --dtype fp16
  %(prog)s --adapter runs/lora/final/adapter --output_dir merged   # base named by the adapter
  # MindFormers' LoRA checkpoint (finetune_gpt2_small_lora_fp16.yaml: rank 64, alpha 128, dense1 + dense3)
  %(prog)s --base gpt2_lora.ckpt --lora_alpha 128 --output_dir gpt2-lora-merged

The base is an HF directory (or hub id) with config.json; the adapter a PEFT directory with adapter_config.json
and adapter_model.safetensors (ours, or one trained with peft on transformers' GPT-2: task type CAUSAL_LM,
SEQ_CLS or none). Tokenizer files of the base are copied next to the merged weights. A MindFormers .ckpt holds
base and adapters together: pass it as --base alone, with the recipe's --lora_alpha (not stored in the
checkpoint); heads and activation come from the preset of its width, or --n_head / --activation."""


def main(argv=None):
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--base", help="base model: HF directory or hub id (default: the adapter's "
                                  "base_model_name_or_path), or a MindFormers LoRA .ckpt")
    p.add_argument("--adapter", help="PEFT adapter directory (not with a .ckpt base: it holds its adapters)")
    p.add_argument("--lora_alpha", type=float, help=".ckpt: the LoRA alpha it was trained with (MindFormers' GPT-2: 128)")
    p.add_argument("--n_head", type=int, help=".ckpt: attention heads (default: the preset of its width)")
    p.add_argument("--activation", choices=["gelu_new", "fast_gelu", "gelu"], help=".ckpt: default by preset")
    p.add_argument("--output_dir", required=True, help="output HF directory")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="dtype of the written weights")
    args = p.parse_args(argv)

    from gpt2_ascend.convert import merge_lora, merge_mindformers_lora
    from gpt2_ascend.cli import print_error
    try:
        if args.base and args.base.endswith(".ckpt"):
            if args.adapter or args.lora_alpha is None:
                raise ValueError("a MindFormers .ckpt holds its adapters: pass --base FILE.ckpt --lora_alpha A (the "
                                 "recipe's pet_config.lora_alpha, 128 in MindFormers' GPT-2 LoRA recipes), no --adapter")
            s = merge_mindformers_lora(args.base, args.output_dir, args.lora_alpha, args.n_head, args.activation,
                                       dtype=args.dtype)
        elif not args.adapter:
            raise ValueError("pass --adapter DIR (a PEFT adapter directory), or a MindFormers LoRA .ckpt as --base")
        else:
            s = merge_lora(args.base, args.adapter, args.output_dir, dtype=args.dtype)
    except (ValueError, OSError, KeyError) as e:
        print_error(e)
        return 2
    tok = f", tokenizer files: {', '.join(s['tokenizer_files'])}" if s["tokenizer_files"] else ""
    print(f"wrote {s['output_dir']}: merged {s['architecture']}, {s['parameters']:,} parameters{tok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
