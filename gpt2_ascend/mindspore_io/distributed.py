"""A MindSpore distributed checkpoint -- every rank's sliced `.ckpt` plus the run's strategy -- read as one checkpoint.

    output/checkpoint/rank_N/<prefix>_rank_N-<epoch>_<step>.ckpt     each rank's slices (the last file in name
                                                                     order is the one read, as MindSpore does)
    output/strategy/ckpt_strategy_rank_N.ckpt                        how each parameter is cut (strategy.py)

    with DistributedCheckpoint("output/checkpoint", "output/strategy") as ckpt:
        for name, entry in ckpt.entries.items(): print(name, entry.shape)     # full shapes
        wte = ckpt.load("backbone.embedding.word_embedding.embedding_table")   # merged

It answers like a CkptReader (entries, load), so whatever reads a `.ckpt` reads a distributed one. A parameter of
the strategy is merged from the slices of the lowest pipeline stage that holds it; entries the strategy does not
name (global_step and the other training counters) are read from the lowest rank that has them -- both as
MindSpore's transform_checkpoints does. Memory: the one full tensor being merged and one slice at a time.
Everything is checked before a tensor is merged: every rank file present and readable (crc too), every slice of
the shape its layout gives, no rank holding a parameter its stage does not have, and every entry the strategy does
not name equal on every rank that holds it (else it is a sliced tensor the strategy does not describe, and copying
the first rank's would be a silently wrong tensor).
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict

import torch

from .ckpt import CkptEntry, CkptError, CkptReader
from .strategy import Layout, Strategy, read_strategy

RANK_DIR = re.compile(r"rank_(\d+)")
OPEN_FILES = 16  # rank files kept open at once (a run may have thousands of ranks)


def rank_files(checkpoint_dir: str) -> dict[int, str]:
    """{rank: the .ckpt MindSpore reads for it}: the last *.ckpt of checkpoint_dir/rank_N/ in name order."""
    files = {}
    for name in os.listdir(checkpoint_dir):
        m = RANK_DIR.fullmatch(name)
        folder = os.path.join(checkpoint_dir, name)
        if m is None or not os.path.isdir(folder):
            continue
        ckpts = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt") and os.path.isfile(os.path.join(folder, f)))
        if not ckpts:
            raise FileNotFoundError(f"{folder} holds no .ckpt file: the checkpoint of rank {m.group(1)} is missing")
        files[int(m.group(1))] = os.path.join(folder, ckpts[-1])
    return dict(sorted(files.items()))


def is_distributed_checkpoint(path: str) -> bool:
    """A folder of rank_N/ folders (output/checkpoint), or one holding such a checkpoint/ folder (output/)."""
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "checkpoint")):
        path = os.path.join(path, "checkpoint")
    return any(RANK_DIR.fullmatch(n) and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def locate(path: str, strategy: str | None = None) -> tuple[str, str]:
    """(checkpoint folder, strategy path) of `path`: output/ (checkpoint/ and strategy/ inside), or the checkpoint
    folder itself with `strategy` (a folder of ckpt_strategy_rank_N.ckpt files or one strategy file)."""
    checkpoint = os.path.join(path, "checkpoint")
    if not os.path.isdir(checkpoint):
        checkpoint = path
    if strategy is None:
        inside = os.path.join(path, "strategy")
        beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "strategy")
        if checkpoint != path and os.path.isdir(inside):
            strategy = inside
        else:
            hint = f" (e.g. {beside})" if os.path.isdir(beside) else ""
            raise ValueError(f"{path} is a distributed checkpoint (rank_N folders): name its strategy with "
                             f"--src_strategy_path_or_dir{hint}, or pass the run's output folder holding both "
                             f"checkpoint/ and strategy/")
    if not os.path.exists(strategy):
        raise FileNotFoundError(f"strategy not found: {strategy}")
    return checkpoint, strategy


class DistributedCheckpoint:
    """A distributed checkpoint seen as one: `entries` (full shapes) and `load(name)` (merged), like CkptReader."""

    def __init__(self, checkpoint_dir: str, strategy: str | Strategy, verify_crc: bool = True):
        self.path = checkpoint_dir
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(f"checkpoint folder not found: {checkpoint_dir}")
        self.strategy = strategy if isinstance(strategy, Strategy) else read_strategy(strategy)
        self.files = rank_files(checkpoint_dir)
        self._check_ranks()
        self.rank_entries = {rank: self._index(rank, verify_crc) for rank in self.files}
        self.entries: dict[str, CkptEntry] = OrderedDict()
        self.source_rank: dict[str, int] = {}  # entries the strategy does not name: the rank they are read from
        self._open: OrderedDict[int, CkptReader] = OrderedDict()
        try:
            self._build_entries()
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------------------------------------------------
    # checks, before any data is read
    # -------------------------------------------------------------------------------------------------------
    def _check_ranks(self):
        want, strategy = list(range(self.strategy.ranks)), self.strategy
        have = list(self.files)
        layout = f"{strategy.stages} pipeline stage(s) x {strategy.devices} devices"
        missing = [r for r in want if r not in self.files]
        if missing:
            raise FileNotFoundError(f"the checkpoint of rank {missing[0]} is missing: {self.path} has no rank_"
                                    f"{missing[0]}/ folder, and the strategy {strategy.source} describes "
                                    f"{strategy.ranks} ranks ({layout})")
        if have != want:
            raise ValueError(f"{self.path} has checkpoints of {len(have)} ranks (rank_0 to rank_{have[-1]}) but the "
                             f"strategy {strategy.source} describes {strategy.ranks} ({layout}): is it the strategy "
                             f"of this run?")

    def _index(self, rank: int, verify_crc: bool) -> dict[str, CkptEntry]:
        try:
            with CkptReader(self.files[rank], verify_crc=verify_crc) as reader:
                return dict(reader.entries)
        except CkptError as e:
            raise CkptError(f"rank {rank}: {e}") from None

    def _stage(self, rank: int) -> int:
        return rank // self.strategy.devices

    def _build_entries(self):
        # MindSpore's order: ranks from the last to the first, each file's entries in file order; the strategy's
        # parameters first, then the rest
        seen = OrderedDict()
        for rank in reversed(self.files):
            for name in self.rank_entries[rank]:
                seen.setdefault(name, None)
        if not any(name in self.strategy.layouts for name in seen):
            raise ValueError(f"the strategy {self.strategy.source} names none of the tensors in {self.path} (it has "
                             f"{next(iter(self.strategy.layouts))!r}, the checkpoints {next(iter(seen))!r}): is it "
                             f"the strategy of this run?")
        for name in seen:
            if name in self.strategy.layouts:
                self.entries[name] = self._check_sliced(name)
        for name in seen:
            if name not in self.strategy.layouts:
                self.entries[name] = self._check_copied(name)

    def _check_sliced(self, name: str) -> CkptEntry:
        layouts = self.strategy.layouts[name]
        first = self._slice_entry(name, self.strategy.layout(name), 0)
        if first.is_map:
            raise CkptError(f"{self.files[self.rank_of(self.strategy.layout(name), 0)]}: {name!r} is a MapParameter "
                            f"(hash-table embedding), which cannot be merged")
        full = self.strategy.layout(name).full_shape(first.shape)
        for rank, entries in self.rank_entries.items():
            stage, local = divmod(rank, self.strategy.devices)
            if stage not in layouts:
                if name in entries:
                    raise ValueError(f"{self.files[rank]} holds {name!r}, which the strategy {self.strategy.source} "
                                     f"puts only in pipeline stage(s) {sorted(layouts)} (rank {rank} is in stage "
                                     f"{stage}): the strategy does not describe these checkpoints")
                continue
            layout = layouts[stage]
            entry = self._slice_entry(name, layout, local)
            want = tuple(s.stop - s.start for s in layout.region(local, full))
            if tuple(entry.shape) != want or entry.tensor_type != first.tensor_type:
                raise ValueError(f"rank {rank} holds {name!r} as {entry.tensor_type} {list(entry.shape)} but the "
                                 f"strategy {self.strategy.source} ({layout.describe()}) gives rank {rank} a "
                                 f"{first.tensor_type} {list(want)} slice of {list(full)} ({self.files[rank]}): the "
                                 f"strategy does not describe these checkpoints")
        return CkptEntry(name, full, first.tensor_type)

    def _slice_entry(self, name: str, layout: Layout, local: int) -> CkptEntry:
        rank = self.rank_of(layout, local)
        entry = self.rank_entries[rank].get(name)
        if entry is None:
            raise ValueError(f"rank {rank} has no {name!r} ({self.files[rank]}), but the strategy "
                             f"{self.strategy.source} puts it in pipeline stage {layout.stage}: a damaged or "
                             f"mismatched checkpoint")
        return entry

    def rank_of(self, layout: Layout, local: int) -> int:
        return layout.stage * self.strategy.devices + local

    def _check_copied(self, name: str) -> CkptEntry:
        holders = [rank for rank, entries in self.rank_entries.items() if name in entries]
        first = self.rank_entries[holders[0]][name]
        value = None if first.is_map else self.reader(holders[0]).read_bytes(first)
        for rank in holders[1:]:
            entry = self.rank_entries[rank][name]
            same = (entry.dims, entry.tensor_type, entry.is_map) == (first.dims, first.tensor_type, first.is_map)
            if same and value is not None:
                same = torch.equal(self.reader(rank).read_bytes(entry), value)
            if not same:
                raise ValueError(f"{name!r} is not in the strategy {self.strategy.source}, yet ranks {holders[0]} and "
                                 f"{rank} hold different values of it: a sliced tensor the strategy does not describe "
                                 f"(is it the strategy of this run?)")
        self.source_rank[name] = holders[0]
        return first

    # -------------------------------------------------------------------------------------------------------
    # reading
    # -------------------------------------------------------------------------------------------------------
    def reader(self, rank: int) -> CkptReader:
        """An open reader of a rank's file (a few kept open, the least recently used closed)."""
        if rank in self._open:
            self._open.move_to_end(rank)
            return self._open[rank]
        if len(self._open) >= OPEN_FILES:
            self._open.popitem(last=False)[1].close()
        reader = CkptReader(self.files[rank], verify_crc=False)  # checked when indexed
        if reader.entries.keys() != self.rank_entries[rank].keys():
            reader.close()
            raise CkptError(f"{self.files[rank]} changed while it was being read")
        self._open[rank] = reader
        return reader

    def load(self, name: str):
        """The full tensor `name` (merged from its slices), or an unsliced entry as its rank holds it."""
        if name not in self.entries:
            raise KeyError(f"{name!r} is not in {self.path}")
        if name not in self.strategy.layouts:
            return self.load_from_rank(name, self.source_rank[name])
        entry, layout = self.entries[name], self.strategy.layout(name)
        full = torch.empty(entry.shape, dtype=entry.dtype) if entry.dtype is not None else None
        if full is None:
            raise CkptError(f"{name!r} has type {entry.tensor_type}, which cannot be merged")
        done = set()
        for local in range(layout.devices):
            part = (layout.block(local), layout.opt_chunk(local))
            if part in done:  # a copy (a repeated device axis): read once
                continue
            done.add(part)
            full[layout.region(local, entry.shape)] = self.load_from_rank(name, self.rank_of(layout, local))
        return full

    def load_from_rank(self, name: str, rank: int):
        """`name` exactly as rank `rank` saved it (its slice, for a parameter of the strategy)."""
        return self.reader(rank).load(name)

    def held_by(self, name: str) -> list[int]:
        """The ranks whose slices a merge of `name` reads (one per distinct slice)."""
        if name not in self.strategy.layouts:
            return [self.source_rank[name]]
        layout, done, ranks = self.strategy.layout(name), set(), []
        for local in range(layout.devices):
            part = (layout.block(local), layout.opt_chunk(local))
            if part not in done:
                done.add(part)
                ranks.append(self.rank_of(layout, local))
        return ranks

    def close(self):
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_mindspore(path: str, strategy: str | None = None, verify_crc: bool = True):
    """A reader of MindSpore weights: a .ckpt file (CkptReader) or a distributed checkpoint (DistributedCheckpoint:
    output/, or its checkpoint/ folder with `strategy`)."""
    if os.path.isfile(path):
        if strategy is not None:
            raise ValueError(f"{path} is one .ckpt file: a strategy ({strategy}) is for a distributed checkpoint's "
                             f"folder (output/checkpoint, rank_N/ inside)")
        return CkptReader(path, verify_crc=verify_crc)
    if not is_distributed_checkpoint(path):
        raise FileNotFoundError(f"{path} is neither a .ckpt file nor a distributed checkpoint (output/ with "
                                f"checkpoint/rank_N/ and strategy/ inside, or output/checkpoint)")
    return DistributedCheckpoint(*locate(path, strategy), verify_crc=verify_crc)

