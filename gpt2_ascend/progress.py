"""The project's one progress bar: tqdm's widget in a Jupyter kernel that can draw it (ipywidgets installed), tqdm's
text bar everywhere else -- a terminal, a log file, and a notebook without ipywidgets, where `tqdm.auto` warns
"IProgress not found" into the cell's output before falling back to text (the text bar's carriage returns render
as one updating line in Jupyter)."""
from __future__ import annotations

import importlib.util
import sys


def _widget_kernel() -> bool:
    """Inside a Jupyter kernel (not a console), with ipywidgets importable."""
    return "ipykernel.zmqshell" in sys.modules and importlib.util.find_spec("ipywidgets") is not None


def bar_class():
    """tqdm's widget class in a kernel that can draw it, its text class everywhere else."""
    if _widget_kernel():
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    return tqdm


def progress_bar(iterable=None, **kwargs):
    """bar_class()(iterable, **kwargs), with `dynamic_ncols` for a text bar (terminals get resized)."""
    cls = bar_class()
    if not _widget_kernel():
        kwargs.setdefault("dynamic_ncols", True)
    return cls(iterable, **kwargs)
