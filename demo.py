"""The demo: pretrain a tiny GPT-2 on WikiText-2, measure its perplexity, sample from it, and show that
transformers loads the result unchanged. A few minutes on 2 CPU cores.

    python demo.py [--output_dir out/demo] [--max_steps 200]

Data comes from GPT2_DATA_DIR (default: the shared data folder beside the checkout).
"""
import argparse
import os
import shlex
import signal
import sys
import time

import torch

from gpt2_ascend import GPT2LMHeadModel, load_tokenizer
from gpt2_ascend.cli import print_error
from gpt2_ascend.data.download import default_data_dir
from gpt2_ascend.data.sources import load_token_blocks
from gpt2_ascend.eval import perplexity
from gpt2_ascend.generation import generate_text
from gpt2_ascend.train.recipe import load_recipe
from gpt2_ascend.train import run_training
from gpt2_ascend.train.interrupt import TrainingInterrupted, signal_name

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "gpt2", "pretrain_gpt2_tiny.yaml")
PROMPTS = ["The history of the", "In 1998 , the band", "The game was released"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="out/demo")
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the recipe's 200)")
    args = p.parse_args(argv)
    try:
        return run_demo(args)
    except (TrainingInterrupted, KeyboardInterrupt) as e:  # Ctrl-C / SIGTERM: one line, the shell's 128 + signum
        signum = getattr(e, "signum", signal.SIGINT)
        where = f" after step {e.step}, checkpoint saved: {e.checkpoint}" if isinstance(e, TrainingInterrupted) else ""
        print(f"error: interrupted by {signal_name(signum)}{where}", file=sys.stderr)
        return 128 + signum
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:  # missing data, bad paths: one line
        print_error(e)
        return 2


def run_demo(args) -> int:
    started = time.perf_counter()

    print("== 1. pretrain a tiny GPT-2 on WikiText-2 (configs/gpt2/pretrain_gpt2_tiny.yaml)")
    overrides = [f"output_dir='{args.output_dir}'"]
    if args.max_steps:
        overrides.append(f"runner_config.max_steps={args.max_steps}")
    summary = run_training(load_recipe(RECIPE, overrides), overwrite=True)
    final = summary["final"]
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f}s: train loss {summary['final_loss']:.3f}, "
          f"metrics in {summary['metrics']}, loss curve in {summary['loss_curve']}")

    print("\n== 2. perplexity on WikiText-2 test (token-weighted, non-overlapping blocks)")
    model = GPT2LMHeadModel.from_pretrained(final).eval()
    test_file = os.path.join(default_data_dir(), "wikitext-2", "wiki.test.tokens")
    seq = model.config.n_positions
    blocks = load_token_blocks(test_file, max_length=seq, cache_dir=os.path.join(args.output_dir, "data_cache"))
    result = perplexity(model, blocks[:400], seq_length=seq, batch_size=32)
    print(f"test perplexity {result['ppl']:.1f} over {result['tokens']:,} tokens "
          f"(a uniform guess over the vocabulary would score {model.config.vocab_size:,})")

    print("\n== 3. samples (top-k 40, temperature 0.8, seed 0)")
    tokenizer = load_tokenizer(final)
    texts = generate_text(model, tokenizer, PROMPTS, max_new_tokens=24, do_sample=True, top_k=40,
                          temperature=0.8, seed=0)
    for prompt, text in zip(PROMPTS, texts):
        print(f"  {prompt!r} -> {text!r}")
    train_file = os.path.join(default_data_dir(), "wikitext-2", "wiki.train.tokens")
    print(why_samples_are_noise(summary["steps"], unk_share(train_file)))

    print("\n== 4. the exported model in transformers")
    import transformers
    theirs = transformers.GPT2LMHeadModel.from_pretrained(final).eval()
    ids = torch.tensor([tokenizer(PROMPTS[0]).input_ids])
    with torch.no_grad():
        diff = (theirs(ids).logits - model(ids).logits).abs().max().item()
    print(f"transformers.GPT2LMHeadModel.from_pretrained({final!r}): max |logit difference| = {diff:.1e}")
    print(f"\ndone in {time.perf_counter() - started:.0f}s")
    print("\nnext, try:")
    for what, command in next_commands(final, args.output_dir, summary["steps"]):
        print(f"  # {what}\n  {command}")
    return 0


def unk_share(train_file: str) -> float:
    """The share of WikiText-2's training words that are <unk> (every word outside its 33k vocabulary)."""
    with open(train_file, encoding="utf-8") as f:
        words = f.read().split()
    return words.count("<unk>") / max(len(words), 1)


def why_samples_are_noise(steps: int, unk: float) -> str:
    """Why a tiny model's samples read as noise: said once, so that nobody takes them for a bug."""
    return (f"  (why they read as noise: WikiText-2 writes every rare word as <unk> ({unk:.1%} of its words) and "
            f"hyphens as @-@, and a 2-layer model after {steps} steps has learnt mostly "
            f"such frequent tokens and little grammar; the loss, not the samples, shows it learning. Train longer "
            f"(below) for word-like text.)")


def next_commands(final: str, output_dir: str, steps: int) -> list[tuple[str, str]]:
    """Three commands to run next, on what the demo made (tests/test_demo.py parses each with its program)."""
    final, longer, sst2 = (shlex.quote(path) for path in (final, os.path.join(output_dir, "longer"),
                                                           os.path.join(output_dir, "sst2")))
    return [("sample more from the demo's model",
             f"python generate.py --model {final} --prompt 'The history of the' --max_new_tokens 40"),
            ("train 10x longer: the loss keeps falling and the samples gain words",
             f"python train.py --config configs/gpt2/pretrain_gpt2_tiny.yaml --max_steps {10 * steps} "
             f"--output_dir {longer}"),
            ("finetune the demo's model into an SST-2 sentiment classifier",
             f"python train.py --config configs/gpt2/finetune_gpt2_tiny_txtcls.yaml --load_checkpoint {final} "
             f"--output_dir {sst2}")]


if __name__ == "__main__":
    sys.exit(main())
