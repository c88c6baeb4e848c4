"""Generation throughput: ours (static KV cache, compiled CUDA-graph decode step) vs transformers' generate.

Both run greedy decoding on the same random bf16 weights on the same card; one JSON line per measurement
(tokens/s = batch * new tokens / wall time of the whole generate call, prefill included; median of
--repeats timed runs after warm-up, with the device synchronised around each). The 13B shape is built on
the meta device and materialised directly on the GPU in bf16, so no fp32 host copy (52 GB) is ever made.

    python bench/generate.py                       # small b1, small b32 (256 new tokens), 13b b1 (64)
    python bench/generate.py --cases small-b1 --repeats 5
    python bench/generate.py --device cpu --cases tiny-b2 --new_tokens 8   # a smoke test of this script only
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time

# case -> (preset, batch size, new tokens, target tokens/s, target ratio over transformers)
CASES = {
    "small-b1": ("small", 1, 256, 1000.0, 45.0),
    "small-b32": ("small", 32, 256, 20000.0, None),
    "13b-b1": ("13b", 1, 64, 150.0, None),
    "tiny-b1": ("tiny", 1, 16, None, None),  # smoke tests of the script, any device
    "tiny-b2": ("tiny", 2, 16, None, None),
}
DEFAULT_CASES = "small-b1,small-b32,13b-b1"

EXAMPLES = """examples:
  python bench/generate.py                                  # the three measurements of docs/performance.md
  python bench/generate.py --cases 13b-b1 --repeats 3 --output_jsonl gen.jsonl
  python bench/generate.py --cases small-b1 --no_compile    # ours without the CUDA graph
  python bench/generate.py --device cpu --cases tiny-b2 --new_tokens 8   # smoke test, numbers meaningless
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generation tokens/s: gpt2_ascend vs transformers on one card.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--device", default="cuda", help="cuda[:N] (cpu only as a smoke test of the script)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per sequence (random ids)")
    p.add_argument("--new_tokens", type=int, help="override every case's number of new tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
    p.add_argument("--no_compile", action="store_true", help="ours without torch.compile / CUDA graphs")
    p.add_argument("--no_hf", action="store_true", help="skip transformers (ours only, no ratio)")
    p.add_argument("--output_jsonl", help="append the JSON lines to this file as well")
    return p.parse_args(argv)


def selected_cases(spec: str, known=CASES) -> list[str]:
    """The names of a comma-separated --cases value, each one of `known` (bench/cpu_session.py passes its own)."""
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in known]
    if unknown or not names:
        raise ValueError(f"unknown case {unknown[0] if unknown else spec!r}: use {', '.join(known)}")
    return names


