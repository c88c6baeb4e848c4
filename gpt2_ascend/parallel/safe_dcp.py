"""torch.distributed.checkpoint (DCP) reading without pickle's arbitrary globals.

DCP stores its `.metadata` as a pickle and non-tensor values (optimizer hyperparameters) as torch.save
bytes, and reads both back with pickle.load / torch.load(weights_only=False): a checkpoint directory from
elsewhere could run code when loaded. Here `.metadata` goes through a RestrictedUnpickler that builds DCP's
own classes only, the values through torch.load(weights_only=True); the tensors DCP already reads with
weights_only=True. Writing stays DCP's. Imported lazily: torch.distributed.checkpoint takes ~1 s to import.
"""
from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ..safe_pickle import RestrictedUnpickler, UnsafeFileError, torch_load
from ..train.checkpoint import CheckpointError

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
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"checkpoint {path} has a corrupt .metadata: it points at {name!r}, not a "
                                  f"file of the checkpoint directory")
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
