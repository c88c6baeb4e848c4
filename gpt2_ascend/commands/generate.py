"""Generate text with a GPT-2 checkpoint: greedy or sampled, batched, streamed to stdout as it is produced.

A thin shell around gpt2_ascend.generation. Settings, first found wins: a flag; the recipe named with --config;
the model folder's generation_config.json (read as transformers reads it, so transformers' pipeline decodes
the folder the same way); the predict recipe configs/gpt2/predict_gpt2_small.yaml (max_decode_length 1024,
greedy, top_k 5, top_p 1, repetition_penalty 1). See docs/generation.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from ..cli import ArgumentParser

SAMPLING_ARGS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
DEFAULT_RECIPE = "predict_gpt2_small"  # a packaged recipe (configs/gpt2/predict_gpt2_small.yaml)

EXAMPLES = """examples:
  # greedy continuation, streamed as it is produced
  %(prog)s --model out/small/final --prompt "The meaning of life is" --max_new_tokens 64 --stream
  # sampling: temperature, top-k, nucleus, repetition penalty, reproducible with a seed
  %(prog)s --model gpt2 --prompt "Once upon a time" --do_sample --temperature 0.8 --top_k 50 \\
      --top_p 0.95 --repetition_penalty 1.2 --seed 1234
  # many prompts (one per line), left-padded batches of 16, JSON results
  %(prog)s --model out/small/final --prompt_file prompts.txt --batch_size 16 --max_new_tokens 32 \\
      --output_json out.json
  # a LoRA adapter on its base model; CUDA-graph decode step on a GPU
  %(prog)s --model out/base --adapter out/lora/final/adapter --prompt "Hello" --compile --device cuda
  # MindFormers-style: the predict recipe sets max_decode_length (prompt + new tokens) and the sampling knobs
  %(prog)s --config configs/gpt2/predict_gpt2_small.yaml --load_checkpoint out/small/final --prompt "..."
  # MindFormers' own weights: a .ckpt, or a distributed run's output/ (checkpoint/rank_N/ + strategy/), merged here
  %(prog)s --config configs/gpt2/predict_gpt2_small.yaml --load_checkpoint output/ --prompt "..."
