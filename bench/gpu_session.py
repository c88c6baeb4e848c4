"""Every GPU check and benchmark of docs/performance.md in one call, most important first, inside a time budget.

A GPU machine is lent for minutes at a time, so one prepared run has to do it all: the card's two ceilings
(bf16 matmul rate, copy bandwidth), the training and generation benchmarks with targets, the 13B shape, the
GPU tests, then the report-only shapes while time is left. Each step runs as its own process (a crash or an
out-of-memory in one does not lose the others) with a timeout; a step that cannot finish inside what is left
of --budget_s is skipped and says so. Everything lands in three files under --out (default: $OUT, else
./gpu_session), appended as each step ends: results.jsonl (every JSON line, tagged with its step),
session.log (every step's output) and summary.jsonl (one line per step: rc, seconds). A failing step's last
lines are printed; the last thing printed is a table to paste into docs/performance.md.

    python3 bench/gpu_session.py                                      # everything that fits in 540 s
    python3 bench/gpu_session.py --only gpu-tests,train-small-blocks --budget_s 200   # a second call
    python bench/gpu_session.py --list                                # the steps, their order and timeouts
    python bench/gpu_session.py --smoke                               # the same flow on CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Step:
    name: str
    argv: list  # after the python executable
    timeout_s: int  # the most it may take
    min_s: int  # not started with less than this left
    smoke_argv: list | None = None  # the CPU smoke version (None: not part of --smoke)


def bench(script: str, *args: str) -> list:
    return [os.path.join(REPO, "bench", script), *args]


TRAIN_SMOKE = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "1",
               "--baseline_eager"]
STEPS = [
    Step("ceilings", [os.path.abspath(__file__), "--ceilings"], 60, 20, [os.path.abspath(__file__), "--ceilings"]),
    Step("train-small", bench("train.py", "--preset", "small", "--batch", "16", "--seq", "1024", "--compile",
                              "--steps", "30", "--warmup", "5"), 240, 150, bench("train.py", *TRAIN_SMOKE)),
    Step("gen-small", bench("generate.py", "--cases", "small-b1,small-b32", "--repeats", "2"), 180, 90,
         bench("generate.py", "--device", "cpu", "--cases", "tiny-b2", "--new_tokens", "4", "--repeats", "1")),
    Step("gen-13b", bench("generate.py", "--cases", "13b-b1", "--repeats", "2"), 180, 90),
    Step("train-13b-lora", bench("train.py", "--preset", "13b", "--lora", "--batch", "1", "--seq", "2048",
                                 "--compile", "--compile_scope", "blocks", "--baseline_compile_scope", "blocks",
                                 "--steps", "10", "--warmup", "2"), 240, 150,
         bench("train.py", *TRAIN_SMOKE, "--lora", "--compile", "--compile_scope", "blocks")),
    Step("gpu-tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu", "-rs",
                       *[os.path.join(REPO, "tests", f) for f in ("test_model_parity.py", "test_generation.py",
                                                                   "test_speed.py", "test_train_trainer.py",
                                                                   "test_mindformers_reference.py")]],
         240, 90, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu", "-rs",
                   os.path.join(REPO, "tests", "test_model_parity.py")]),
    # which defaults are fastest (ours only): full recompute for the 13B; the plain head and per-block
    # compile for the small shape
    Step("train-13b-lora-full", bench("train.py", "--preset", "13b", "--lora", "--batch", "1", "--seq", "2048",
                                      "--compile", "--compile_scope", "blocks", "--recompute", "full", "--no_hf",
                                      "--steps", "10", "--warmup", "2"), 150, 90),
    Step("train-small-plain-head", bench("train.py", "--preset", "small", "--batch", "16", "--seq", "1024",
                                         "--compile", "--loss_chunk_size", "0", "--no_hf", "--steps", "10",
                                         "--warmup", "3"), 150, 70),
    Step("train-small-blocks", bench("train.py", "--preset", "small", "--batch", "16", "--seq", "1024",
                                     "--compile", "--compile_scope", "blocks", "--no_hf", "--steps", "10",
                                     "--warmup", "3"), 150, 70),
    # MindSpore's optimizer rule in torch's fused kernel vs torch's AdamW (docs/training.md, MindFormers' numerics)
    Step("optimizer-small", bench("optimizer.py", "--device", "cuda", "--preset", "small", "--steps", "20",
                                  "--warmup", "3"), 90, 30,
         bench("optimizer.py", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "0")),
    *[Step(f"train-{preset}", bench("train.py", "--preset", preset, "--batch", "8", "--compile",
                                    "--compile_scope", "blocks", "--no_hf", "--steps", "5", "--warmup", "2",
                                    "--find_max_batch"), 240, 90) for preset in ("medium", "large", "xl")],
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="All GPU checks and benchmarks in one timed call.", epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget_s", type=float, default=540.0, help="wall-clock budget for all steps together")
    p.add_argument("--only", help="comma-separated step names (see --list)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_session", help="logs and JSON lines go here")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    p.add_argument("--smoke", action="store_true", help="run the steps that have one as a CPU smoke test")
    p.add_argument("--ceilings", action="store_true", help="only measure the card's matmul rate and copy bandwidth")
    p.add_argument("--output_jsonl", help="with --ceilings: append its JSON line here too")
    return p.parse_args(argv)


def chosen_steps(args) -> list[Step]:
    steps = [s for s in STEPS if s.smoke_argv is not None] if args.smoke else list(STEPS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in STEPS}]
        if unknown:
            raise ValueError(f"unknown step {unknown[0]!r}: use {', '.join(s.name for s in STEPS)}")
        steps = [s for s in steps if s.name in names]
    return steps


def run_step(step: Step, argv: list, work_dir: str, timeout_s: float) -> dict:
    """Run one step as its own process; its log and JSON lines stay in work_dir (the device machine returns at
    most 8 files from $OUT, so main() appends them to session.log and results.jsonl there)."""
    jsonl = os.path.join(work_dir, f"{step.name}.jsonl")
    log = os.path.join(work_dir, f"{step.name}.log")
    script = argv[0].endswith(".py")  # bench/*.py and --ceilings take --output_jsonl; pytest does not
    cmd = [sys.executable, *argv, *(["--output_jsonl", jsonl] if script else [])]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, env=env,
                                cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = []
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    return dict(step=step.name, rc=rc, seconds=round(time.perf_counter() - start, 1), lines=lines, log=log)


def log_tail(path: str, n: int) -> list[str]:
    with open(path, errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    return [line[:300] for line in lines[-n:]]


def keep(result: dict, out_dir: str):
    """Append a finished step to the session's three files in out_dir."""
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        for line in result["lines"]:
            f.write(json.dumps(dict(step=result["step"], **line)) + "\n")
    if result["log"]:
        with open(result["log"], errors="replace") as src, open(os.path.join(out_dir, "session.log"), "a") as dst:
            dst.write(f"\n===== {result['step']}: rc {result['rc']} in {result['seconds']} s =====\n")
            dst.write(src.read())
    with open(os.path.join(out_dir, "summary.jsonl"), "a") as f:
        f.write(json.dumps({k: v for k, v in result.items() if k != "log"}) + "\n")


