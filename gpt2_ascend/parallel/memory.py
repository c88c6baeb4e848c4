"""Memory per device for a model under a parallel layout: a planning estimate, not a measurement.

    python -m gpt2_ascend.parallel.memory --preset 13b --data_parallel 4 --model_parallel 8 \\
        --optimizer_shard --recompute full --batch_size 2 --seq_length 2048

Model states (AdamW, fp32 master weights): 4 bytes of weights + 4 of gradients + 8 of the two moments
per parameter, plus the bf16/fp16 copies autocast keeps for the backward (2 bytes) under mixed precision.
Tensor parallel divides the block and embedding parameters by T (norms and position embedding stay
whole); pipeline parallel gives each stage n_layer / P blocks (the first stage also holds the embeddings,
the last the head); optimizer_shard (FSDP2) divides all model states by D (the 16-bit copies are gathered
one block at a time).

Activations per block follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") with flash attention (no s x s score matrix kept), in 16-bit bytes:
    no recompute:  s*b*h*(10 + 24/T)   (34/T with sequence parallel)
    selective:     s*b*h*(10 + 16/T)   (matmul outputs kept, norms / gelu / dropout recomputed)
    full:          2*s*b*h per block (its input), plus one block's working set during its recompute.
A pipeline stage holds up to min(P, micro-batches) micro-batches in flight (1F1B).
"""
from __future__ import annotations

import argparse

from ..budget import block_parameter_split
from ..config import GPT2Config
from .mesh import ParallelConfig

GIB = 1024 ** 3


def parameter_split(config: GPT2Config, layout: ParallelConfig) -> tuple[float, float]:
    """(parameters on the busiest device, of which TP-split) for the first pipeline stage."""
    h, layers, t, p = config.n_embd, config.n_layer, layout.model_parallel, layout.pipeline_stage
    block_split, block_whole = block_parameter_split(config)  # the budget's count (budget.parameter_count)
    blocks = -(-layers // p)
    embed_split = config.padded_vocab_size * h
    embed_whole = config.n_positions * h + 2 * h  # position embedding, final norm
    split = blocks * block_split + embed_split
    whole = blocks * block_whole + embed_whole
    return split / t + whole, split / t


def estimate(config: GPT2Config, layout: ParallelConfig, batch_size: int, seq_length: int,
             precision: str = "bf16") -> dict:
    """Bytes per device (GiB) for model states, activations and their sum."""
    params, _ = parameter_split(config, layout)
    states = params * 16
    if layout.optimizer_shard and layout.data_parallel > 1:
        states /= layout.data_parallel
    copies = params * 2 if precision in ("bf16", "fp16") else 0.0
    if layout.optimizer_shard and layout.data_parallel > 1:
        copies = copies / layout.data_parallel + copies / max(1, -(-config.n_layer // layout.pipeline_stage))
    s, b, h, t = seq_length, batch_size, config.n_embd, layout.model_parallel
    bytes16 = 2 if precision in ("bf16", "fp16") else 4
    micro_b = b / max(1, layout.micro_batch_num) if layout.pipeline_stage > 1 else b
    per_block_full = s * micro_b * h * (34 / t if layout.sequence_parallel else 10 + 24 / t) * bytes16 / 2
    if layout.recompute == "full":
        per_block = 2 * s * micro_b * h * bytes16 / 2 / (t if layout.sequence_parallel else 1)
        extra = per_block_full
    elif layout.recompute == "selective":
        per_block = s * micro_b * h * (34 / t if layout.sequence_parallel else 10 + 16 / t) * bytes16 / 2
        extra = 0.0
    else:
        per_block, extra = per_block_full, 0.0
    blocks = -(-config.n_layer // layout.pipeline_stage)
    in_flight = min(layout.pipeline_stage, layout.micro_batch_num) if layout.pipeline_stage > 1 else 1
    logits = s * micro_b * config.padded_vocab_size * (bytes16 + 4)  # 16-bit logits + fp32 softmax in the loss
    activations = (per_block * blocks + extra) * in_flight + logits
    total = states + copies + activations
    return dict(params_per_device=params, model_states_gib=states / GIB, weight_copies_gib=copies / GIB,
                activations_gib=activations / GIB, total_gib=total / GIB)


def main(argv=None):
    p = argparse.ArgumentParser(description="Estimate memory per device for a GPT-2 shape and layout.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="13b")
    p.add_argument("--data_parallel", type=int, default=1)
    p.add_argument("--model_parallel", type=int, default=1)
    p.add_argument("--pipeline_stage", type=int, default=1)
    p.add_argument("--micro_batch_num", type=int, default=1)
    p.add_argument("--optimizer_shard", action="store_true")
    p.add_argument("--sequence_parallel", action="store_true")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--batch_size", type=int, default=1, help="per data-parallel rank")
    p.add_argument("--seq_length", type=int, default=None)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    a = p.parse_args(argv)
    config = GPT2Config.from_preset(a.preset, pad_vocab_size_multiple=64)
    layout = ParallelConfig(data_parallel=a.data_parallel, model_parallel=a.model_parallel,
                            pipeline_stage=a.pipeline_stage, micro_batch_num=a.micro_batch_num,
                            optimizer_shard=a.optimizer_shard, recompute=a.recompute,
                            sequence_parallel=a.sequence_parallel)
    r = estimate(config, layout, a.batch_size, a.seq_length or config.n_positions, a.precision)
    print(f"{a.preset}: {r['params_per_device'] / 1e9:.2f}B parameters per device; model states "
          f"{r['model_states_gib']:.1f} GiB + 16-bit copies {r['weight_copies_gib']:.1f} GiB + activations "
          f"{r['activations_gib']:.1f} GiB = {r['total_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
