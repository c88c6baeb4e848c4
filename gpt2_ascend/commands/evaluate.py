"""Evaluate a GPT-2 checkpoint: WikiText-2 perplexity or text-classification (SST-2) accuracy.

A thin shell around gpt2_ascend.eval.runner; see docs/evaluation.md.
"""
from __future__ import annotations

import json
import sys
from ..cli import ArgumentParser

EXAMPLES = """examples:
  # WikiText-2 perplexity, raw test file prepared on the fly (blocks of the model's context)
  %(prog)s --task perplexity --model out/gpt2-small --eval_dataset_dir ../shared/data/wikitext-2/wiki.test.tokens
  # MindFormers' number (mean of per-batch losses), comparable with its README's PPL
  %(prog)s --task perplexity --model out/gpt2-small --eval_dataset_dir wiki.test.npy --protocol mindformers
  # HF's sliding-window perplexity, each token scored once with >= 512 tokens of context
  %(prog)s --task perplexity --model gpt2 --eval_dataset_dir wiki.test.tokens --stride 512
  # a LoRA adapter on top of its base model
  %(prog)s --task perplexity --model out/base --adapter out/lora/final/adapter --eval_dataset_dir wiki.valid.tokens
  # SST-2 accuracy of a finetuned classifier, JSON for scripts
  %(prog)s --task text_classification --model out/sst2 --eval_dataset_dir ../shared/data/sst2/dev.tsv \\
      --output_json sst2.json
  # a quick look: the first 20 blocks only (lm-eval's --limit is the same flag), MindSpore weights taken directly
  %(prog)s --task perplexity --model gpt2.ckpt --eval_dataset_dir wiki.valid.tokens --max_samples 20

Rows are the model's context long (n_positions, printed) unless --seq_length / --max_length says otherwise.
"""


def parse_args(argv=None):
    p = ArgumentParser(description="Evaluate a GPT-2 checkpoint: perplexity or text-classification accuracy.",
                                epilog=EXAMPLES)
    p.add_argument("--task", choices=("perplexity", "text_classification"), default="perplexity")
    p.add_argument("--model", "--load_checkpoint", dest="model", required=True,
                   help="HF-format model directory (ours or transformers'), a hub id, a training checkpoint, a "
                        "MindFormers .ckpt or distributed checkpoint (output/ with checkpoint/ and strategy/ inside)")
    p.add_argument("--src_strategy_path_or_dir",
                   help="the strategy of a distributed --model output/checkpoint/ (output/strategy/ or one file)")
    p.add_argument("--n_head", type=int, help="MindSpore weights: attention heads (a .ckpt does not store them; "
                                              "default: a config.json beside it, else the preset of its width)")
    p.add_argument("--activation", choices=("gelu_new", "fast_gelu", "gelu"),
                   help="MindSpore weights: the MLP activation (default: the preset's)")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory, merged into the model")
    p.add_argument("--eval_dataset_dir", required=True,
                   help="perplexity: prepared .npy, raw wiki.*.tokens, or .txt file/folder; "
                        "text_classification: GLUE .tsv or prepared .npz; both: a datasets source (a save_to_disk "
                        "folder, .parquet/.jsonl/.csv/.arrow, or a hub id NAME:CONFIG:SPLIT; docs/data.md)")
    p.add_argument("--seq_length", "--max_length", dest="length", type=int, default=None,
                   help="tokens per row: perplexity blocks / windows, text_classification rows (default: the "
                        "model's context, n_positions; --max_length is the same flag)")
    p.add_argument("--max_samples", "--limit", dest="max_samples", type=float, metavar="N",
                   help="evaluate the first N rows (blocks, sentences; with --stride the first N windows' tokens), a "
                        "quick subset; below 1, that share of them (lm-eval's --limit)")
    p.add_argument("--stride", type=int, help="sliding-window perplexity with this stride (HF's recipe, per token)")
    p.add_argument("--protocol", choices=("token", "mindformers"), default="token",
                   help="token: exp(total NLL / tokens); mindformers: exp(mean of per-batch mean losses)")
    p.add_argument("--mindformers_compat", action="store_true",
                   help="prepare raw WikiText exactly like MindFormers' script (drops the last passage)")
    from gpt2_ascend.data.txtcls import DATASETS
    p.add_argument("--dataset_name", choices=DATASETS, default="sst_2",
                   help="text_classification: the raw file's layout (MindFormers' names; see docs/data.md)")
    p.add_argument("--batch_size", type=int, help="default 8 for perplexity, 32 for text_classification")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or npu[:N]")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast on GPU/NPU, fp32 on CPU")
    p.add_argument("--tokenizer", help="tokenizer directory for raw data (default: the model's, else $GPT2_DATA_DIR/gpt2)")
    p.add_argument("--cache_dir", help="keep raw data prepared here as .npy/.npz for the next run")
    p.add_argument("--output_json", help="also write the result as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def mindspore_args(args) -> dict:
    return dict(strategy=args.src_strategy_path_or_dir, n_head=args.n_head, activation=args.activation)


# what --task names: the head evaluated (its metric: eval/runner.py METRICS) and the default batch
TASKS = {"perplexity": ("GPT2LMHeadModel", 8), "text_classification": ("GPT2ForSequenceClassification", 32)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt2_ascend.cli import print_error, write_output_json
    from gpt2_ascend.eval.runner import nonfinite_problem, run_evaluation, summary
    from gpt2_ascend.fileio import json_safe
    architecture, batch_size = TASKS[args.task]
    try:
        result = run_evaluation(args.model, args.eval_dataset_dir, architecture, length=args.length,
                                stride=args.stride, batch_size=batch_size if args.batch_size is None else args.batch_size,
                                protocol=args.protocol, adapter=args.adapter, device=args.device,
                                precision=args.precision, tokenizer=args.tokenizer,
                                mindformers_compat=args.mindformers_compat, cache_dir=args.cache_dir,
                                dataset_name=args.dataset_name, progress=not args.no_progress,
                                max_samples=args.max_samples, log=lambda line: print(line, file=sys.stderr),
                                **mindspore_args(args))
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's 128 + SIGINT; nothing was written
        print("error: interrupted by SIGINT: the evaluation stopped, nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, RuntimeError, TypeError) as e:
        print_error(e)
        return 2
    result = dict(task=args.task, **result)
    # the result is printed before anything can fail, then written; a non-finite one is printed, flagged
    # (JSON: null + "error"), and the exit code says it cannot be trusted
    problem = nonfinite_problem(result)
    if problem:
        result = dict(result, error=problem)
    print(summary(result))
    print(json.dumps(json_safe(result), allow_nan=False))
    try:
        if args.output_json:
            write_output_json(result, args.output_json)
        if problem:
            raise ValueError(problem)
    except ValueError as e:
        print_error(e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
