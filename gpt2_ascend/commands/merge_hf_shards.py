"""Reshard an HF checkpoint (e.g. the 13B's two pytorch_model-0000N-of-00002.bin + index) into one
model.safetensors or shards of a chosen size, one tensor in memory at a time."""
import sys
from ..cli import ArgumentParser


EXAMPLES = """examples:
  %(prog)s --input_dir cerebras-13b/ --output_dir gpt_13b --max_shard_size 60GB
  %(prog)s --input_dir sharded/ --output_dir merged          # one model.safetensors
  %(prog)s --input_dir gpt2-xl/ --output_dir gpt2-xl-fp16 --dtype fp16

Tensor names are kept; a tied lm_head.weight is dropped (transformers re-ties it). config.json, tokenizer
and other non-weight files are copied. Peak memory is about the largest tensor (a .bin input shard is
memory-mapped while it is read), not the model."""


def main(argv=None):
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--input_dir", required=True, help="HF checkpoint directory (sharded .bin or safetensors)")
    p.add_argument("--output_dir", required=True, help="output directory")
    p.add_argument("--max_shard_size", default=None, help="largest output shard, e.g. 60GB (default: one file)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast floating-point weights")
    args = p.parse_args(argv)

    from gpt2_ascend.progress import progress_bar
    from gpt2_ascend.convert import merge_hf_shards
    from gpt2_ascend.cli import print_error
    try:
        s = merge_hf_shards(args.input_dir, args.output_dir, max_shard_size=args.max_shard_size, dtype=args.dtype,
                            progress=lambda xs: progress_bar(xs, desc="resharding", unit="tensor", disable=None))
    except (ValueError, OSError, KeyError) as e:
        print_error(e)
        return 2
    tied = " (tied lm_head.weight dropped)" if s["dropped_tied_head"] else ""
    print(f"wrote {args.output_dir}: {s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB in {len(s['files'])} file(s){tied}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
