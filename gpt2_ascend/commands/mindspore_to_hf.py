"""MindSpore/MindFormers GPT-2 .ckpt, or a distributed checkpoint (every rank's slices + the run's strategy), -> HF
GPT-2 directory (config.json + model.safetensors)."""
import sys

from ..cli import ArgumentParser


EXAMPLES = """examples:
  %(prog)s --mindspore_path gpt2_small.ckpt --output_dir gpt2-hf
  %(prog)s --mindspore_path gpt2_13b.ckpt --output_dir gpt2-13b --max_shard_size 10GB
  %(prog)s --mindspore_path custom.ckpt --output_dir out --n_head 16 --activation gelu_new
  %(prog)s --mindspore_path gpt2_13b.ckpt --output_dir out --config run_gpt2_13b.yaml
  # a distributed MindFormers run: output/ holds checkpoint/rank_N/ and strategy/ (or pass the two folders)
  %(prog)s --mindspore_path output/ --output_dir gpt2-hf
  %(prog)s --mindspore_path output/checkpoint --src_strategy_path_or_dir output/strategy \\
      --output_dir gpt2-hf

Layers, hidden size, vocab, positions and MLP width are read from the tensors. A .ckpt does not store the
number of heads: it is --n_head, or model.model_config.num_heads of the MindFormers recipe given with
--config (whose other sizes must match the tensors), or the preset with the same hidden size (small 768 ->
12, medium 1024 -> 16, large 1280 -> 20, xl 1600 -> 25, 13b 5120 -> 40, 52b 8192 -> 32). The activation is
--activation, else the recipe's hidden_act, else the preset's. The first output line is the shape used.
Optimizer states (adam_m.*, adam_v.*) and bookkeeping entries (global_step, ...) are skipped and listed.
Load the result with transformers.GPT2LMHeadModel.from_pretrained(DIR) or ours."""


def main(argv=None):
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--mindspore_path", "--load_checkpoint", dest="mindspore_path", required=True,
                   help="input .ckpt file, or a distributed checkpoint: output/ (checkpoint/ and strategy/ inside)")
    p.add_argument("--src_strategy_path_or_dir",
                   help="the strategy of a distributed --mindspore_path output/checkpoint/ (output/strategy/)")
    p.add_argument("--output_dir", required=True, help="output HF directory")
    p.add_argument("--n_head", type=int, default=None,
                   help="attention heads (default: --config's num_heads, else the preset of the same width)")
    p.add_argument("--config", default=None, metavar="RECIPE.yaml",
                   help="the MindFormers recipe the model was trained with (model.model_config: num_heads, ...)")
    p.add_argument("--activation", choices=["gelu_new", "fast_gelu", "gelu"], default=None,
                   help="MLP activation (default: the preset's, gelu_new if none)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast weights (default: keep)")
    p.add_argument("--max_shard_size", default=None, help="split into shards of at most this size, e.g. 10GB")
    p.add_argument("--no_crc_check", action="store_true", help="skip verifying the crc_num trailer")
    args = p.parse_args(argv)

    from gpt2_ascend.progress import progress_bar
    from gpt2_ascend.convert import mindspore_to_hf
    from gpt2_ascend.cli import print_error
    try:
        s = mindspore_to_hf(args.mindspore_path, args.output_dir, n_head=args.n_head, activation=args.activation,
                            dtype=args.dtype, max_shard_size=args.max_shard_size, verify_crc=not args.no_crc_check,
                            progress=lambda xs: progress_bar(xs, desc="converting", unit="tensor", disable=None),
                            recipe=args.config, log=lambda line: print(line, flush=True),
                            strategy=args.src_strategy_path_or_dir)
    except (ValueError, OSError, KeyError) as e:
        print_error(e)
        return 2
    print(f"wrote {s['output_dir']}: {s['architecture']}, {str(s['dtype']).replace('torch.', '')}, "
          f"{len(s['files'])} file(s)")
    print(s["skipped_line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
