"""Fold a LoRA adapter (PEFT files, as LoRA finetuning writes them) into its base model and write a plain
HF GPT-2 directory that transformers and gpt2_ascend load without peft."""
import argparse
import sys


EXAMPLES = """examples:
  python convert/merge_lora.py --base gpt2-small/ --adapter runs/lora/adapter --output_dir gpt2-small-merged
  python convert/merge_lora.py --base gpt2-small/ --adapter runs/lora/adapter --output_dir merged --dtype fp16

  python convert/merge_lora.py --adapter runs/lora/final/adapter --output_dir merged   # base named by the adapter

The base is an HF directory (or hub id) with config.json; the adapter a PEFT directory with adapter_config.json
and adapter_model.safetensors (ours, or one trained with peft on transformers' GPT-2: task type CAUSAL_LM,
SEQ_CLS or none). Tokenizer files of the base are copied next to the merged weights."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model: HF directory or hub id (default: the adapter's base_model_name_or_path)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--output_dir", required=True, help="output HF directory")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="dtype of the written weights")
    args = p.parse_args(argv)

    from gpt2_ascend.convert import merge_lora
    try:
        s = merge_lora(args.base, args.adapter, args.output_dir, dtype=args.dtype)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    tok = f", tokenizer files: {', '.join(s['tokenizer_files'])}" if s["tokenizer_files"] else ""
    print(f"wrote {s['output_dir']}: merged {s['architecture']}, {s['parameters']:,} parameters{tok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
