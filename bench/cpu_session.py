"""The CPU session: gpt2_ascend against transformers on this machine, side by side in one process.

Cases (ratio = ours / transformers, tokens/s; issue 26's targets):
  train-small           GPT-2 small, 4 x 256, fp32. Ours: the trainer's own step (Trainer.train_step: AdamW from
                        ops.adamw, clipping at 1.0, the schedule; bench/train.py's model: vocabulary padded to 50304,
                        the head + loss chunked by --loss_chunk_size). Theirs: transformers eager, torch's AdamW as
                        constructed by default (its CPU for-loop), clip_grad_norm_, in a plain loop.   >= 1.6x
  decode-small-b1-fp32  greedy decoding, batch 1, 128 new tokens after a 32-token prompt: generate(compile=True)
                        (the decode step compiled by inductor; the warm-up call compiles it) against transformers'
                        generate(); ours_eager: generate() uncompiled.        >= 1.3x and >= 70% of the bound
  decode-small-b1-bf16  the same with bf16 weights.                                                    >= 1.8x
  decode-small-b8-fp32  batch 8 (reported).
  eval-tiny, eval-small perplexity of blocks of WikiText-2 valid (the model's context: 128 / 1024 tokens, batch
                        8): eval.perplexity() against transformers' model(ids, labels=ids).loss per batch; the two
                        token-weighted losses are reported with their difference.                    >= 2x each
  startup               seconds, in fresh processes: `import gpt2_ascend`, and the README's Python example.

Both sides get the same random weights (no pretrained GPT-2 exists here) and the same tokens. Every timed run
comes after a warm-up call of each side, and the runs interleave: each round starts with the next side in turn,
so load from other processes falls on both alike; a side's time is its median over the rounds. Beside the wall
time the process's CPU time is measured (cpu_time_ratio = transformers' / ours'): on a loaded machine wall times
swing by 2x and more, CPU times much less. The machine's ceilings are measured in the same run: fp32 matmul
GFLOP/s, read GB/s (a sum over 256 MiB) and copy GB/s (read + write), each the best of several tries. A decoding
case's bound is what the read bandwidth allows: batch x read GB/s / (bytes of every weight read once per step +
the KV cache read, mean over the steps); pct_of_bound = ours / bound. A training or evaluation case's bound is what
the matmul rate allows: GFLOP/s / FLOPs per token (nanoGPT's 6 N + 12 L C T for training, a third of it for
scoring); with it come transformers' share of it and the largest ratio any implementation of the same arithmetic
could reach here (bound / transformers). The 1-minute load average is recorded at
the start and end of every case.

Output: a table on stderr, and on stdout one JSON line per case, with at least
{"case", "ours", "transformers", "ratio", "pct_of_bound"} (tokens/s; pct_of_bound null where none applies), plus
{"case": "machine", ...} with the ceilings. --output_jsonl appends the lines to a file as well.

    python bench/cpu_session.py                          # every case, full length
    python bench/cpu_session.py --quick                  # every case, shorter runs: under 5 minutes on 2 quiet cores
    python bench/cpu_session.py --cases decode-small-b1-fp32,eval-tiny --quick
    python bench/cpu_session.py --smoke                  # tiny shapes, seconds: a test of this script only
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

CASES = ("train-small", "decode-small-b1-fp32", "decode-small-b1-bf16", "decode-small-b8-fp32", "eval-tiny",
         "eval-small", "startup")
TARGETS = {"train-small": 1.6, "decode-small-b1-fp32": 1.3, "decode-small-b1-bf16": 1.8, "eval-tiny": 2.0,
           "eval-small": 2.0}
BOUND_TARGET = {"decode-small-b1-fp32": 70.0}
TRAIN_LOSS_CHUNK = 1024  # ours: runner_config.loss_chunk_size (bench/train.py's default is the GPU's 8192)


@dataclasses.dataclass
class Sizes:
    """How long each case runs (full, --quick, --smoke)."""
    preset: str = "small"  # the model of the train / decode / eval-small cases (--smoke: tiny)
    train_batch: int = 4
    train_seq: int = 256
    train_rounds: int = 5
    decode_prompt: int = 32
    decode_tokens: int = 128
    decode_rounds: int = 3
    decode_compile: bool = True  # ours: generate(compile=True) (--smoke: uncompiled, inductor's build takes minutes)
    eval_blocks: dict = dataclasses.field(default_factory=lambda: {"tiny": 512, "small": 32})
    eval_rounds: int = 4
    eval_batch: int = 8
    startup_rounds: int = 3


FULL = Sizes()
QUICK = Sizes(train_rounds=2, decode_tokens=64, decode_rounds=2, eval_blocks={"tiny": 128, "small": 8},
              eval_rounds=2, startup_rounds=1)
SMOKE = Sizes(preset="tiny", train_batch=2, train_seq=16, train_rounds=1, decode_prompt=4, decode_tokens=4,
              decode_rounds=1, decode_compile=False, eval_blocks={"tiny": 8, "small": 8}, eval_rounds=1, eval_batch=4,
              startup_rounds=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="gpt2_ascend vs transformers on CPU, side by side in one process.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter runs of every case (< 5 minutes on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes: checks this script, numbers meaningless")
    p.add_argument("--update_rule", choices=("torch", "mindspore"), default="torch",
                   help="train-small: the trainer's optimizer computes torch's AdamW or MindSpore's rule")
    p.add_argument("--loss_chunk_size", type=int, default=TRAIN_LOSS_CHUNK,
                   help="train-small: ours computes the head + loss this many tokens at a time (0: plain logits)")
    p.add_argument("--data_dir", default=None, help="the data folder (default: GPT2_DATA_DIR or ../shared/data)")
    p.add_argument("--output_jsonl", help="append the JSON lines to this file as well")
    return p.parse_args(argv)


def load_bench(name: str):
    """bench/<name>.py as a module (by path: the repository root holds scripts of the same names)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------------
