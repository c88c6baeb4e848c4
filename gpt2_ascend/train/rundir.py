"""The output directory of a training run: one run at a time (a lock), and what starting over removes.

    with OutputDirLock(output_dir):      # a second run into output_dir fails here, naming this one's pid
        ...validate the recipe, data, model and layout...
        clear_run_outputs(output_dir)    # only then: a fresh run deletes every file an earlier run wrote
        ...train...

The lock is `fcntl.flock` on OUTPUT_DIR/.lock: the kernel drops it when the process exits, however it exits
(kill -9 included), so a lock is never stale. The file holds the holder's pid, for the error message.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from dataclasses import dataclass

from ..checkpoints import checkpoint_root, list_checkpoints
from ..fileio import check_path

LOCK_FILE = ".lock"
# What a training run writes into OUTPUT_DIR (the data cache is not the run's: it is kept).
RUN_OUTPUTS = ("checkpoint", "tensorboard", "final", "final.adapter.tmp", "metrics.jsonl", "summary.json",
               "loss_curve.png", "recipe.yaml",
               "wandb", "mlruns", "trackers.json")  # issue 16: the report_to trackers' files (train/trackers.py)


class OutputDirBusy(ValueError):
    """Another process holds the output directory's lock (message: one line)."""


def make_output_dir(output_dir: str, tries: int = 3) -> bool:
    """Create output_dir (and its parents) if missing; True when it was created. One-line errors that name
    --output_dir when it holds a control character, loops through symlinks, is a file, sits under a file, or
    cannot be created."""
    check_path(output_dir, "--output_dir")
    if os.path.isdir(output_dir):
        return False
    if os.path.exists(output_dir):  # (a file, or a symlink to one)
        raise ValueError(f"--output_dir {output_dir} is a file, not a directory: pass a directory (it is created "
                         f"if missing)")
    if os.path.islink(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a dangling symlink (to {os.readlink(output_dir)}): create "
                         f"its target, or pass another directory")
    try:
        os.makedirs(output_dir)
    except FileExistsError:  # created by someone else meanwhile (or a file appeared): look again
        if tries <= 1:
            raise ValueError(f"--output_dir {output_dir} cannot be created: it keeps changing while it is created")
        return make_output_dir(output_dir, tries - 1)
    except NotADirectoryError:
        raise ValueError(f"--output_dir {output_dir} cannot be created: a part of that path is a file, not a "
                         f"directory") from None
    except OSError as e:
        raise ValueError(f"--output_dir {output_dir} cannot be created: {e.strerror.lower()}: pass a directory "
                         f"you can write to") from None
    return True


class OutputDirLock:
    """An exclusive lock on a run's output directory, held from __enter__ to __exit__ (or process death).

    The directory is created if missing; if it was, and it is empty again when the lock is released (the run
    failed before writing anything), it is removed, so a rejected run leaves no trace."""

    def __init__(self, output_dir: str):
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_FILE)
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> "OutputDirLock":
        self.created = make_output_dir(self.output_dir)
        try:
            self.fd = self._acquire()
        except BaseException:
            self._remove_if_created()
            raise
        return self

    def __exit__(self, *exc):
        self.release()

    def _acquire(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise ValueError(f"--output_dir {self.output_dir} is not writable ({e.strerror.lower()}): pass a "
                                 f"directory you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise ValueError(f"cannot lock --output_dir {self.output_dir}: {e.strerror.lower()}") from None
                who = f"pid {holder}" if holder else "another process"
                raise OutputDirBusy(f"--output_dir {self.output_dir} is in use by another training run ({who}): "
                                    f"wait for it to finish or stop it, or pass another --output_dir") from None
            if _same_file(fd, self.path):  # not unlinked by a releasing holder between our open and flock
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def release(self):
        if self.fd is None:
            return
        try:  # unlink while still holding it: a waiter that opened this inode sees it is gone and retries
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_if_created()

    def _remove_if_created(self):
        if self.created:
            try:
                os.rmdir(self.output_dir)  # only if empty
            except OSError:
                pass


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ---------------------------------------------------------------------------------------------
# the run a directory holds: empty, started or finished (docs/reliability.md, "Run directories")
# ---------------------------------------------------------------------------------------------
FINISHED_MARKS = ("summary.json", "final")  # written by finish(), after the last step


@dataclass(frozen=True)
class RunState:
    """What OUTPUT_DIR holds: "empty" (none of RUN_OUTPUTS), "started" (some, but no final/ or summary.json: a run
    that stopped or is stopping before its end) or "finished"; `found` names the outputs present."""
    kind: str
    found: tuple
    last_step: int | None = None  # the newest step metrics.jsonl records

    def __str__(self) -> str:
        if self.kind == "empty":
            return "no training run"
        def shown(name: str) -> str:
            if name == "metrics.jsonl" and self.last_step is not None:
                return f"metrics.jsonl to step {self.last_step}"
            return name + "/" if name in ("checkpoint", "final", "tensorboard", "wandb", "mlruns") else name
        return f"a {self.kind} run ({', '.join(shown(name) for name in self.found)})"


def run_state(output_dir: str) -> RunState:
    found = tuple(name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(output_dir, name)))
    if not found:
        return RunState("empty", found)
    from .metrics import read_metrics
    try:
        steps = [r.get("step") for r in read_metrics(os.path.join(output_dir, "metrics.jsonl"))]
    except (OSError, ValueError, AttributeError):
        steps = []
    last = next((s for s in reversed(steps) if isinstance(s, int)), None)
    return RunState("finished" if any(name in found for name in FINISHED_MARKS) else "started", found, last)


def describe_checkpoints(output_dir: str) -> str:
    """Why OUTPUT_DIR/checkpoint has nothing to resume from, in words."""
    root = checkpoint_root(output_dir)
    if os.path.islink(root) and not os.path.exists(root):
        return f"checkpoint/ is a dangling symlink to {os.readlink(root)}"
    if not os.path.lexists(root):
        return "checkpoint/ is missing"
    if not os.path.isdir(root):
        return "checkpoint/ is not a directory"
    found = list_checkpoints(root)
    if not found:
        return "checkpoint/ holds no step_N directory"
    return f"its {len(found)} checkpoint(s) (steps {found[0][0]}..{found[-1][0]}): none is complete and intact"


def output_holding(path: str, output_dir: str) -> str | None:
    """The run output of output_dir (RUN_OUTPUTS: checkpoint, final, ...) that path lies in, or None. A run replaces
    those (an overwrite deletes them first, final/ is written again at the end, old checkpoints are pruned), so an
    input there would be lost. Symlinks are followed (a checkpoint/ linked to another disk is pruned there)."""
    real = os.path.realpath(path)
    for name in RUN_OUTPUTS:
        output = os.path.join(output_dir, name)
        if not os.path.exists(output):
            continue
        top = os.path.realpath(output)
        if real == top or real.startswith(top + os.sep):
            return name
    return None


def clear_run_outputs(output_dir: str):
    """Delete every file an earlier run wrote into output_dir (RUN_OUTPUTS), so a fresh run's outputs never
    mix with an old run's. Anything else in the directory (the data cache, a user's own files) is kept."""
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
