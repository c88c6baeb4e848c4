"""Durable file writes: every file the library writes lands under its final name complete or not at all, its
temporary is removed on every failure, and a full disk is one line naming the directory and the bytes needed."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import traceback

# How a full disk shows up: ENOSPC / EDQUOT from Python's writes; torch.save's zip writer reports a short write as
# "unexpected pos N vs M"; numpy's tofile as "N requested and M written"; safetensors as "os error 28".
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b|unexpected pos \d+ vs"
                            r"|\d+ requested and \d+ written")


class DiskFullError(OSError):
    """A write that ran out of space (message: one line naming the directory and the bytes needed)."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it, or torch.distributed.checkpoint's per-rank failures) is a full disk."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS):
            return True
        if isinstance(e, (OSError, RuntimeError, ValueError)) and DISK_FULL_TEXT.search(str(e)):
            return True
        if type(e).__name__ in ("SafetensorError", "CheckpointException") and DISK_FULL_TEXT.search(str(e)):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def disk_full_error(directory: str, needed: int | None, what: str) -> DiskFullError:
    try:
        free = f"{human_bytes(shutil.disk_usage(directory).free)} is free there"
    except OSError:
        free = "the free space is unknown"
    exact = f" ({needed} bytes)" if needed and needed >= 1000 else ""
    need = f"it needs about {human_bytes(needed)}{exact} and " if needed else "it needs more, and "
    error = DiskFullError(f"no space left on the disk of {directory} while writing {what}: {need}{free}; free some "
                          f"space and run again (nothing that was there before was changed)")
    error.errno = errno.ENOSPC
    return error


@contextlib.contextmanager
def reporting_disk_full(directory: str, needed: int | None, what: str):
    """Turn a full disk inside the block into DiskFullError (one line); anything else passes through."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as e:
        if is_disk_full(e):
            _release_frames(e)
            raise disk_full_error(directory, needed, what) from None
        raise


def _release_frames(error: BaseException):
    """Clear the frames of an exception chain: a writer they still hold (torch.save's) closes its half-written,
    already deleted file, so its space is free again before the free space is reported."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict: about what saving it writes. A DTensor counts whole."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str):
    if os.path.isfile(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def fsync_dir(folder: str):
    """Make a rename inside `folder` durable (not possible on every OS / filesystem: then a no-op)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write, size: int | None = None) -> None:
    """Call write(binary_file) on a temporary sibling of path, fsync it, then rename it over path. On any
    failure the temporary is removed and path is untouched; a full disk is DiskFullError (size: the bytes the
    file needs, for its message)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    with reporting_disk_full(folder, size, os.path.basename(path)):  # reported after the cleanup: true free space
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the result is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    fsync_dir(folder)


def write_json(obj, path: str) -> None:
    """Pretty, strict JSON (non-finite numbers as null) with a trailing newline, written atomically."""
    data = (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data), size=len(data))


def json_safe(obj):
    """obj with every NaN / inf float replaced by None: JSON has no such numbers (Python's NaN / Infinity
    tokens make a file other parsers reject)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
