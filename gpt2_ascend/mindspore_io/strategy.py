"""MindSpore's parallel strategy files (`output/strategy/ckpt_strategy_rank_N.ckpt`): how each parameter of a
distributed run is cut across the devices, read without MindSpore.

A strategy file is a protobuf `ParallelStrategyMap` (node_strategy.proto, beside this module). What its fields
mean, read from MindSpore 2.10's parser and its transform_checkpoints (mindspore/parallel/_parallel_serialization.py,
_tensor.py) and confirmed by its merge of the fixtures in ../shared/mindspore_distributed:

- `parallel_strategy_item[0].parallel_strategys.stage`: the pipeline stage the file describes.
- per parameter (`parallel_layout_item`): `dev_matrix` -- the devices of one stage as a row-major grid, a rank's
  global number being `stage * N + local` with N = prod(dev_matrix); `tensor_map[i] = k` -- tensor dim i is cut
  into dev_matrix[-1 - k] blocks (k counts device axes from the right), the block a device holds being its
  coordinate on that axis, -1 = not cut; a dim cut over several axes is written as one TensorMap per tensor dim
  listing its axes, the first the major one; axes the map does not name hold copies (MindSpore's "repeated"
  axes). `opt_weight_shard_size = s > 0` (optimizer sharding): the block is cut again along dim 0 into s chunks,
  a device holding chunk `(local // opt_weight_shard_step) % s` (-1: s = the number of copies). `param_split_shape`:
  dim-0 sizes of the slices when the cut is uneven, one per slice. `field` > 0 (field-sliced embeddings of
  host-device training) is not read here: refused by name.
- MindSpore's merge_pipeline_strategys writes several stages' files into one, each parameter renamed
  `<stage>-<name>`. A parameter can live in several stages (the word embedding, tied to the head in the last one),
  with a layout per stage; merging takes it from the lowest stage, as MindSpore does.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from .proto import proto_messages

MERGED_NAME = re.compile(r"(\d+)-(.+)")  # merge_pipeline_strategys' "<stage>-<name>"
# MindFormers' tools/transform_ckpt.py writes its merged strategy into the strategy folder it was given (and deletes
# it before merging again): such a file in a folder is MindFormers' leftover, not a rank's strategy
MERGED_FILE = re.compile(r"merged_ckpt_strategy.*\.ckpt")


class StrategyError(ValueError):
    """A strategy file that cannot be read, or a layout this project cannot interpret."""


@dataclass(frozen=True)
class Layout:
    """How one parameter is cut across the devices of one pipeline stage."""
    name: str
    stage: int
    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]  # per tensor dim, the device axes (counted from the right) cutting it
    split_shape: tuple[int, ...] = ()  # param_split_shape: dim-0 size of each slice when uneven; () = even
    opt_step: int = 0
    opt_size: int = 0
    source: str = ""  # the strategy file, for errors

    @property
    def devices(self) -> int:
        return math.prod(self.dev_matrix)

    def axis(self, k: int) -> int:
        """The position in dev_matrix of device axis k (counted from the right)."""
        return len(self.dev_matrix) - 1 - k

    @property
    def splits(self) -> tuple[int, ...]:
        """Blocks per tensor dim."""
        return tuple(math.prod(self.dev_matrix[self.axis(k)] for k in axes) for axes in self.tensor_map)

    def coordinates(self, local: int) -> list[int]:
        """A device's coordinates in the row-major dev_matrix."""
        coords = []
        for size in reversed(self.dev_matrix):
            coords.append(local % size)
            local //= size
        return coords[::-1]

    def block(self, local: int) -> tuple[int, ...]:
        """The block index, per tensor dim, that device `local` holds (the first axis of a dim is the major one)."""
        coords, index = self.coordinates(local), []
        for axes in self.tensor_map:
            b = 0
            for k in axes:
                b = b * self.dev_matrix[self.axis(k)] + coords[self.axis(k)]
            index.append(b)
        return tuple(index)

    @property
    def opt_chunks(self) -> int:
        """Chunks of dim 0 under optimizer sharding (1: not sharded)."""
        if self.opt_size == -1:  # MindSpore: over every copy of the block
            return self.devices // math.prod(self.splits)
        return max(self.opt_size, 1)

    def opt_chunk(self, local: int) -> int:
        return (local // self.opt_step) % self.opt_chunks if self.opt_chunks > 1 else 0

    def describe(self) -> str:
        """The fields, as the strategy file has them, for one-line errors."""
        tmap = [list(a) if len(a) != 1 else a[0] for a in self.tensor_map]
        tmap = [-1 if a == [] else a for a in tmap]
        text = f"dev_matrix {list(self.dev_matrix)}, tensor_map {tmap}"
        if self.split_shape:
            text += f", param_split_shape {list(self.split_shape)}"
        if self.opt_size:
            text += f", opt_weight_shard_step {self.opt_step}, opt_weight_shard_size {self.opt_size}"
        return text

    # -------------------------------------------------------------------------------------------------------
    # where a device's slice lies in the full tensor
    # -------------------------------------------------------------------------------------------------------
    def full_shape(self, slice_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The full tensor's shape, from the shape of the slice device 0 holds."""
        self.check_rank(len(slice_shape))
        if not slice_shape:
            return ()
        shape = [s * n for s, n in zip(slice_shape, self.splits)]
        if self.split_shape:
            shape[0] = sum(self._dim0_sizes())
        else:
            shape[0] *= self.opt_chunks
        return tuple(shape)

    def region(self, local: int, full_shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of a tensor of `full_shape` that device `local` holds."""
        self.check_rank(len(full_shape))
        block = self.block(local)
        region = []
        for dim, (size, n, b) in enumerate(zip(full_shape, self.splits, block)):
            if dim == 0 and self.split_shape:
                sizes = self._dim0_sizes()
                start = sum(sizes[:b])
                region.append(slice(start, start + sizes[b]))
                continue
            if size % n:
                raise StrategyError(f"{self.name}: dim {dim} of size {size} cannot be cut into {n} blocks "
                                    f"({self.describe()}; strategy {self.source})")
            step = size // n
            start, stop = b * step, (b + 1) * step
            if dim == 0 and self.opt_chunks > 1:
                if step % self.opt_chunks:
                    raise StrategyError(f"{self.name}: a block of {step} rows cannot be cut into "
                                        f"{self.opt_chunks} optimizer shards ({self.describe()}; strategy "
                                        f"{self.source})")
                chunk = step // self.opt_chunks
                start += self.opt_chunk(local) * chunk
                stop = start + chunk
            region.append(slice(start, stop))
        return tuple(region)

    def _dim0_sizes(self) -> list[int]:
        """param_split_shape as the dim-0 size of each dim-0 block (it lists one size per slice, in the order of
        the slices' row-major index over the blocks of every dim)."""
        splits = self.splits
        per_block = {}
        for index, size in enumerate(self.split_shape):
            per_block.setdefault(index // math.prod(splits[1:]), set()).add(size)
        return [per_block[b].pop() for b in range(splits[0])]

    def check_rank(self, ndim: int):
        if len(self.tensor_map) != ndim:
            raise StrategyError(f"{self.name} has {ndim} dims but its tensor_map has {len(self.tensor_map)} "
                                f"({self.describe()}; strategy {self.source}): the strategy does not describe "
                                f"these checkpoints")

    def check(self):
        """Refuse what cannot be interpreted, naming the parameter and the field."""
        where = f"{self.name} in {self.source}"
        if not self.dev_matrix or any(d < 1 for d in self.dev_matrix):
            raise StrategyError(f"{where}: dev_matrix {list(self.dev_matrix)} must list device counts >= 1")
        used = [k for axes in self.tensor_map for k in axes]
        if any(not 0 <= k < len(self.dev_matrix) for k in used):
            raise StrategyError(f"{where}: tensor_map names a device axis outside dev_matrix ({self.describe()})")
        if len(used) != len(set(used)):
            raise StrategyError(f"{where}: tensor_map cuts two tensor dims by the same device axis "
                                f"({self.describe()})")
        if self.opt_size < -1 or self.opt_step < 0:
            raise StrategyError(f"{where}: opt_weight_shard_size {self.opt_size} / opt_weight_shard_step "
                                f"{self.opt_step} are not valid")
        if self.opt_chunks > 1:
            if self.opt_step == 0:
                raise StrategyError(f"{where}: opt_weight_shard_size {self.opt_size} with opt_weight_shard_step 0")
            if not self.tensor_map:
                raise StrategyError(f"{where}: a scalar cannot be optimizer-sharded ({self.describe()})")
            if self.split_shape:
                raise StrategyError(f"{where}: param_split_shape together with optimizer sharding is not "
                                    f"supported ({self.describe()})")
        if self.split_shape:
            self._check_split_shape(where)
        self._check_every_part_is_held(where)

    def _check_split_shape(self, where):
        splits = self.splits
        if not splits or len(self.split_shape) != math.prod(splits):
            raise StrategyError(f"{where}: param_split_shape has {len(self.split_shape)} sizes but the layout makes "
                                f"{math.prod(splits) if splits else 0} slices ({self.describe()})")
        per_block = {}
        for index, size in enumerate(self.split_shape):
            per_block.setdefault(index // math.prod(splits[1:]), set()).add(size)
        if any(len(sizes) != 1 or min(sizes) < 0 for sizes in per_block.values()):
            raise StrategyError(f"{where}: param_split_shape gives one row block two sizes ({self.describe()})")

    def _check_every_part_is_held(self, where):
        """Every (block, optimizer chunk) must be on some device, or a merge would leave part of the tensor unset."""
        held = {(self.block(local), self.opt_chunk(local)) for local in range(self.devices)}
        if len(held) != math.prod(self.splits) * self.opt_chunks:
            raise StrategyError(f"{where}: with {self.describe()} some part of the tensor is on no device: "
                                f"opt_weight_shard_step does not fit the dev_matrix")


@dataclass
class Strategy:
    """Every parameter's layouts (one per pipeline stage that holds it) over all stages of a run."""
    layouts: dict[str, dict[int, Layout]]  # name -> {stage: layout}, in file order
    stages: int
    devices: int  # per stage (N); a rank's global number is stage * N + local
    source: str

    @property
    def ranks(self) -> int:
        return self.stages * self.devices

    def layout(self, name: str, stage: int | None = None) -> Layout:
        """The layout of `name` in `stage`, or in the lowest stage that holds it (where a merge takes it from)."""
        per_stage = self.layouts[name]
        return per_stage[min(per_stage) if stage is None else stage]


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def parse_strategy_file(path: str):
    """The ParallelStrategyMap message of a strategy file; StrategyError when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"strategy file not found: {path}")
    if path.endswith(".json"):
        raise StrategyError(f"{path}: JSON strategy files are not read here; save the strategy as protobuf (.ckpt, "
                            f"MindSpore's default strategy_ckpt_config)")
    with open(path, "rb") as f:
        data = f.read()
    message = proto_messages("node_strategy.proto")["ParallelStrategyMap"]()
    try:
        message.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError, or missing required fields
        raise StrategyError(f"{path} is not a MindSpore strategy file (ParallelStrategyMap: {e}); pass the "
                            f"strategy folder or file the run wrote (output/strategy/)") from None
    if not message.parallel_layout_item or not message.parallel_strategy_item:
        raise StrategyError(f"{path} is not a MindSpore strategy file of a distributed run (no parameter layouts or "
                            f"no pipeline stage); pass the strategy the run wrote (output/strategy/)")
    return message


def layout_of(name: str, stage: int, layouts, source: str) -> Layout:
    """A Layout from a ParallelLayouts message (checked)."""
    if not layouts.dev_matrix or not layouts.tensor_map:
        raise StrategyError(f"{name} in {source}: no dev_matrix or tensor_map")
    if layouts.field:
        raise StrategyError(f"{name} in {source}: field {layouts.field} (a field-sliced embedding of host-device "
                            f"training) is not supported: it cannot be merged here")
    if len(layouts.tensor_map) > 1:  # one TensorMap per tensor dim, listing the axes that cut it
        tensor_map = tuple(tuple(k for k in m.dim if k != -1) for m in layouts.tensor_map if list(m.dim))
    else:
        tensor_map = tuple(() if k == -1 else (k,) for k in layouts.tensor_map[0].dim)
    split_shape = tuple(layouts.param_split_shape[0].dim) if layouts.param_split_shape else ()
    layout = Layout(name, stage, tuple(layouts.dev_matrix[0].dim), tensor_map, split_shape,
                    layouts.opt_weight_shard_step, layouts.opt_weight_shard_size, source)
    layout.check()
    return layout


def stage_layouts(path: str) -> dict[int, dict[str, Layout]]:
    """{stage: {name: layout}} of one strategy file: a rank's (one stage) or merge_pipeline_strategys' output."""
    message = parse_strategy_file(path)
    stages = {item.parallel_strategys.stage for item in message.parallel_strategy_item}
    merged = len(stages) > 1 or all(MERGED_NAME.fullmatch(item.param_name) for item in message.parallel_layout_item)
    found: dict[int, dict[str, Layout]] = {}
    for item in message.parallel_layout_item:
        name, stage = item.param_name, message.parallel_strategy_item[0].parallel_strategys.stage
        if merged:
            m = MERGED_NAME.fullmatch(item.param_name)
            if m is None:
                raise StrategyError(f"{path} holds several pipeline stages but its parameter {name!r} is not named "
                                    f"'<stage>-<name>' as merge_pipeline_strategys names them")
            stage, name = int(m.group(1)), m.group(2)
        stage_map = found.setdefault(stage, {})
        if name in stage_map:
            raise StrategyError(f"{path}: parameter {name!r} has two layouts in stage {stage}")
        stage_map[name] = layout_of(name, stage, item.parallel_layouts, path)
    return found


def strategy_files(path: str) -> list[str]:
    """The strategy files a --src_ckpt_strategy names: a file, or a folder's *.ckpt (not MindFormers' merged one)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"strategy not found: {path} (pass the folder of ckpt_strategy_rank_N.ckpt files "
                                f"the run wrote, or one strategy file)")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.endswith(".ckpt") and not MERGED_FILE.fullmatch(f) and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise FileNotFoundError(f"no strategy files (*.ckpt) in {path}: pass the folder the run wrote "
                                f"(output/strategy/, ckpt_strategy_rank_N.ckpt)")
    return files


def read_strategy(path: str) -> Strategy:
    """Every stage's layouts from a strategy folder (one file per rank; the files of one stage must agree) or one
    file (merge_pipeline_strategys' output, or the strategy of a run without pipeline stages)."""
    per_stage: dict[int, tuple[str, dict[str, Layout]]] = {}
    files = strategy_files(path)
    for file in files:
        for stage, layouts in stage_layouts(file).items():
            if stage not in per_stage:
                per_stage[stage] = (file, layouts)
            elif not same_layouts(per_stage[stage][1], layouts):
                raise StrategyError(f"{file} and {per_stage[stage][0]} both describe pipeline stage {stage} but "
                                    f"disagree (parameters or layouts): is one of them from another run?")
    stages = sorted(per_stage)
    if stages != list(range(len(stages))):
        missing = sorted(set(range(max(stages) + 1)) - set(stages))
        hint = " (a lone stage's file: pass the folder holding every stage's strategy files)" if len(files) == 1 else ""
        raise StrategyError(f"{path} has no strategy for pipeline stage {missing[0]} (it has stages "
                            f"{', '.join(map(str, stages))}){hint}")
    devices = {}
    layouts: dict[str, dict[int, Layout]] = {}
    for stage in stages:
        file, stage_map = per_stage[stage]
        counts = {layout.devices for layout in stage_map.values()}
        if len(counts) != 1:
            raise StrategyError(f"{file}: the parameters of stage {stage} disagree on the number of devices "
                                f"(dev_matrix products {sorted(counts)})")
        devices[stage] = counts.pop()
        for name, layout in stage_map.items():
            layouts.setdefault(name, {})[stage] = layout
    if len(set(devices.values())) != 1:
        raise StrategyError(f"{path}: pipeline stages have different numbers of devices ({devices}); every stage "
                            f"of a MindSpore run has the same")
    return Strategy(layouts, len(stages), devices[0], path)


def same_layouts(a: dict[str, Layout], b: dict[str, Layout]) -> bool:
    strip = lambda m: {n: (l.dev_matrix, l.tensor_map, l.split_shape, l.opt_step, l.opt_size) for n, l in m.items()}  # noqa: E731
    return strip(a) == strip(b)