@contextlib.contextmanager
def default_dtype(dtype):
    import torch
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_models(preset: str, device, dtype, with_hf: bool):
    """Ours with random GPT-2 init made directly on `device` in `dtype`, and transformers' model holding
    the same weights (its Conv1D layout: the projections are transposed copies)."""
    import torch
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    from gpt2_ascend.hf import ours_to_hf

    config = GPT2Config.from_preset(preset, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    with default_dtype(dtype), torch.device("meta"):
        ours = GPT2LMHeadModel(config)
    ours.to_empty(device=device)
    ours.lm_head.weight = ours.transformer.wte.weight  # to_empty makes new tensors: tie again
    ours.init_weights()
    ours.eval()
    hf = None
    if with_hf:
        import transformers
        hf_config = transformers.GPT2Config(**config.to_hf_dict())
        with default_dtype(dtype), torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(hf_config)
        result = hf.load_state_dict(ours_to_hf(ours.state_dict(), config), strict=False, assign=True)
        if set(result.missing_keys) - {"lm_head.weight"} or result.unexpected_keys:
            raise RuntimeError(f"transformers model did not take our weights: {result}")
        hf.lm_head.weight = hf.transformer.wte.weight
        hf.generation_config.eos_token_id = None  # never stop early: every run makes exactly new_tokens
        hf.generation_config.pad_token_id = config.pad_token_id
        hf.eval()
    return config, ours, hf


def timed(fn, device, repeats: int):
    """(last output, median seconds) of `repeats` calls, the device synchronised around each."""
    from gpt2_ascend.device import synchronize
    seconds, out = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return out, statistics.median(seconds)


def run_case(name, config, ours, hf, args, device, card, stamp):
    import torch
    from gpt2_ascend.device import max_memory_allocated, reset_peak_memory
    from gpt2_ascend.generation import generate

    preset, batch, new_tokens, target, target_ratio = CASES[name]
    new_tokens = args.new_tokens or new_tokens
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(prompt)
    common = dict(case=name, preset=preset, batch_size=batch, prompt_len=args.prompt_len, new_tokens=new_tokens,
                  dtype=args.dtype, device=card, torch=torch.__version__, date=stamp)
    lines = []

    hf_rate = None
    if hf is not None:
        import transformers

        def run_hf():
            with torch.no_grad():
                return hf.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                   do_sample=False, num_beams=1, pad_token_id=config.pad_token_id)
        timed(run_hf, device, 1)  # warm-up
        reset_peak_memory(device)
        hf_out, hf_s = timed(run_hf, device, args.repeats)
        hf_rate = batch * (hf_out.size(1) - args.prompt_len) / hf_s
        lines.append(dict(common, impl="transformers", transformers=transformers.__version__, compile=False,
                          seconds=round(hf_s, 4), tokens_per_s=round(hf_rate, 1),
                          generated=int(hf_out.size(1) - args.prompt_len),
                          peak_memory_gb=round(max_memory_allocated(device) / 2**30, 2)))

    compile_ = not args.no_compile and device.type == "cuda"

    def run_ours():
        return generate(ours, prompt, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None,
                        compile=compile_)
    skips_before = cudagraph_skips()
    timed(run_ours, device, 2)  # warm-up: compiles the decode step and records its CUDA graph
    skipped_graphs = cudagraph_skips() - skips_before  # > 0: inductor ran the step without a CUDA graph
    reset_peak_memory(device)
    out, ours_s = timed(run_ours, device, args.repeats)
    rate = batch * (out.size(1) - args.prompt_len) / ours_s
    line = dict(common, impl="gpt2_ascend", compile=compile_, cuda_graph=compile_ and skipped_graphs == 0,
                seconds=round(ours_s, 4), tokens_per_s=round(rate, 1),
                generated=int(out.size(1) - args.prompt_len),
                peak_memory_gb=round(max_memory_allocated(device) / 2**30, 2), target_tokens_per_s=target)
    if hf_rate:
        line["ratio_vs_transformers"] = round(rate / hf_rate, 2)
        line["target_ratio"] = target_ratio
        line["same_tokens_as_transformers"] = bool(torch.equal(out, hf_out))  # bf16 kernels may differ
    if target is not None:
        line["meets_target"] = bool(rate >= target and (target_ratio is None or not hf_rate
                                                       or rate / hf_rate >= target_ratio))
    lines.append(line)
    return lines


def cudagraph_skips() -> int:
    """How many times inductor has declined to capture a CUDA graph in this process."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
        cases = selected_cases(args.cases)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this benchmark needs a CUDA GPU (none is visible); run it on the GPU machine, "
                               "or pass --device cpu --cases tiny-b2 for a smoke test of the script")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"--device {args.device}: use cuda[:N] (or cpu for a smoke test)")
        if args.repeats < 1 or args.prompt_len < 1 or (args.new_tokens is not None and args.new_tokens < 1):
            raise ValueError("--repeats, --prompt_len and --new_tokens must be positive")
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gpt2_ascend.device import device_name
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    card = device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    by_preset: dict[str, list[str]] = {}
    for name in cases:
        by_preset.setdefault(CASES[name][0], []).append(name)
    for preset, names in by_preset.items():
        config, ours, hf = build_models(preset, device, dtype, with_hf=not args.no_hf)
        for name in names:
            for line in run_case(name, config, ours, hf, args, device, card, stamp):
                text = json.dumps(line)
                print(text, flush=True)
                if args.output_jsonl:
                    with open(args.output_jsonl, "a", encoding="utf-8") as f:
                        f.write(text + "\n")
        del ours, hf
        torch._dynamo.reset()  # frees the CUDA graphs recorded for this model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