"""


def parse_args(argv=None):
    p = ArgumentParser(description="Generate text with a GPT-2 checkpoint (KV-cache decoding).",
                                epilog=EXAMPLES)
    p.add_argument("--model", "--load_checkpoint", dest="model",
                   help="HF-format model directory, training checkpoint, hub id, MindFormers .ckpt or distributed "
                        "checkpoint (output/ with checkpoint/ and strategy/ inside) (default: the recipe's "
                        "load_checkpoint)")
    p.add_argument("--src_strategy_path_or_dir",
                   help="the strategy of a distributed --model output/checkpoint/ (default: the recipe's)")
    p.add_argument("--n_head", type=int, help="MindSpore weights: attention heads, which a .ckpt does not store "
                                              "(default: a config.json beside it, else --config's num_heads for a "
                                              "model of its width, else the preset of the model's width)")
    p.add_argument("--activation", choices=("gelu_new", "fast_gelu", "gelu"),
                   help="MindSpore weights: the MLP activation (default: --config's hidden_act, else the preset's)")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory, merged into the model")
    p.add_argument("--config", default=None,
                   help="predict recipe with the generation defaults (default: configs/gpt2/predict_gpt2_small.yaml)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompt_file", help="a UTF-8 file with one prompt per line (blank lines are skipped, with a note)")
    p.add_argument("--max_new_tokens", type=int,
                   help="tokens to generate (default: the recipe's max_decode_length minus the prompt)")
    p.add_argument("--min_new_tokens", type=int, default=0, help="eos is not allowed before this many new tokens")
    p.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (recipe default: greedy)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_k", type=int, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--repetition_penalty", type=float, help="> 1 discourages tokens already in the sequence")
    p.add_argument("--seed", type=int, help="makes sampling reproducible (default: the recipe's seed)")
    p.add_argument("--ignore_eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced (batch size 1)")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per batch (left-padded)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step: a CUDA graph on CUDA, C++ kernels on CPU (the first batch compiles)")
    p.add_argument("--truncate_prompt", action="store_true",
                   help="drop the oldest prompt tokens when prompt + new tokens exceed the context")
    p.add_argument("--device", default=None, help="auto, cpu, cuda[:N] or npu[:N] (default: the recipe's)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights dtype: auto = bf16 on GPU/NPU, fp32 on CPU")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else $GPT2_DATA_DIR/gpt2)")
    p.add_argument("--output_json", help="also write prompts and generated texts as JSON to this file")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt_file FILE")
    return prompts


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line. A blank line is no prompt (there is nothing to continue): it is skipped, and a
    note on stderr says which lines were, so outputs can still be matched to the file's lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path} (--prompt_file)")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Notepad's UTF-8) is not part of the first prompt
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt_file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}): save it as UTF-8") from None
    blank = [number for number, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else "")
        print(f"note: --prompt_file {path}: skipped {len(blank)} blank line(s) (line {shown})", file=sys.stderr)
    return [line for line in lines if line.strip()]


def settings_from(args, recipe, folder=None) -> dict:
    """generate() keywords: command-line flags over the recipe named with --config, over the model folder's
    generation_config.json (`folder`, a GenerationConfig), over the default predict recipe."""
    from gpt2_ascend.train.recipe import generation_config
    defaults = generation_config(recipe)
    max_new_tokens = args.max_new_tokens
    if folder is not None and args.config is None:
        defaults.update(do_sample=folder.do_sample, temperature=folder.temperature, top_k=folder.top_k,
                        top_p=folder.top_p, repetition_penalty=folder.repetition_penalty)
        if folder.max_length is not None:
            defaults["max_decode_length"] = folder.max_length
        if max_new_tokens is None:
            max_new_tokens = folder.max_new_tokens
    chosen = lambda flag, key: defaults[key] if flag is None else flag  # noqa: E731
    kw = dict(max_new_tokens=max_new_tokens, max_decode_length=defaults["max_decode_length"],
              min_new_tokens=args.min_new_tokens, do_sample=chosen(args.do_sample, "do_sample"),
              temperature=chosen(args.temperature, "temperature"), top_k=chosen(args.top_k, "top_k"),
              top_p=chosen(args.top_p, "top_p"), repetition_penalty=chosen(args.repetition_penalty, "repetition_penalty"),
              seed=args.seed if args.seed is not None else recipe.seed, compile=args.compile,
              truncate_prompt=args.truncate_prompt)
    if args.ignore_eos:
        kw["eos_token_id"] = None
    return kw


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, TypeError) as e:
        from gpt2_ascend.cli import print_error
        print_error(e)
        return 2


def run(args) -> int:
    import torch
    from gpt2_ascend.cli import write_output_json
    from gpt2_ascend.config import MINDFORMERS_ACTIVATIONS
    from gpt2_ascend.data.tokenizer import check_tokenizer, load_tokenizer, tokenizer_for
    from gpt2_ascend.device import resolve_device
    from gpt2_ascend.generation import check_sampling_args, compile_supported
    from gpt2_ascend.hf import folder_generation_config, resolve_model_path
    from gpt2_ascend.loading import inspect_model, load_model, mindspore_shape, recipe_shape
    from gpt2_ascend.model import LANGUAGE_MODEL
    from gpt2_ascend.predict import generate_texts
    from gpt2_ascend.recipe_files import recipe_names
    from gpt2_ascend.train.recipe import load_recipe

    config_path = args.config or (DEFAULT_RECIPE if DEFAULT_RECIPE in recipe_names() else None)
    recipe = load_recipe(config_path)
    model_path = args.model or recipe.load_checkpoint
    if not model_path:
        raise ValueError("no model: pass --model DIR (or set load_checkpoint in the recipe)")
    prompts = read_prompts(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.stream and args.batch_size > 1:
        raise ValueError("--stream prints one sequence at a time: use --batch_size 1")
    path = resolve_model_path(model_path)  # a hub id: downloaded (or found in the hub cache) once, here
    kw = settings_from(args, recipe, folder_generation_config(path))
    check_sampling_args(**{k: kw[k] for k in SAMPLING_ARGS}, seed=kw["seed"])  # before loading a model

    device = resolve_device(args.device or recipe.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type in ("cuda", "npu") else torch.float32
    strategy = args.src_strategy_path_or_dir or recipe.src_strategy_path_or_dir or None
    shape = mindspore_shape(path, strategy, args.n_head, args.activation)  # the flags, else --config's model
    if args.config and not shape:
        mc = recipe.model.model_config
        shape = recipe_shape(mc.hidden_size, mc.num_heads, MINDFORMERS_ACTIVATIONS[mc.hidden_act], args.config)
    inspect_model(path, LANGUAGE_MODEL, strategy=strategy, shape=shape, adapter=args.adapter)  # every input checked
    check_tokenizer(tokenizer_for(path, args.tokenizer))  # before the weights are read
    model = load_model(path, LANGUAGE_MODEL, dtype=dtype, device=device, adapter=args.adapter, strategy=strategy,
                       shape=shape)
    tokenizer = load_tokenizer(tokenizer_for(path, args.tokenizer))
    if args.compile and not compile_supported(device):
        print(f"note: --compile needs CUDA, or a CPU with a C++ compiler; decoding on {device.type} with the "
              f"uncompiled fixed-shape step", file=sys.stderr)
        warnings.filterwarnings("ignore", message="compile=True needs")

    printed = (lambda prompt, text: print(prompt + text, flush=True)) if not args.stream else None
    out = generate_texts(model, tokenizer, prompts, batch_size=args.batch_size, stream=print if args.stream else None,
                         on_text=printed, **kw)
    print(f"{len(prompts)} prompt(s), ~{out['new_tokens']} new tokens in {out['seconds']:.2f}s on {device}",
          file=sys.stderr)
    if args.output_json:
        write_output_json(dict(model=model_path, adapter=args.adapter, settings={k: v for k, v in kw.items()},
                               results=out["results"], seconds=out["seconds"]), args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
