"""HF weight files tensor by tensor: an index over (sharded) safetensors / .bin checkpoints, a streaming
safetensors writer, and resharding without ever holding the whole model.

safetensors (https://github.com/huggingface/safetensors): 8-byte little-endian header size, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data. Knowing every
name, dtype and shape up front, the writer lays out the file, then fills each tensor in place as it
arrives, so peak memory is one tensor. Reading seeks to a tensor's bytes (no mmap: mapped pages would
count against the process as they are touched).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct

import torch

from ..hf import (BIN_INDEX, SAFE_INDEX, SAFE_WEIGHTS, WEIGHT_FILE, atomic_directory, load_torch_file, parse_dtype,
                  parse_size, shard_plan, weight_files, write_json)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts), validated against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"cannot read {path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"cannot read {path}: truncated or corrupt safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"cannot read {path}: corrupt safetensors header") from None
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        if dtype is None or end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise ValueError(f"cannot read {path}: corrupt entry for {name!r}")
        if start + end > size:
            raise ValueError(f"cannot read {path}: truncated safetensors file ({name!r} ends past the file end)")
    return header, start


class WeightIndex:
    """Names, dtypes and shapes of every tensor in HF weight files; `load(name)` reads one tensor.

    safetensors tensors are read with a seek; .bin files are memory-mapped one file at a time
    (torch.load(mmap=True)), the previous mapping released when another file is needed.
    """

    def __init__(self, files: list[str]):
        self.files = files
        self.where: dict[str, tuple[str, torch.dtype, tuple, int]] = {}  # name -> file, dtype, shape, offset
        self._bin_file, self._bin_state = None, None
        for file in files:
            if file.endswith(".safetensors"):
                header, start = read_safetensors_header(file)
                entries = ((k, SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"]), start + v["data_offsets"][0])
                           for k, v in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0])
                           if k != "__metadata__")
            else:
                entries = ((k, t.dtype, tuple(t.shape), -1) for k, t in self._bin(file).items())
            for name, dtype, shape, offset in entries:
                if name in self.where:
                    raise ValueError(f"tensor {name!r} is in both {self.where[name][0]} and {file}")
                self.where[name] = (file, dtype, shape, offset)
        self.release()

    def _bin(self, file: str) -> dict:
        if self._bin_file != file:
            self.release()
            state = load_torch_file(file)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{file} does not hold a state dict of tensors")
            self._bin_file, self._bin_state = file, state
        return self._bin_state

    def release(self):
        """Drop the current .bin mapping (the next load from a .bin maps its file again)."""
        self._bin_file, self._bin_state = None, None

    def dtype(self, name):
        return self.where[name][1]

    def shape(self, name):
        return self.where[name][2]

    def nbytes(self, name):
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def load(self, name: str) -> torch.Tensor:
        file, dtype, shape, offset = self.where[name]
        if offset < 0:
            return self._bin(file)[name]
        buffer = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8)
        with open(file, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
                raise ValueError(f"cannot read {file}: truncated inside {name!r}")
        return buffer.view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class SafetensorsWriter:
    """A safetensors file laid out from (name -> (dtype, shape)); tensors are written in any order."""

    def __init__(self, path: str, specs: dict, metadata: dict | None = None):
        self.path, self.specs = path, specs
        header, offset = {}, 0
        for name, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = metadata or {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data 8-byte aligned, as safetensors itself writes it
        self.data_start = 8 + len(blob)
        self.offsets = {name: info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}
        self.pending = set(specs)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor):
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name!r}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {tuple(shape)}")
        self.file.seek(self.data_start + self.offsets[name])
        self.file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.pending.discard(name)

    def close(self):
        if self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} tensors never written, e.g. {sorted(self.pending)[0]!r}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def shard_file_names(n: int) -> list[str]:
    return [SAFE_WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_hf_weights(output_dir: str, specs: dict, fetch, max_shard_size=None, order=None, progress=None):
    """Write model.safetensors (or shards + index) into output_dir, pulling tensors one at a time.

    specs: name -> (dtype, shape) in file order; fetch(name) -> tensor; order: the order to fetch in (the
    cheapest for the source, default specs order); progress: a tqdm-like wrapper for the loop.
    """
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (dtype, shape) in specs.items()}
    plan = shard_plan(sizes, parse_size(max_shard_size) if max_shard_size else None)
    files = shard_file_names(len(plan))
    writers, file_of = {}, {}
    try:
        for file, names in zip(files, plan):
            writers[file] = SafetensorsWriter(os.path.join(output_dir, file), {n: specs[n] for n in names})
            file_of.update({n: file for n in names})
        names = list(order or specs)
        for name in progress(names) if progress else names:
            writers[file_of[name]].write(name, fetch(name))
        for writer in writers.values():
            writer.close()
    finally:
        for writer in writers.values():
            if not writer.file.closed:
                writer.file.close()
    if len(files) > 1:
        write_json({"metadata": {"total_size": sum(sizes.values())}, "weight_map": file_of},
                   os.path.join(output_dir, SAFE_INDEX))
    return files


# ---------------------------------------------------------------------------------------------
# resharding
# ---------------------------------------------------------------------------------------------
def merge_hf_shards(input_dir: str, output_dir: str, max_shard_size=None, dtype=None, progress=None) -> dict:
    """Reshard an HF checkpoint (sharded .bin or safetensors, with an index) into model.safetensors, or shards
    of at most max_shard_size, streaming tensor by tensor. Other files (config.json, tokenizer) are copied.
    Returns a summary dict (tensors, bytes, files)."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input directory not found: {input_dir}")
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise ValueError("--output_dir must differ from --input_dir (the input shards are read while writing)")
    dtype = parse_dtype(dtype)
    index = WeightIndex(weight_files(input_dir))
    config = read_json(os.path.join(input_dir, "config.json"))
    names = [n for n in index.where if not (n == "lm_head.weight" and config.get("tie_word_embeddings", True)
                                             and any(k.endswith("wte.weight") for k in index.where))]

    def target(name):
        return dtype if dtype is not None and index.dtype(name).is_floating_point else index.dtype(name)

    specs = {name: (target(name), index.shape(name)) for name in names}
    total = sum(math.prod(s) * d.itemsize for d, s in specs.values())
    with atomic_directory(output_dir, size=total) as tmp:
        files = write_hf_weights(tmp, specs, lambda n: index.load(n).to(specs[n][0]), max_shard_size,
                                 progress=progress)
        index.release()
        for name in os.listdir(input_dir):
            src = os.path.join(input_dir, name)
            if os.path.isfile(src) and not WEIGHT_FILE.fullmatch(name) and name != BIN_INDEX:
                shutil.copyfile(src, os.path.join(tmp, name))
        if dtype is not None and config:
            config["torch_dtype"] = str(dtype).replace("torch.", "")
            write_json(config, os.path.join(tmp, "config.json"))
    return {"tensors": len(specs), "bytes": total, "files": files, "dropped_tied_head": len(names) < len(index.where)}


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
