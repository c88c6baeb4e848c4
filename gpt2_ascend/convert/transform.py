"""MindFormers' tools/transform_ckpt.py without MindSpore: a distributed checkpoint merged into one `.ckpt`, or cut
for another layout.

    transform_ckpt("output/strategy", "output/checkpoint", "target", prefix="gpt2")
        -> target/rank_0/gpt20.ckpt: every parameter at its full shape (all pipeline stages), then the entries the
           strategy does not name (global_step, ...) from the first rank; the bytes MindSpore's merge writes
    transform_ckpt("output/strategy", "output/checkpoint", "target", "gpt2", dst_ckpt_strategy="job/strategy")
        -> target/rank_N/gpt2N.ckpt for every rank of the destination layout (what MindSpore's transform_checkpoints
           and load_distributed_checkpoint read)
    transform_ckpt(None, "full", "target", "gpt2", dst_ckpt_strategy=...)    an unsliced checkpoint (full/rank_0/*.ckpt,
                                                                           or a .ckpt file) cut for a cluster layout

Memory: one full tensor (the one being merged or cut) plus one slice; the output is written tensor by tensor. Every
check (rank files, strategies, shapes, the destination's cuts) runs before the output folder is touched, and the
output appears whole or not at all (fileio.atomic_directory).
"""
from __future__ import annotations

import math
import os
import re

from ..fileio import atomic_directory
from ..mindspore_io.ckpt import CkptReader, CkptWriter
from ..mindspore_io.distributed import RANK_DIR, DistributedCheckpoint, rank_files
from ..mindspore_io.strategy import Strategy, StrategyError, read_strategy

PREFIX = re.compile(r"[\w.-]*")


def open_source(src_ckpt_strategy: str | None, src_ckpt_dir: str, verify_crc: bool):
    """The source as a reader: a distributed checkpoint with its strategy, or (no strategy) one unsliced checkpoint:
    src_ckpt_dir/rank_0/*.ckpt as MindSpore expects it, or a .ckpt file."""
    if src_ckpt_strategy:
        return DistributedCheckpoint(src_ckpt_dir, src_ckpt_strategy, verify_crc=verify_crc)
    if os.path.isfile(src_ckpt_dir):
        return CkptReader(src_ckpt_dir, verify_crc=verify_crc)
    if not os.path.isdir(src_ckpt_dir):
        raise FileNotFoundError(f"--src_ckpt_dir not found: {src_ckpt_dir}")
    files = rank_files(src_ckpt_dir)
    if list(files) != [0]:
        raise ValueError(f"{src_ckpt_dir} holds the checkpoints of {len(files)} ranks but no --src_ckpt_strategy was "
                         f"given: name the strategy of the run that wrote them (output/strategy/)")
    return CkptReader(files[0], verify_crc=verify_crc)


def check_output_dir(dst_ckpt_dir: str):
    """The output folder is new, empty, or an earlier transform's (rank_N folders only): anything else is someone's
    data, and refusing keeps it."""
    if os.path.isfile(dst_ckpt_dir):
        raise ValueError(f"--dst_ckpt_dir {dst_ckpt_dir} is a file: pass a folder")
    if os.path.isdir(dst_ckpt_dir):
        others = [n for n in os.listdir(dst_ckpt_dir) if not (RANK_DIR.fullmatch(n) and
                                                               os.path.isdir(os.path.join(dst_ckpt_dir, n)))]
        if others:
            raise ValueError(f"--dst_ckpt_dir {dst_ckpt_dir} already holds {others[0]!r}, which a transform does not "
                             f"write: pass a new or empty folder (one holding only an earlier transform's rank_N "
                             f"folders is replaced whole)")


def destination_plan(source, dst: Strategy) -> dict[str, list[tuple[int, tuple]]]:
    """{name: [(destination rank, region of the full tensor)]} for every source tensor the destination cuts, checked
    (shapes that do not divide are refused here, before anything is read)."""
    plan = {}
    for name, entry in source.entries.items():
        if name not in dst.layouts:
            continue
        plan[name] = []
        for stage, layout in dst.layouts[name].items():
            for local in range(dst.devices):
                try:
                    region = layout.region(local, tuple(entry.shape))
                except StrategyError as e:
                    raise StrategyError(f"the destination strategy cannot cut {name!r} of shape {list(entry.shape)}: "
                                        f"{e}") from None
                plan[name].append((stage * dst.devices + local, region))
    return plan


