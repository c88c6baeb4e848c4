"""HF weight files tensor by tensor: an index over (sharded) safetensors / .bin checkpoints, and resharding
without ever holding the whole model (written by hf.write_hf_weights, the one safetensors writer). Reading seeks to
a tensor's bytes (no mmap: mapped pages would count against the process as they are touched).
"""
from __future__ import annotations

import math
import os
import shutil

import torch

from ..config import GPT2Config
from ..hf import (BIN_INDEX, SAFETENSORS_DTYPES, WEIGHT_FILE, atomic_model_dir, load_torch_file, parse_dtype,
                  read_safetensors_header, weight_files, write_hf_weights, write_json)
from ..safe_pickle import tensor_dict
from ..schema import read_json


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

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
            self._bin_file, self._bin_state = file, tensor_dict(load_torch_file(file), file)
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
    config_path = os.path.join(input_dir, "config.json")
    config = read_json(config_path, fix="re-export the model") if os.path.isfile(config_path) else {}
    tied = GPT2Config.from_hf_dict(config, config_path).tie_word_embeddings  # (checked: "no" is not true)
    names = [n for n in index.where if not (n == "lm_head.weight" and tied
                                             and any(k.endswith("wte.weight") for k in index.where))]

    def target(name):
        return dtype if dtype is not None and index.dtype(name).is_floating_point else index.dtype(name)

    specs = {name: (target(name), index.shape(name)) for name in names}
    total = sum(math.prod(s) * d.itemsize for d, s in specs.values())
    with atomic_model_dir(output_dir, size=total) as tmp:
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

