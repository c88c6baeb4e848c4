"""Training throughput: our trainer's own step vs transformers (+ peft), one after the other, one card.

Ours runs `gpt2_ascend.train.Trainer.train_step` (the step train.py runs: AdamW from ops.adamw, the
schedule, clipping at 1.0, autocast, loss scaling when fp16) with the speed settings a recipe can turn on:
torch.compile, the vocab padded to 50304 inside, the chunked head + cross-entropy, TF32, fused AdamW,
pinned non-blocking batches. The baseline is transformers' GPT2LMHeadModel (SDPA attention) compiled with
torch.compile and fused AdamW in a plain loop; for --lora, transformers + peft with gradient checkpointing.
Same shapes, random weights, random tokens, bf16 autocast. One JSON line per measurement, then the ratio.

    python bench/train.py --preset small --batch 16 --seq 1024 --compile      # target: >= 1.65x, MFU >= 0.50
    python bench/train.py --preset 13b --lora --batch 1 --seq 2048 --compile  # target: >= 1.33x
    python bench/train.py --preset medium --batch 16 --compile --no_hf         # ours only
    python bench/train.py --device cpu --preset tiny --batch 2 --seq 32 --steps 2 --warmup 1   # smoke test

MFU = tokens/s x (6N + 12 L H T) / peak (989 TFLOP/s dense bf16 on H100 / H200); for LoRA the same formula
is reported as `mfu_6n` (the frozen base does no weight-gradient matmuls, so it overstates the work).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import datetime
import json
import sys
import time

import torch

PEAK = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
TARGETS = {("small", False): dict(ratio=1.65, mfu=0.50), ("13b", True): dict(ratio=1.33)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training tokens/s: gpt2_ascend's trainer vs transformers.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="tiny | small | medium | large | xl | 13b")
    p.add_argument("--lora", action="store_true", help="LoRA rank 8 on c_attn, c_proj, c_fc, with recompute")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's context)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="torch.compile ours (the baseline is always compiled)")
    p.add_argument("--compile_scope", choices=("model", "blocks"), default="model",
                   help="ours: one graph for the whole model, or the per-block step with its recompute, compiled once "
                        "for all blocks (runner_config.compile_scope)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                   help="ours (default: none, or selective with --lora: matmul and attention outputs kept, the "
                        "element-wise ops recomputed; the baseline uses transformers' full checkpointing)")
    p.add_argument("--loss_chunk_size", type=int, default=8192, help="ours: 0 turns the chunked head off")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no_hf", action="store_true", help="ours only")
    p.add_argument("--baseline_compile_scope", choices=("model", "blocks"), default="model",
                   help="the baseline: torch.compile(model), or each transformers block compiled in place "
                        "(minutes less for the 13B shape)")
    p.add_argument("--baseline_eager", action="store_true",
                   help="do not compile the baseline (smoke tests only: the targets are against the compiled one)")
    p.add_argument("--find_max_batch", action="store_true", help="also report the largest batch ours fits")
    p.add_argument("--output_jsonl", help="append the JSON lines here too")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# ours: the trainer's step
# ---------------------------------------------------------------------------------------------
def build_ours(args, device, seq):
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    from gpt2_ascend.lora import apply_lora
    from gpt2_ascend.parallel.parallelize import compile_model
    from gpt2_ascend.train import Trainer, TrainSettings
    from gpt2_ascend.train.optim import build_optimizer, build_schedule
    from gpt2_ascend.train.recipe import load_recipe

    config = GPT2Config.from_preset(args.preset, n_positions=max(seq, GPT2Config.from_preset(args.preset).n_positions),
                                    pad_vocab_size_multiple=64, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                                    attn_implementation="auto")
    with torch.device(device):  # initialised where it trains: no fp32 host copy of a 13B model
        model = GPT2LMHeadModel(config)
    recompute = args.recompute or ("selective" if args.lora else "none")
    model.set_recompute(recompute)
    model.config.loss_chunk_size = args.loss_chunk_size
    if args.lora:
        model.to(torch.bfloat16)  # a frozen base in bf16, as LoRA finetunes run
        model = apply_lora(model, rank=8, alpha=16, dropout=0.0, target_modules=("c_attn", "c_proj", "c_fc"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    recipe = load_recipe(None)  # the defaults: polynomial schedule, AdamW betas / eps / decay of the recipes
    schedule = build_schedule(recipe.lr_schedule, 10_000)
    optimizer = build_optimizer(model, schedule(0), device_type=device.type)
    run_model = compile_model(model, args.compile_scope) if args.compile else model
    settings = TrainSettings(total_steps=10_000, precision="bf16" if device.type != "cpu" else "fp32",
                             max_grad_norm=1.0, progress=False)
    trainer = Trainer(run_model, optimizer, schedule, loader=None, device=device, settings=settings,
                      raw_model=model, log=lambda *a, **k: None)
    return trainer, model, config


def ours_step_fn(trainer, batch):
    from gpt2_ascend.data.loader import causal_lm_inputs
    micro = [causal_lm_inputs(batch)]  # the model's keyword arguments: input_ids and next-token targets
    return lambda: trainer.train_step(micro)


# ---------------------------------------------------------------------------------------------
# the baseline: transformers (+ peft), compiled, fused AdamW
# ---------------------------------------------------------------------------------------------
def build_hf(args, config, device):
    import transformers
    hf_cfg = transformers.GPT2Config(**config.replace(pad_vocab_size_multiple=1).to_hf_dict())
    hf_cfg.n_positions = config.n_positions
    with torch.device(device):
        model = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
    # without it every forward logs "loss_type=None ... unrecognized" through warning_once, and that call
    # splits the compiled graph each step: a slower baseline than a careful user would have
    model.loss_type = "ForCausalLM"
    if args.lora:
        from peft import LoraConfig, get_peft_model
        model.to(torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["c_attn", "c_proj", "c_fc"]))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=device.type == "cuda")
    return compile_hf(model, args), optimizer, params


def compile_hf(model, args):
    if args.baseline_eager:
        return model
    if args.baseline_compile_scope == "model":
        return torch.compile(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for block in base.transformer.h:
        block.compile()
    return model


def hf_step_fn(model, optimizer, params, batch, device):
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu")

    def step():
        with amp:
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def measure(step, device, warmup: int, steps: int) -> dict:
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start  # compilation happens here
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return dict(step_ms=round(1000 * elapsed / steps, 3), warmup_s=round(warmup_s, 1),
                peak_mem_gib=round(peak / 2 ** 30, 2))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(config, seq) -> float:
    from gpt2_ascend import GPT2LMHeadModel
    with torch.device("meta"):
        n = GPT2LMHeadModel(config.replace(pad_vocab_size_multiple=1)).num_parameters()
    return 6 * n + 12 * config.n_layer * config.n_embd * seq


def card_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(card: str):
    return next((v for k, v in PEAK.items() if k in card.lower()), None)


def report(record: dict, args):
    line = json.dumps(record)
    print(line, flush=True)
    if args.output_jsonl:
        with open(args.output_jsonl, "a") as f:
            f.write(line + "\n")


def random_batch(config, batch, seq, device):
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
    return ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ids.to(device)


def largest_batch(args, device, seq, start: int) -> int:
    """Double the batch until ours runs out of memory (CUDA only)."""
    best, batch = start, start * 2
    while batch <= 4096:
        trainer = model = None
        try:
            trainer, model, config = build_ours(args, device, seq)
            measure(ours_step_fn(trainer, random_batch(config, batch, seq, device)), device, 1, 1)
        except torch.OutOfMemoryError:
            break
        finally:
            del trainer, model  # free this try's model and optimizer before the next, larger one
            gc.collect()
            torch.cuda.empty_cache()
        best, batch = batch, batch * 2
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: bench/train.py needs a CUDA GPU (use --device cpu --preset tiny for a smoke test)",
              file=sys.stderr)
        return 2
    from gpt2_ascend import GPT2Config
    try:
        seq = args.seq or GPT2Config.from_preset(args.preset).n_positions
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = card_name(device)
    common = dict(preset=args.preset, lora=args.lora, batch=args.batch, seq=seq, card=card,
                  torch=torch.__version__, date=datetime.date.today().isoformat())
    tokens = args.batch * seq
    results = {}

    trainer, model, config = build_ours(args, device, seq)
    fpt = flops_per_token(config, seq)
    peak = peak_flops(card)
    batch = random_batch(config, args.batch, seq, device)
    r = measure(ours_step_fn(trainer, batch), device, args.warmup, args.steps)
    results["ours"] = tokens / (r["step_ms"] / 1000)
    report(dict(common, impl="gpt2_ascend", compile=args.compile and args.compile_scope,
                tokens_per_s=round(results["ours"]),
                mfu=round(results["ours"] * fpt / peak, 4) if peak else None, **r), args)
    del trainer, model
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()

    if not args.no_hf:
        import transformers
        hf_model, optimizer, params = build_hf(args, config, device)
        r = measure(hf_step_fn(hf_model, optimizer, params, batch, device), device, args.warmup, args.steps)
        results["hf"] = tokens / (r["step_ms"] / 1000)
        report(dict(common, impl="transformers" + ("+peft" if args.lora else ""),
                    compile=not args.baseline_eager and args.baseline_compile_scope,
                    transformers=transformers.__version__, tokens_per_s=round(results["hf"]),
                    mfu=round(results["hf"] * fpt / peak, 4) if peak else None, **r), args)
        del hf_model, optimizer, params
        target = TARGETS.get((args.preset, args.lora), {})
        ratio = results["ours"] / results["hf"]
        summary = dict(common, ratio=round(ratio, 3), target_ratio=target.get("ratio"))
        if "ratio" in target:
            summary["ratio_met"] = ratio >= target["ratio"]
        if "mfu" in target and peak:
            summary["mfu_met"] = results["ours"] * fpt / peak >= target["mfu"]
        report(summary, args)
    if args.find_max_batch and device.type == "cuda":
        report(dict(common, impl="gpt2_ascend", largest_batch=largest_batch(args, device, seq, args.batch)), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
