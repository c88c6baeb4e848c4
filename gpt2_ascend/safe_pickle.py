"""The only ways this project reads pickled files: nothing a user hands us is unpickled with arbitrary globals.

A pickle can name any importable function and call it while it loads (`os.system` in a `__reduce__`), so a
checkpoint from the internet is code. Weight files (`pytorch_model.bin`, our `model.pt` / `optimizer.pt` /
`rank_N.pt`) are read with `torch.load(weights_only=True)`, which accepts tensors and plain Python values
only; formats that must pickle richer objects (torch.distributed.checkpoint's `.metadata`) go through
`RestrictedUnpickler` with an allow-list of the classes the format contains. Anything else is refused with
an `UnsafeFileError` naming the file and the object it tried to build, before any of it runs.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile

import torch


class UnsafeFileError(ValueError):
    """A file that holds a pickled object this project will not build (message: one line)."""


def refusal(path: str, global_name: str) -> UnsafeFileError:
    return UnsafeFileError(f"refusing to load {path}: it contains a pickled object of type {global_name}, which "
                           f"could run code (only tensors and plain values are read)")


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only the globals `allowed(module, name)` accepts."""

    def __init__(self, file, path: str, allowed):
        super().__init__(file)
        self.path, self.allowed = path, allowed

    def find_class(self, module, name):
        if not self.allowed(module, name):
            raise refusal(self.path, f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise refusal(self.path, "persistent id")


def refused(file, error: Exception) -> UnsafeFileError:
    """The refusal for a weights-only UnpicklingError raised while another library (peft) read `file`."""
    return refusal(str(file), _offending_global(file, str(error)))


def torch_load(file, mmap: bool = False, name: str | None = None):
    """torch.load(weights_only=True) of a file (path or binary file object, called `name` in messages) we did
    not necessarily write. A file that pickles anything but tensors and plain values raises UnsafeFileError
    naming the object; one that cannot be read (truncated, not a torch file) raises ValueError naming the
    file. Both are one line."""
    name = name or str(file)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        named = _offending_global(file, str(e))
        if named is None:  # no global anywhere in it: not a hostile pickle, not a checkpoint at all
            raise ValueError(f"{name} is not a valid checkpoint: it is not a PyTorch file of tensors (random or "
                             f"damaged bytes, or a pickle of something else); re-download or re-export it") from None
        raise refusal(name, named) from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # the legacy (non-zip) format cannot be memory-mapped
            return torch_load(file, name=name)
        raise _unreadable(name, e) from None
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise _unreadable(name, e) from None


def tensor_dict(state, name: str) -> dict:
    """`state`, read from `name`, if it is a state dict ({name: tensor}); otherwise one ValueError line saying what it
    holds instead (a pickle of text, a list, a dict of strings) rather than an error deep in the reader."""
    import torch
    if not isinstance(state, dict):
        raise ValueError(f"{name} is not a valid checkpoint: it holds {_what(state)}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} is not a valid checkpoint: its key {str(key)[:80]!r} is not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} is not a valid checkpoint: its entry {str(key)[:80]!r} holds {_what(value)}, "
                             f"not a tensor")
    return state


def _what(value) -> str:
    return f"text ({str(value)[:40]!r})" if isinstance(value, str) else f"a {type(value).__name__}"


def _unreadable(name: str, error: Exception) -> ValueError:
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"file not found: {name}")
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, KeyError):  # torch's legacy reader looked up a byte of something else as a record key
        detail = "unexpected bytes"
    return ValueError(f"cannot read {name}: {detail} (corrupt, truncated or not a PyTorch weights file)")


def _offending_global(file, message: str) -> str | None:
    """What a refused pickle tried to build: torch's message names it for GLOBAL opcodes; otherwise (protocol
    4's STACK_GLOBAL, which the weights-only unpickler rejects as an operand) the pickle is disassembled,
    never run, and its first global named. None: it names no global (random bytes, a pickle of plain text), so it
    could not run code; it is just not a checkpoint."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return found.group(1)
    try:
        return _first_global(_pickle_bytes(file))
    except Exception:  # noqa: BLE001 - not a zip or a file to read, or a byte that is not pickle: no global before it
        return None


def _pickle_bytes(file) -> bytes:
    if zipfile.is_zipfile(file):  # (both seek to absolute offsets: a file object's position does not matter)
        with zipfile.ZipFile(file) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    if hasattr(file, "read"):
        file.seek(0)
        return file.read(1 << 24)
    with open(file, "rb") as f:
        return f.read(1 << 24)


IDENTIFIER = re.compile(r"[A-Za-z_][\w.]*")


def _first_global(data: bytes) -> str | None:
    """The first global the pickles in `data` name (torch's legacy format is several pickles in a row), or None.
    pickletools raises at the first byte that is not pickle (the caller's None): a hostile pickle cut short has named
    its global before it; random bytes name none (a GLOBAL opcode that random bytes happen to spell names no
    importable identifier)."""
    stream, strings = io.BytesIO(data), []
    while stream.tell() < len(data):
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST") and all(IDENTIFIER.fullmatch(p) for p in str(arg).split(" ")):
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2 and all(map(IDENTIFIER.fullmatch, strings[-2:])):
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
    return None