def transform_ckpt(src_ckpt_strategy: str | None, src_ckpt_dir: str, dst_ckpt_dir: str, prefix: str = "checkpoint_",
                   dst_ckpt_strategy: str | None = None, crc: bool = True, verify_crc: bool = True,
                   progress=None) -> dict:
    """MindFormers' transform_ckpt (see the module's doc). Returns a summary: ranks written, files, tensors merged /
    cut / copied, and what the destination leaves out."""
    if not PREFIX.fullmatch(prefix):
        raise ValueError(f"--prefix {prefix!r} must be a file-name prefix (letters, digits, '_', '-', '.')")
    if not src_ckpt_strategy and not dst_ckpt_strategy:
        raise ValueError("nothing to transform: pass --src_ckpt_strategy (merge a distributed checkpoint) and/or "
                         "--dst_ckpt_strategy (cut a checkpoint for a layout)")
    check_output_dir(dst_ckpt_dir)
    dst = read_strategy(dst_ckpt_strategy) if dst_ckpt_strategy else None
    with open_source(src_ckpt_strategy, src_ckpt_dir, verify_crc) as source:
        sliced_in_source = set(source.strategy.layouts) if isinstance(source, DistributedCheckpoint) else set()
        plan = destination_plan(source, dst) if dst else None
        if plan is not None and not plan:
            raise ValueError(f"the destination strategy {dst_ckpt_strategy} names none of the tensors of "
                             f"{src_ckpt_dir}: is it the strategy of a job running this model?")
        names = [n for n, e in source.entries.items() if not e.is_map]
        if plan is not None:  # the destination's tensors, then what no strategy names, copied to every rank
            left_out = [n for n in names if n in sliced_in_source and n not in plan]
            names = [n for n in names if n in plan] + [n for n in names if n not in plan and n not in left_out]
        else:
            left_out = []
        ranks = list(range(dst.ranks)) if dst else [0]
        size = output_bytes(source, names, plan, len(ranks))
        with atomic_directory(dst_ckpt_dir, size=size, what=f"the transformed checkpoint {dst_ckpt_dir}",
                              whole=True) as tmp:
            writers = {r: CkptWriter(os.path.join(tmp, f"rank_{r}", f"{prefix}{r}.ckpt"), crc=crc) for r in ranks}
            try:
                for name in progress(names) if progress else names:
                    value = source.load(name)
                    if plan is None:
                        writers[0].write(name, value)
                    elif name in plan:
                        for rank, region in plan[name]:
                            writers[rank].write(name, value[region].contiguous())
                    else:
                        for writer in writers.values():
                            writer.write(name, value)
                    del value
                for writer in writers.values():
                    writer.close()
            except BaseException:
                for writer in writers.values():
                    writer.abort()  # the temporary folder goes too; a full disk is reported by atomic_directory
                raise
        files = [os.path.join(dst_ckpt_dir, f"rank_{r}", f"{prefix}{r}.ckpt") for r in ranks]
        return {"output_dir": dst_ckpt_dir, "ranks": len(ranks), "files": files, "tensors": len(names),
                "merged": sum(1 for n in names if n in sliced_in_source),
                "cut": len(plan) if plan is not None else 0,
                "copied": sum(1 for n in names if n not in sliced_in_source and (plan is None or n not in plan)),
                "left_out": left_out,
                "not_in_source": sorted(set(dst.layouts) - set(source.entries)) if dst else []}


def output_bytes(source, names, plan, ranks: int) -> int:
    """About what the output holds, for a full disk's one line."""
    def nbytes(entry, shape):
        return math.prod(shape) * (entry.dtype.itemsize if entry.dtype is not None else 4)
    total = 0
    for name in names:
        entry = source.entries[name]
        if plan is not None and name in plan:
            total += sum(nbytes(entry, [s.stop - s.start for s in region]) for _, region in plan[name])
        else:
            total += nbytes(entry, entry.shape) * (ranks if plan is not None else 1)
    return total
