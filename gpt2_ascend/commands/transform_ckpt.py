"""MindFormers' distributed checkpoints without MindSpore: merge every rank's slices into one .ckpt, or cut a
checkpoint for another layout (MindFormers' tools/transform_ckpt.py, same flags and output layout)."""
import sys

from ..cli import ArgumentParser


EXAMPLES = """examples:
  # MindFormers:  python mindformers/tools/transform_ckpt.py --src_ckpt_strategy output/strategy/ \\
  #                   --src_ckpt_dir output/checkpoint/ --dst_ckpt_dir target/ --prefix gpt2
  %(prog)s --src_ckpt_strategy output/strategy/ --src_ckpt_dir output/checkpoint/ \\
      --dst_ckpt_dir target/ --prefix gpt2                        # -> target/rank_0/gpt20.ckpt, the whole model
  # back to a cluster: cut a checkpoint for the layout a job expects (its strategy folder or merged file)
  %(prog)s --src_ckpt_dir gpt2.ckpt --dst_ckpt_strategy job/strategy/ \\
      --dst_ckpt_dir sliced/ --prefix gpt2                       # -> sliced/rank_N/gpt2N.ckpt
  %(prog)s --src_ckpt_strategy output/strategy/ --src_ckpt_dir output/checkpoint/ \\
      --dst_ckpt_strategy job/strategy/ --dst_ckpt_dir sliced/   # from one layout to another

--src_ckpt_strategy / --dst_ckpt_strategy: a folder of the run's ckpt_strategy_rank_N.ckpt files (all pipeline
stages) or one strategy file (merge_pipeline_strategys' output). Without --src_ckpt_strategy the source is one
unsliced checkpoint (--src_ckpt_dir DIR with rank_0/*.ckpt, or a .ckpt file). Each rank_N/ folder's last .ckpt in
name order is read, as MindSpore does. The merged file is the one MindSpore's transform_checkpoints writes, byte for
byte (with --no_crc; a crc trailer is added otherwise, which MindSpore checks when asked). Memory: one full tensor
and one slice. Load the result with the mindspore-to-hf converter, or give the run's output/ folder directly to
train.py / evaluate.py / generate.py --load_checkpoint (docs/conversion.md)."""


def strategy_arg(value):
    """MindFormers passes "" or "None" for no strategy."""
    return None if value in ("", "None") else value


def main(argv=None):
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--src_ckpt_strategy", type=strategy_arg, default=None,
                   help="strategy of the source: output/strategy/ or one strategy file (none: an unsliced source)")
    p.add_argument("--dst_ckpt_strategy", type=strategy_arg, default=None,
                   help="strategy to cut for (none: merge into one checkpoint)")
    p.add_argument("--src_ckpt_dir", required=True, help="output/checkpoint/ (rank_N/ folders inside), or a .ckpt")
    p.add_argument("--dst_ckpt_dir", required=True, help="output folder (rank_N/<prefix>N.ckpt inside)")
    p.add_argument("--prefix", default="checkpoint_", help="file name prefix (default checkpoint_, as MindFormers)")
    p.add_argument("--no_crc", action="store_true", help="do not append MindSpore's crc_num trailer")
    p.add_argument("--no_crc_check", action="store_true", help="do not verify the rank files' crc trailers")
    args = p.parse_args(argv)

    from gpt2_ascend.progress import progress_bar
    from gpt2_ascend.cli import print_error
    from gpt2_ascend.convert import transform_ckpt
    try:
        s = transform_ckpt(args.src_ckpt_strategy, args.src_ckpt_dir, args.dst_ckpt_dir, args.prefix,
                           args.dst_ckpt_strategy, crc=not args.no_crc, verify_crc=not args.no_crc_check,
                           progress=lambda xs: progress_bar(xs, desc="transforming", unit="tensor", disable=None))
    except (ValueError, OSError, KeyError) as e:
        print_error(e)
        return 2
    what = (f"{s['merged']} merged from their slices" if not args.dst_ckpt_strategy
            else f"{s['cut']} cut for the destination layout")
    where = s["files"][0] if s["ranks"] == 1 else f"{s['output_dir']} ({s['ranks']} ranks)"
    print(f"wrote {where}: {s['tensors']} tensors, {what}, {s['copied']} copied as the first rank holds them")
    if s["left_out"]:
        print(f"note: {len(s['left_out'])} tensor(s) of the source are not in the destination strategy and were left "
              f"out ({', '.join(s['left_out'][:4])}{', ...' if len(s['left_out']) > 4 else ''})")
    if s["not_in_source"]:
        print(f"note: the destination strategy names {len(s['not_in_source'])} tensor(s) the source does not hold "
              f"({', '.join(s['not_in_source'][:4])}{', ...' if len(s['not_in_source']) > 4 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
