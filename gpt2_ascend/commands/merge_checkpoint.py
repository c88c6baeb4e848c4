"""Sharded (distributed) training checkpoint -> one HF-format directory. MindFormers' transform_ckpt.py
equivalent: needs neither the original world size nor a process group."""
import sys
from ..cli import ArgumentParser


EXAMPLES = """examples:
  # consolidate step 500 of a torchrun run (any data / tensor / pipeline layout) into an HF directory
  %(prog)s --src_ckpt_dir output/pretrain_gpt2_13b/checkpoint/step_0000500 \\
      --dst_dir gpt2-13b-step500
  # the same in bf16, with the GPT-2 tokenizer files next to it
  %(prog)s --src_ckpt_dir RUN/checkpoint/step_0001000 --dst_dir OUT --dtype bf16 \\
      --tokenizer $GPT2_DATA_DIR/gpt2

The result (config.json + model.safetensors) loads with GPT2LMHeadModel.from_pretrained here and in
transformers. Checkpoints of single-process runs (model.pt) are merged too."""


def main(argv=None):
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--src_ckpt_dir", required=True, help="RUN/checkpoint/step_N (sharded or single-process)")
    p.add_argument("--dst_dir", required=True, help="output HF-format directory")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast the weights (default: as saved)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy next to the weights")
    p.add_argument("--max_shard_size", default=None, help="split model.safetensors, e.g. 5GB")
    args = p.parse_args(argv)

    from gpt2_ascend.checkpoints import CheckpointError
    from gpt2_ascend.cli import print_error
    from gpt2_ascend.convert import merge_checkpoint
    from gpt2_ascend.data.tokenizer import copy_tokenizer
    try:
        config, architecture = merge_checkpoint(args.src_ckpt_dir, args.dst_dir, dtype=args.dtype,
                                                max_shard_size=args.max_shard_size)
        if args.tokenizer:
            copy_tokenizer(args.tokenizer, args.dst_dir, config.n_positions)
    except (ValueError, OSError, CheckpointError) as e:
        print_error(e)
        return 2
    print(f"wrote {args.dst_dir}: {architecture}, {config.n_layer} layers, hidden {config.n_embd}, "
          f"vocab {config.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
