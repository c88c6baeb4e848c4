"""HF GPT-2 checkpoint -> MindSpore/MindFormers GPT-2 .ckpt (no MindSpore needed)."""
import sys
from ..cli import ArgumentParser


EXAMPLES = """examples:
  %(prog)s --layers 12 --torch_path gpt2/ --mindspore_path gpt2_small.ckpt
  %(prog)s --torch_path pytorch_model.bin --mindspore_path gpt2.ckpt --dtype fp16
  %(prog)s --layers 40 --torch_path cerebras-13b/ --mindspore_path gpt_13b.ckpt

PATH is an HF directory (model.safetensors, pytorch_model.bin, or shards with an index), a single .bin or
.safetensors file, or one of ours (save_pretrained output, or a torch.save of our state dict). Names follow
MindFormers' GPT-2 (backbone.blocks.{i}.attention.dense1/2/3 = q/k/v ...); see docs/conversion.md."""


def main(argv=None):
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--torch_path", required=True, help="HF checkpoint directory or weight file")
    p.add_argument("--mindspore_path", required=True, help="output .ckpt file")
    p.add_argument("--layers", type=int, default=None,
                   help="number of layers (MindFormers' flag); checked against the checkpoint (default: read from it)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="cast floating-point weights (default: keep the checkpoint's dtype)")
    p.add_argument("--no_crc", action="store_true", help="do not append MindSpore's crc_num trailer")
    args = p.parse_args(argv)

    from gpt2_ascend.progress import progress_bar
    from gpt2_ascend.convert import hf_to_mindspore
    from gpt2_ascend.cli import print_error
    try:
        s = hf_to_mindspore(args.torch_path, args.mindspore_path, layers=args.layers, dtype=args.dtype,
                            crc=not args.no_crc, progress=lambda xs: progress_bar(xs, desc="converting", unit="tensor", disable=None))
    except (ValueError, OSError, KeyError) as e:
        print_error(e)
        return 2
    kind = "GPT2ForSequenceClassification" if s["classifier"] else "GPT2LMHeadModel"
    skipped = f"; skipped {len(s['skipped'])} ({', '.join(s['skipped'][:3])}{', ...' if len(s['skipped']) > 3 else ''})" if s["skipped"] else ""
    print(f"wrote {s['path']}: {kind}, {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, "
          f"{s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB{', crc' if s['crc'] else ''}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
