"""Optimizer step time: MindSpore's AdamWeightDecay rule (train/optim.py use_mindspore_rule: torch's AdamW
kernels with per-step lr / eps / weight decay) against torch's AdamW itself, on the parameters of a GPT-2.

Variants, each over MindFormers' two parameter groups (decay on 2-D weights, none on biases / norms):
  torch_foreach / torch_fused        torch.optim.AdamW, bias-corrected (what optimizer.type=AdamW runs)
  mindspore_foreach / mindspore_fused the same kernels computing MindSpore's rule (FusedAdamWeightDecay & co.)
  mindspore_handwritten               the rule written directly with torch._foreach_* ops (7 passes), for scale
plus the time the rule's hooks add to a step by themselves (host arithmetic per parameter group).
Steps run in interleaved rounds (one of each variant per round) on the same parameters, so load from other
processes falls on all alike. One JSON line per variant: milliseconds per step (median of --steps), and the
ratios to torch's same kernel and to torch's foreach AdamW.

    python bench/optimizer.py --device cpu --preset small        # GPT-2 small, 124M parameters
    python bench/optimizer.py --device cuda --preset medium
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Optimizer step time: MindSpore's rule vs torch's AdamW.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="a GPT2Config preset (tiny, small, medium, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="torch_foreach,mindspore_foreach,torch_fused,mindspore_fused,"
                                         "mindspore_handwritten")
    p.add_argument("--output_jsonl", help="append the JSON lines here too")
    return p.parse_args(argv)


def hook_overhead_us(model, device: torch.device, steps: int = 2000) -> float:
    """What use_mindspore_rule adds to a step by itself: its step pre- and post-hooks (host arithmetic per
    parameter group, no kernel), called directly, microseconds per step (best of 5)."""
    opt = build("mindspore_fused" if device.type != "cpu" else "mindspore_foreach", model, device)
    hooks = list(opt._optimizer_step_pre_hooks.values()) + list(opt._optimizer_step_post_hooks.values())
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            for hook in hooks:
                hook(opt, (), {})
        samples.append((time.perf_counter() - start) / steps * 1e6)
    return min(samples)


class HandwrittenAdamWeightDecay(torch.optim.Optimizer):
    """MindSpore's rule with foreach ops: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p <- p - lr wd p - lr m / (sqrt(v) + eps). A yardstick only (train/optim.py reuses torch's kernels)."""

    def __init__(self, groups, lr, betas, eps):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(m=torch.zeros_like(p), v=torch.zeros_like(p))
            m = [self.state[p]["m"] for p in params]
            v = [self.state[p]["v"] for p in params]
            b1, b2 = group["betas"]
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_addcdiv_(params, m, denom, value=-group["lr"])


def build(variant: str, model, device: torch.device):
    from gpt2_ascend.train.optim import param_groups, use_mindspore_rule
    groups = [dict(g, params=list(g["params"])) for g in param_groups(model, 0.1)]
    for g in groups:
        g.pop("names")
    kind, impl = variant.split("_", 1)
    if impl == "handwritten":
        return HandwrittenAdamWeightDecay(groups, 1e-4, (0.9, 0.95), 1e-8)
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **{impl: True})
    return use_mindspore_rule(opt) if kind == "mindspore" else opt


def time_step(opt, device: torch.device) -> float:
    from gpt2_ascend.device import synchronize  # CUDA and NPU kernels are asynchronous: wait on both sides
    synchronize(device)
    start = time.perf_counter()
    opt.step()
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset(args.preset)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in model.parameters())
    variants = args.variants.split(",")
    optimizers = {v: build(v, model, device) for v in variants}
    times = {v: [] for v in variants}
    # interleaved rounds (one step of each variant per round) so that load from other processes hits all alike
    for i in range(args.warmup + args.steps):
        for v in variants:
            ms = time_step(optimizers[v], device)
            if i >= args.warmup:
                times[v].append(ms)
    results = {v: statistics.median(t) for v, t in times.items()}
    lines = [dict(variant="mindspore_rule_hooks_alone", device=args.device,
                  us_per_step=round(hook_overhead_us(model, device), 1))]
    for variant, ms in results.items():
        impl = variant.split("_", 1)[1]
        line = dict(variant=variant, preset=args.preset, params=n, device=args.device,
                    threads=torch.get_num_threads(), ms_per_step=round(ms, 2))
        if f"torch_{impl}" in results and variant != f"torch_{impl}":
            line["vs_torch_same_kernel"] = round(ms / results[f"torch_{impl}"], 3)
        if "torch_foreach" in results and variant != "torch_foreach":
            line["vs_torch_foreach"] = round(ms / results["torch_foreach"], 3)
        lines.append(line)
    for line in lines[1:] + lines[:1]:
        print(json.dumps(line), flush=True)
        if args.output_jsonl:
            with open(args.output_jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
