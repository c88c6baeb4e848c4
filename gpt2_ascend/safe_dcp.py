"""torch.distributed.checkpoint (DCP) reading without pickle's arbitrary globals.

DCP stores its `.metadata` as a pickle and non-tensor values (optimizer hyperparameters) as torch.save
bytes, and reads both back with pickle.load / torch.load(weights_only=False): a checkpoint directory from
elsewhere could run code when loaded. Here `.metadata` goes through a RestrictedUnpickler that builds DCP's
own classes only, the values through torch.load(weights_only=True); the tensors DCP already reads with
weights_only=True. Writing stays DCP's (parallel/checkpoint.py). Also here: the whole model of a sharded checkpoint
in one process (`load_full_model_state`), which loading.load_model builds a model from. Imported lazily:
torch.distributed.checkpoint takes ~1 s to import.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .checkpoints import CheckpointError, verify_checkpoint
from .config import GPT2Config
from .hf import convert_qkv_state
from .model import ARCHITECTURES
from .safe_pickle import RestrictedUnpickler, UnsafeFileError, torch_load
from .schema import EXTRA, REQUIRED, Key, SchemaError, contained, parse, read_json

# What DCP's `.metadata` pickle legitimately holds (torch 2.4-2.13, any layout we save): its dataclasses, the
# Size / dtype / layout of each tensor, and the checkpoint path. Nothing else is built when it is read.
DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
                                              "MetadataIndex", "StorageMeta"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "WindowsPath"},
    "collections": {"OrderedDict"},
}


def _dcp_metadata_class(module: str, name: str) -> bool:
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    return name in DCP_METADATA_CLASSES.get(module, ())


def read_dcp_metadata(path: str):
    """A checkpoint directory's DCP `.metadata`, unpickled with DCP's own classes only (a file naming any other
    global raises UnsafeFileError), and checked to point at data files inside the directory."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = RestrictedUnpickler(f, file, _dcp_metadata_class).load()
    except UnsafeFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage to the pickle is one line naming the file
        raise CheckpointError(f"checkpoint {path} has a corrupt .metadata ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"checkpoint {path} has a corrupt .metadata (not DCP metadata)")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        try:
            contained(path, name, file, "data file", flat=True)  # DCP writes its data files beside .metadata
        except SchemaError:
            raise CheckpointError(f"checkpoint {path} has a corrupt .metadata: it points at {name!r}, not a "
                                  f"file of the checkpoint directory") from None
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by read_dcp_metadata instead of pickle.load."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_dcp_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (optimizer hyperparameters) read by torch.load(weights_only=True);
    DCP's own planner unpickles them with any globals."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value):
        obj = torch_load(value, name=f"{self.path} (the value of {read_item.dest_index.fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict, path: str, no_dist: bool = False):
    """dcp.load through SafeReader and SafeLoadPlanner: no pickle in the directory runs code. Whatever else goes
    wrong in DCP (a damaged shard, a state that does not fit the checkpoint) is one CheckpointError line."""
    read_dcp_metadata(path)  # first, on every rank: DCP would log a refusal as a warning with a traceback and retry
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(path), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's exception holds a traceback per rank
        cause = _root_cause(e)
        if isinstance(cause, (UnsafeFileError, CheckpointError)):
            raise cause from None
        text = str(cause).strip()
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(cause).__name__}: "
                              f"{text.splitlines()[0] if text else 'no message'})") from None


def _root_cause(error: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (which keeps one (exception, traceback) per rank)."""
    while isinstance(error, CheckpointException) and error.failures:
        failure = next(iter(error.failures.values()))
        error = failure[0] if isinstance(failure, tuple) else failure
    return error


# ---------------------------------------------------------------------------------------------
# the whole model of a sharded checkpoint, in one process
# ---------------------------------------------------------------------------------------------
# a sharded checkpoint's config.json (parallel/checkpoint.py writes it): the model's HF config.json as a mapping (read
# by GPT2Config.from_hf_dict), its head, the c_attn layout, and the layout it was saved in
SHARDED_META = {
    "model_config": Key(REQUIRED, "map", items=Key(None, "any")),
    "architecture": Key(REQUIRED, "choice", ARCHITECTURES),
    "qkv_layout": Key("hf", "choice", ("hf", "per_head")),
    "lora": Key(False, "bool"), "step": Key(None, "int", minimum=0),
    "layout": Key(None, "map", items=Key(None, "int", minimum=1)),
    EXTRA: Key(None, "any"),
}


def read_meta(path: str) -> dict:
    """The config.json of a sharded checkpoint (SHARDED_META): the model's HF config, its architecture, the qkv
    layout."""
    file = os.path.join(path, "config.json")
    try:
        return parse(read_json(file), SHARDED_META, file)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has a corrupt config.json ({e})") from None


def load_full_model_state(path: str) -> tuple[GPT2Config, dict, str]:
    """The whole model from a sharded checkpoint in one process, in HF's c_attn layout and our names."""
    verify_checkpoint(path)
    meta = read_meta(path)
    config = GPT2Config.from_hf_dict(meta["model_config"], f"{os.path.join(path, 'config.json')} (its model_config)")
    state = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in model_tensors(path).items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(state, path, no_dist=True)
    model_state = {k[len("model."):]: v for k, v in state.items()}
    if meta.get("qkv_layout") == "per_head":
        model_state = convert_qkv_state(model_state, config.n_embd, config.n_head, to="hf")
    return config, model_state, meta["architecture"]


def model_tensors(path: str) -> dict:
    """{key: (shape, dtype)} of the model tensors `.metadata` declares, checked to fit in the checkpoint's data
    files before anything is allocated for them."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    data_bytes = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".distcp"))
    tensors, declared = {}, 0
    for key, item in read_dcp_metadata(path).state_dict_metadata.items():
        if not (isinstance(key, str) and key.startswith("model.") and isinstance(item, TensorStorageMetadata)):
            continue
        size, dtype = getattr(item, "size", None), getattr(getattr(item, "properties", None), "dtype", None)
        if not (isinstance(size, tuple) and all(isinstance(d, int) and d >= 0 for d in size)
                and isinstance(dtype, torch.dtype)):
            raise CheckpointError(f"checkpoint {path} has a corrupt .metadata ({key}: shape {size}, dtype {dtype})")
        tensors[key] = (size, dtype)
        declared += math.prod(size) * dtype.itemsize
    if declared > data_bytes:
        raise CheckpointError(f"checkpoint {path} has a corrupt .metadata: it declares {declared} bytes of "
                              f"weights but its .distcp files hold {data_bytes}")
    return tensors
