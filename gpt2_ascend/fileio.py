"""The one safe-write toolkit: every file and directory the library writes lands under its final name complete or
not at all, its temporary is removed on every failure, and a full disk is one line naming the directory and the
bytes needed.

    atomic_write(path, write)          a file: write(f) into a temporary sibling, fsync, rename over path
    AtomicFile(path)                   the same, for writers that stream (MindSpore .ckpt records)
    atomic_directory(output_dir)       a directory: fill a temporary sibling, then swap it (or its files) in
    replace_dir(tmp, final)            swap a finished temporary directory in, the old one put back on failure
    sha256_file(path)                  a file's checksum (manifests, data sidecars, downloads)"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
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
        raise_if_disk_full(e, directory, needed, what)
        raise


def raise_if_disk_full(error: BaseException, directory: str, needed: int | None, what: str):
    """A full disk (error) as DiskFullError, one line naming what was written and the space it needs."""
    if is_disk_full(error):
        _release_frames(error)
        raise disk_full_error(directory, needed, what) from None


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


# ---------------------------------------------------------------------------------------------
# paths: control characters and symlink loops refused; temporaries named after their owner
# ---------------------------------------------------------------------------------------------
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def check_path(path: str, what: str = "path") -> str:
    """path, or a one-line ValueError when it holds a control character (a newline would split every line that
    names it, and YAML folds it into a space) or cannot be resolved for a symlink loop (which is named)."""
    text = os.fspath(path)
    found = CONTROL_CHARACTER.search(text) if isinstance(text, str) else None
    if found:
        raise ValueError(f"{what} {text!r} holds a control character ({found.group()!r} at position "
                         f"{found.start()}): paths with control characters are refused; use another name")
    loop = symlink_loop(text)
    if loop:
        raise ValueError(f"{what} {path} cannot be resolved: {loop} is a symlink loop (following it leads back to "
                         f"itself); remove that link or make it point to a real file or directory")
    return path


def symlink_loop(path: str) -> str | None:
    """The first part of path (itself included) whose symlinks lead back to themselves, or None."""
    try:
        os.stat(path)
        return None
    except OSError as e:
        if e.errno != errno.ELOOP:
            return None
    parts = os.path.abspath(path).split(os.sep)
    for end in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:end]) or os.sep
        try:
            os.stat(prefix)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return prefix
    return path


def owner_tag() -> str:
    """HOST-PID: what a temporary's name says about the process that made it (clear_stale_temporaries)."""
    return f"{re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname()) or 'host'}-{os.getpid()}"


def temporary_prefix(path: str) -> str:
    return "." + os.path.basename(path) + ".tmp-" + owner_tag() + "-"


def clear_stale_temporaries(path: str):
    """Remove what a writer of `path` left beside it when it died before its cleanup (kill -9, power loss): the
    temporaries .NAME.tmp-HOST-PID-XXXXXXXX of AtomicFile / atomic_directory and the swapped-out NAME.old-HOST-PID
    of replace_dir, when HOST is this machine and no process PID lives. Anything it cannot prove dead (another
    host's, a live process's, a name of another form) is left alone."""
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    ours = re.compile(rf"\.{re.escape(name)}\.tmp-([^-]+)-(\d+)-[A-Za-z0-9_]+"
                      rf"|{re.escape(name)}\.old-([^-]+)-(\d+)")
    host = owner_tag().rsplit("-", 1)[0]
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for candidate in names:
        m = ours.fullmatch(candidate)
        if not m:
            continue
        made_on, pid = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        if made_on != host or _alive(int(pid)):
            continue
        stale = os.path.join(folder, candidate)
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(stale)


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user counts: it cannot be signalled)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class AtomicFile:
    """A temporary sibling of `path` open for writing (`.file`); commit() fsyncs it and renames it over path,
    abort() removes it. On any failure path is untouched; a full disk is DiskFullError naming `what` (default: the
    file's name) and `size`, the bytes the file needs. As a context manager it commits when the block succeeds and aborts otherwise."""

    def __init__(self, path: str, size: int | None = None, what: str | None = None):
        self.path = os.path.abspath(check_path(path))
        self.folder = os.path.dirname(self.path)
        self.size, self.what = size, what or os.path.basename(self.path)
        os.makedirs(self.folder, exist_ok=True)
        clear_stale_temporaries(self.path)
        fd, self.tmp = tempfile.mkstemp(prefix=temporary_prefix(self.path), dir=self.folder)
        self.file = os.fdopen(fd, "wb")

    def commit(self):
        if self.file.closed:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~umask())  # mkstemp makes it private; the result is an ordinary file
            os.replace(self.tmp, self.path)
        except BaseException as e:
            self.abort(e)
            raise
        fsync_dir(self.folder)

    def abort(self, error: BaseException | None = None):
        """Remove the temporary; a full disk (error) becomes DiskFullError, reported after the cleanup so the free
        space it names is true."""
        try:
            self.file.close()
        except OSError:  # flushing the rest into a full disk
            pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        if error is not None and not isinstance(error, DiskFullError):
            raise_if_disk_full(error, self.folder, self.size, self.what)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort(exc)
        return False


