"""Durable file writes: every file the library writes lands under its final name complete or not at all."""
from __future__ import annotations

import json
import math
import os
import tempfile


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


def atomic_write(path: str, write) -> None:
    """Call write(binary_file) on a temporary sibling of path, fsync it, then rename it over path."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def write_json(obj, path: str) -> None:
    """Pretty, strict JSON (non-finite numbers as null) with a trailing newline, written atomically."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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