# the machine's ceilings
# ---------------------------------------------------------------------------------------------
def best_seconds(fn, tries: int) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_ceilings(smoke: bool) -> dict:
    """fp32 matmul GFLOP/s (n^3 sgemm), read GB/s (sum of a 256 MiB tensor), copy GB/s (read + write bytes)."""
    n, mib, tries = (256, 16, 2) if smoke else (2048, 256, 5)
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(mib * 2 ** 20 // 4)
    y = torch.empty_like(x)
    return dict(matmul_gflops=round(2 * n ** 3 / best_seconds(lambda: a @ b, tries) / 1e9, 1),
                read_gbps=round(x.numel() * 4 / best_seconds(x.sum, tries) / 1e9, 2),
                copy_gbps=round(2 * x.numel() * 4 / best_seconds(lambda: y.copy_(x), tries) / 1e9, 2))


# ---------------------------------------------------------------------------------------------
# interleaved timing
# ---------------------------------------------------------------------------------------------
def interleaved(runs: dict, rounds: int) -> tuple[dict, dict]:
    """Median wall seconds, and median CPU seconds of this process, of each named run over `rounds` rounds, after
    one warm-up call of each; each round starts with the next run in turn, so no side always runs first. CPU time
    leaves out the time other processes held the cores (on a loaded machine the wall time swings by 2x and more,
    while each side's CPU time moves much less); the targets are on wall time."""
    for fn in runs.values():
        fn()
    names = list(runs)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def case_line(case: str, ours_rate: float, theirs_rate: float, pct_of_bound=None, **extra) -> dict:
    line = dict(case=case, ours=round(ours_rate, 2), transformers=round(theirs_rate, 2),
                ratio=round(ours_rate / theirs_rate, 3), pct_of_bound=pct_of_bound)
    if case in TARGETS:
        line["target_ratio"] = TARGETS[case]
    if case in BOUND_TARGET:
        line["target_pct_of_bound"] = BOUND_TARGET[case]
    return dict(line, **extra)


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
def train_case(sizes: Sizes, args, ceilings: dict) -> dict:
    """The trainer's step (bench/train.py's build_ours, fp32 on CPU) against transformers eager in a loop."""
    train_bench = load_bench("train")
    device = torch.device("cpu")
    bench_args = train_bench.parse_args(["--device", "cpu", "--preset", sizes.preset, "--batch",
                                         str(sizes.train_batch), "--seq", str(sizes.train_seq), "--baseline_eager",
                                         "--loss_chunk_size", str(args.loss_chunk_size)])
    torch.manual_seed(0)
    trainer, model, config = train_bench.build_ours(bench_args, device, sizes.train_seq)
    if args.update_rule == "mindspore":
        from gpt2_ascend.train.optim import use_mindspore_rule
        use_mindspore_rule(trainer.optimizer)
    batch = train_bench.random_batch(config, sizes.train_batch, sizes.train_seq, device)
    hf_model, optimizer, params = train_bench.build_hf(bench_args, config, device)
    ours = train_bench.ours_step_fn(trainer, batch)
    theirs = train_bench.hf_step_fn(hf_model, optimizer, params, batch, device)
    seconds, cpu = interleaved(dict(ours=ours, theirs=theirs), sizes.train_rounds)
    ours_s, theirs_s = seconds["ours"], seconds["theirs"]
    tokens = sizes.train_batch * sizes.train_seq
    bound = compute_bound(config, sizes.train_seq, True, ceilings, tokens / theirs_s)
    return case_line("train-small", tokens / ours_s, tokens / theirs_s,
                     round(100 * tokens / ours_s / bound["bound_tokens_per_s"], 1), **bound,
                     update_rule=args.update_rule,
                     loss_chunk_size=args.loss_chunk_size,
                     ours_step_s=round(ours_s, 3), transformers_step_s=round(theirs_s, 3),
                     cpu_time_ratio=round(cpu["theirs"] / cpu["ours"], 3),
                     optimizer=type(trainer.optimizer).__name__ + (" fused" if trainer.optimizer.defaults.get("fused")
                                                                  else ""))


def flops_per_token(config, seq: int, training: bool) -> float:
    """nanoGPT's / PaLM's count: 6 N + 12 L C T per trained token (forward + backward), a third of it per scored
    token, N the weights of the matrix products (blocks and the head over the real vocabulary; not the position
    table, a lookup)."""
    c = config.n_embd
    n = config.n_layer * 12 * c * c + config.vocab_size * c
    return (6 * n + 12 * config.n_layer * c * seq) / (1 if training else 3)


def compute_bound(config, seq: int, training: bool, ceilings: dict, theirs_rate: float) -> dict:
    """The tokens/s the measured matmul rate allows, and transformers' share of it: a ratio above
    bound / transformers is out of reach of any implementation doing the same arithmetic on this machine."""
    bound = ceilings["matmul_gflops"] * 1e9 / flops_per_token(config, seq, training)
    return dict(bound_tokens_per_s=round(bound, 1), transformers_pct_of_bound=round(100 * theirs_rate / bound, 1),
                largest_possible_ratio=round(bound / theirs_rate, 2))


def decode_bytes_per_step(model, batch: int, prompt: int, new_tokens: int) -> float:
    """Bytes one decoding step reads: every weight once (the position table: one row), and the KV cache filled
    so far, at its mean length over the steps."""
    config = model.config
    element = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel() + config.n_embd
    mean_length = prompt + (new_tokens - 1) / 2
    cache = config.n_layer * 2 * batch * config.n_embd * mean_length
    return (weights + cache) * element


def decode_case(case: str, sizes: Sizes, ceilings: dict) -> dict:
    """Greedy decoding (bench/generate.py's models: the same random weights on both sides, eos disabled)."""
    generate_bench = load_bench("generate")
    from gpt2_ascend.generation import generate
    batch = 8 if "-b8-" in case else 1
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    config, ours_model, hf = generate_bench.build_models(sizes.preset, torch.device("cpu"), dtype, with_hf=True)
    prompt = torch.randint(0, config.vocab_size, (batch, sizes.decode_prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    outputs = {}

    def ours(name="ours", compile_=sizes.decode_compile):  # compiled by inductor: the warm-up call compiles it
        outputs[name] = generate(ours_model, prompt, attention_mask=mask, compile=compile_,
                                 max_new_tokens=sizes.decode_tokens, eos_token_id=None)

    def theirs():
        with torch.no_grad():
            outputs["theirs"] = hf.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=sizes.decode_tokens,
                                            do_sample=False, num_beams=1, pad_token_id=config.pad_token_id)
    seconds, cpu = interleaved(dict(ours=ours, theirs=theirs, eager=lambda: ours("eager", False)), sizes.decode_rounds)
    ours_s, theirs_s = seconds["ours"], seconds["theirs"]
    tokens = batch * sizes.decode_tokens
    bound = batch * ceilings["read_gbps"] * 1e9 / decode_bytes_per_step(ours_model, batch, sizes.decode_prompt,
                                                                        sizes.decode_tokens)
    return case_line(case, tokens / ours_s, tokens / theirs_s, round(100 * tokens / ours_s / bound, 1),
                     compiled=sizes.decode_compile, bound_tokens_per_s=round(bound, 1),
                     ours_eager=round(tokens / seconds["eager"], 2),
                     cpu_time_ratio=round(cpu["theirs"] / cpu["ours"], 3),
                     same_tokens=bool(torch.equal(outputs["ours"], outputs["theirs"])),
                     eager_same_tokens=bool(torch.equal(outputs["eager"], outputs["theirs"])))


def eval_case(case: str, sizes: Sizes, data_dir: str | None, ceilings: dict) -> dict:
    """Perplexity of WikiText-2 valid blocks: eval.perplexity() against transformers' loss, batch by batch."""
    generate_bench = load_bench("generate")
    from gpt2_ascend.eval import perplexity
    preset = case.split("-", 1)[1] if sizes.preset != "tiny" else "tiny"
    config, ours_model, hf = generate_bench.build_models(preset, torch.device("cpu"), torch.float32, with_hf=True)
    blocks = torch.from_numpy(wikitext_valid_blocks(config.n_positions, data_dir).astype("int64"))
    blocks = blocks[:sizes.eval_blocks[preset]]
    slices = [blocks[i::sizes.eval_rounds] for i in range(sizes.eval_rounds)]  # one slice per round
    losses = {"ours": [], "theirs": []}
    seq, batch = config.n_positions, sizes.eval_batch

    def ours(part):
        r = perplexity(ours_model, part, seq, batch_size=batch, precision="fp32")
        losses["ours"].append((r["loss"] * r["tokens"], r["tokens"]))

    def theirs(part):
        with torch.no_grad():
            for start in range(0, part.size(0), batch):
                ids = part[start:start + batch]
                loss = hf(input_ids=ids, labels=ids).loss
                losses["theirs"].append((loss.double().item() * ids[:, 1:].numel(), ids[:, 1:].numel()))

    ours(slices[0][:batch])  # warm-up of both sides
    theirs(slices[0][:batch])
    for kept in losses.values():
        kept.clear()
    seconds, cpu = {"ours": 0.0, "theirs": 0.0}, {"ours": 0.0, "theirs": 0.0}
    for r, part in enumerate(slices):
        order = (("ours", ours), ("theirs", theirs)) if r % 2 == 0 else (("theirs", theirs), ("ours", ours))
        for side, fn in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(part)
            seconds[side] += time.perf_counter() - start
            cpu[side] += time.process_time() - start_cpu
    mean = {side: sum(s for s, _ in v) / sum(n for _, n in v) for side, v in losses.items()}
    tokens = sum(n for _, n in losses["ours"])
    bound = compute_bound(config, seq, False, ceilings, tokens / seconds["theirs"])
    return case_line(case, tokens / seconds["ours"], tokens / seconds["theirs"],
                     round(100 * tokens / seconds["ours"] / bound["bound_tokens_per_s"], 1), **bound, tokens=tokens,
                     cpu_time_ratio=round(cpu["theirs"] / cpu["ours"], 3),
                     blocks=int(blocks.size(0)), seq_length=seq, loss_ours=round(mean["ours"], 8),
                     loss_transformers=round(mean["theirs"], 8),
                     loss_difference=float(f"{abs(mean['ours'] - mean['theirs']):.3g}"))


def wikitext_valid_blocks(seq: int, data_dir: str | None):
    """WikiText-2 valid as blocks of `seq` tokens (prepared once, then read from a cache in the temp folder)."""
    from gpt2_ascend.data.download import default_data_dir
    from gpt2_ascend.data.sources import load_token_blocks
    path = os.path.join(data_dir or default_data_dir(), "wikitext-2", "wiki.valid.tokens")
    cache = os.path.join(tempfile.gettempdir(), "gpt2_ascend_bench_cache")
    return load_token_blocks(path, max_length=seq, cache_dir=cache)


README_BLOCK = re.compile(r"## Python in ten lines\s+```python\n(.*?)```", re.S)


def startup_case(sizes: Sizes) -> dict:
    """Seconds to `import gpt2_ascend` and to run the README's Python example, each in a fresh process."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        example = README_BLOCK.search(f.read()).group(1)
    if sizes is SMOKE:  # the example's model is GPT-2 small: tiny keeps the smoke run short
        example = example.replace('from_preset("small")', 'from_preset("tiny")')
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    line = dict(case="startup", load_avg_start=load_average())
    with tempfile.TemporaryDirectory() as work:
        for name, code in (("import_s", "import gpt2_ascend"), ("readme_example_s", example)):
            samples = []
            for _ in range(sizes.startup_rounds):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], cwd=work, env=env, check=True, capture_output=True)
                samples.append(time.perf_counter() - start)
            line[name] = round(statistics.median(samples), 2)
    line["load_avg_end"] = load_average()
    return line


# ---------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------
def run_case(case: str, sizes: Sizes, args, ceilings: dict) -> dict:
    start_load = load_average()
    started = time.perf_counter()
    if case == "train-small":
        line = train_case(sizes, args, ceilings)
    elif case.startswith("decode-"):
        line = decode_case(case, sizes, ceilings)
    elif case.startswith("eval-"):
        line = eval_case(case, sizes, args.data_dir, ceilings)
    else:
        return startup_case(sizes)
    return dict(line, load_avg_start=start_load, load_avg_end=load_average(),
                wall_s=round(time.perf_counter() - started, 1))


def emit(line: dict, args):
    text = json.dumps(line)
    print(text, flush=True)
    if args.output_jsonl:
        with open(args.output_jsonl, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def table(lines: list[dict]) -> str:
    rows = ["| case | ours tokens/s | transformers tokens/s | ratio (target) | % of bound | load avg |",
            "|---|---|---|---|---|---|"]
    for line in lines:
        if "ratio" not in line:
            continue
        target = f" (>= {line['target_ratio']})" if "target_ratio" in line else ""
        bound = "-" if line["pct_of_bound"] is None else f"{line['pct_of_bound']}%"
        rows.append(f"| {line['case']} | {line['ours']:,.1f} | {line['transformers']:,.1f} | {line['ratio']:.2f}x"
                    f"{target} | {bound} | {line['load_avg_start']}-{line['load_avg_end']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cases = load_bench("generate").selected_cases(args.cases, CASES)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    import transformers
    started = time.perf_counter()
    machine = dict(case="machine", cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                   threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   mode="smoke" if args.smoke else "quick" if args.quick else "full",
                   load_avg_start=load_average(), **machine_ceilings(args.smoke))
    machine["cpu"] = cpu_model() or machine["cpu"]
    emit(machine, args)
    lines = [machine]
    for case in cases:
        line = run_case(case, sizes, args, machine)
        emit(line, args)
        lines.append(line)
    print(table(lines), file=sys.stderr)
    print(f"session: {time.perf_counter() - started:.0f} s, load average {machine['load_avg_start']} at the start, "
          f"{load_average()} at the end; ceilings: {machine['matmul_gflops']} GFLOP/s fp32 matmul, "
          f"{machine['read_gbps']} GB/s read, {machine['copy_gbps']} GB/s copy", file=sys.stderr)
    return 0


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