def table(results: list[dict]) -> str:
    rows = ["| step | rc | s | impl | case | tokens/s | ratio | MFU | peak GiB | compile/warm-up s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        measured = [line for line in r["lines"] if "tokens_per_s" in line]
        ratios = [line for line in r["lines"] if "ratio" in line or "ratio_vs_transformers" in line]
        if not measured:
            rows.append(f"| {r['step']} | {r['rc']} | {r['seconds']} | - | - | - | - | - | - | - |")
        for line in measured:
            case = line.get("case") or f"{line.get('preset')} b{line.get('batch')}x{line.get('seq')}"
            ratio = line.get("ratio_vs_transformers") or next((x["ratio"] for x in ratios if "ratio" in x), "-")
            ratio = ratio if line.get("impl") == "gpt2_ascend" else "-"
            rows.append(f"| {r['step']} | {r['rc']} | {r['seconds']} | {line.get('impl')} | {case} | "
                        f"{line['tokens_per_s']} | {ratio} | {line.get('mfu', '-')} | "
                        f"{line.get('peak_mem_gib', line.get('peak_memory_gb', '-'))} | {line.get('warmup_s', '-')} |")
        for line in r["lines"]:
            if "largest_batch" in line:
                rows.append(f"| {r['step']} | | | largest batch | {line['preset']} x{line['seq']} | "
                            f"{line['largest_batch']} | | | | |")
    return "\n".join(rows)


def ceilings() -> dict:
    """The card's two measured ceilings (METHOD: measure them, do not trust the datasheet): a large bf16
    matmul's rate and a large device-to-device copy's bandwidth (bytes read + written)."""
    import torch
    if not torch.cuda.is_available():
        return dict(ceilings="skipped: no CUDA")
    dev = torch.device("cuda")
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    src = torch.randn(2 ** 30 // 2, device=dev, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)

    def timed(fn, reps):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / reps

    mm_s = timed(lambda: a @ b, 50)
    copy_s = timed(lambda: dst.copy_(src), 50)
    line = dict(card=torch.cuda.get_device_name(dev), torch=torch.__version__, cuda=torch.version.cuda,
                bf16_matmul_tflops=round(2 * n ** 3 / mm_s / 1e12, 1),
                copy_gb_s=round(2 * src.numel() * src.element_size() / copy_s / 1e9, 1))
    for name in ("transformers", "peft"):
        try:
            line[name] = __import__(name).__version__
        except ImportError:
            line[name] = None
    return line


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ceilings:
        line = json.dumps(ceilings())
        print(line)
        if args.output_jsonl:
            with open(args.output_jsonl, "a") as f:
                f.write(line + "\n")
        return 0
    try:
        steps = chosen_steps(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for s in STEPS:
            print(f"{s.name:22s} timeout {s.timeout_s:4d} s  (needs {s.min_s} s left)  {' '.join(s.argv[-12:])}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name in ("results.jsonl", "session.log", "summary.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.out, name))
    work_dir = tempfile.mkdtemp(prefix="gpu_session_")
    start = time.perf_counter()
    results = []
    for step in steps:
        left = args.budget_s - (time.perf_counter() - start)
        if left < step.min_s:
            print(f"[{step.name}] skipped: {left:.0f} s left, it needs {step.min_s} s", flush=True)
            result = dict(step=step.name, rc="skipped", seconds=0, lines=[], log="")
        else:
            argv = step.smoke_argv if args.smoke else step.argv
            result = run_step(step, argv, work_dir, min(step.timeout_s, left))
            print(f"[{step.name}] rc {result['rc']} in {result['seconds']} s, {len(result['lines'])} JSON lines",
                  flush=True)
            if result["rc"] != 0:  # stdout is the one channel that always comes back: show why
                print("\n".join("    " + line for line in log_tail(result["log"], 25)), flush=True)
        keep(result, args.out)
        results.append(result)
    print(table(results))
    return 0 if all(r["rc"] in (0, "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
