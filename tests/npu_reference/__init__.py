"""Install the test-only reference torch_npu (./torch_npu) for the duration of a test.

The reference implements torch_npu's documented semantics in plain torch on CPU tensors, so the
model's NPU code path (fused attention, fast_gelu, NpuFusedAdamW, device calls) runs here and is
checked against SDPA and against a direct masked-softmax computation. Use the `npu_reference`
fixture (import it into a test module) or the `installed()` context manager; `set_version()` on the
module makes it behave as another torch_npu release where releases differ.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest

REFERENCE_ROOT = os.path.dirname(os.path.abspath(__file__))


def _torch_npu_entries():
    return {name: mod for name, mod in sys.modules.items() if name == "torch_npu" or name.startswith("torch_npu.")}


@contextlib.contextmanager
def installed():
    """Make `import torch_npu` return the reference; restore whatever was there afterwards."""
    saved = _torch_npu_entries()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, REFERENCE_ROOT)
    module = None
    try:
        module = importlib.import_module("torch_npu")
        module.reset()
        yield module
    finally:
        if module is not None:
            module.uninstall()
        sys.path.remove(REFERENCE_ROOT)
        for name in _torch_npu_entries():
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture
def npu_reference():
    with installed() as module:
        yield module