def atomic_write(path: str, write, size: int | None = None) -> None:
    """Call write(binary_file) on a temporary sibling of path, fsync it, then rename it over path (AtomicFile)."""
    with AtomicFile(path, size) as f:
        write(f.file)


def atomic_directory(output_dir: str, size: int | None = None, what: str | None = None, whole: bool = False,
                     stale=None):
    """A temporary sibling directory to fill (the `with` value), put in place when the block ends without error and
    removed on any failure (the commit's included); a full disk is DiskFullError naming `size` bytes and `what`
    (default: output_dir). An existing output_dir is replaced whole (whole=True: replace_dir), or file by file,
    keeping files the new content does not have unless stale(name) says they are outdated."""
    return _AtomicDir(output_dir, size, what, whole, stale)


class _AtomicDir:
    def __init__(self, output_dir: str, size: int | None, what: str | None, whole: bool, stale):
        self.final = os.path.abspath(check_path(output_dir))
        if os.path.exists(self.final) and not os.path.isdir(self.final):
            raise ValueError(f"{output_dir} is a file, not a directory: pass another output directory")
        self.parent = os.path.dirname(self.final)
        os.makedirs(self.parent, exist_ok=True)
        self.size, self.what, self.whole, self.stale = size, what or self.final, whole, stale
        clear_stale_temporaries(self.final)
        self.tmp = tempfile.mkdtemp(prefix=temporary_prefix(self.final), dir=self.parent)
        self.umask = umask()
        os.chmod(self.tmp, 0o777 & ~self.umask)  # mkdtemp makes it private; the result is an ordinary folder

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        except BaseException as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise_if_disk_full(e, self.parent, self.size, self.what)
            raise
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise_if_disk_full(exc, self.parent, self.size, self.what)
        return False

    def _commit(self):
        for name in os.listdir(self.tmp):
            path = os.path.join(self.tmp, name)
            if os.path.isfile(path):  # some writers use private temp files; give them the usual mode
                os.chmod(path, 0o666 & ~self.umask)
            fsync_file(path)
        fsync_dir(self.tmp)
        if self.whole or not os.path.isdir(self.final):
            replace_dir(self.tmp, self.final)
        else:  # keep files we do not own (a tokenizer, an adapter); replace ours, dropping stale ones
            new = set(os.listdir(self.tmp))
            for name in os.listdir(self.final):
                if self.stale is not None and self.stale(name) and name not in new:
                    os.remove(os.path.join(self.final, name))
            for name in new:
                os.replace(os.path.join(self.tmp, name), os.path.join(self.final, name))
            shutil.rmtree(self.tmp, ignore_errors=True)
        fsync_dir(self.parent)


def replace_dir(tmp: str, final: str):
    """Rename tmp to final; an existing final is swapped out first (as final.old-PID), and put back if the rename
    fails."""
    if os.path.exists(final):
        old = final + f".old-{owner_tag()}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


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
