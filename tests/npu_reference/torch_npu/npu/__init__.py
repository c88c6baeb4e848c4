"""torch_npu.npu: the device namespace (mirrors torch.cuda), with one pretend device.

No NPU exists here, so is_available() is False unless a test flips `available`; the RNG is a real
torch.Generator so get/set_rng_state round-trips like a device generator does.
"""
from __future__ import annotations

import torch

from . import amp  # noqa: F401  (torch_npu.npu.amp: GradScaler, sharded_grad_scaler)

available = False
compile_modes: list = []  # every set_compile_mode(jit_compile=...) value, in call order
events: list = []  # set_device / synchronize / reset_peak_memory_stats calls, for tests
_generator = torch.Generator()
_peak_bytes = 0


def reset():
    global available, _peak_bytes
    available = False
    compile_modes.clear()
    events.clear()
    _generator.manual_seed(0)
    _peak_bytes = 0


def is_available() -> bool:
    return available


def device_count() -> int:
    return 1 if available else 0


def set_compile_mode(*, jit_compile: bool):
    """jit_compile=False: binary (prebuilt) operator kernels; True: compile online per shape."""
    if not isinstance(jit_compile, bool):
        raise TypeError("set_compile_mode takes jit_compile=True/False")
    compile_modes.append(jit_compile)


def is_jit_compile_false() -> bool:
    return bool(compile_modes) and compile_modes[-1] is False


def _check_device(device):
    if device is not None and not isinstance(device, int) and torch.device(device).type != "npu":
        raise ValueError(f"expected an npu device, got {device}")


def set_device(device):
    _check_device(device)
    events.append(("set_device", str(device)))


def current_device() -> int:
    return 0


def synchronize(device=None):
    _check_device(device)
    events.append(("synchronize", str(device)))


def get_rng_state(device="npu") -> torch.Tensor:
    _check_device(device)
    return _generator.get_state()


def set_rng_state(new_state: torch.Tensor, device="npu"):
    _check_device(device)
    _generator.set_state(new_state)


def manual_seed(seed: int):
    _generator.manual_seed(seed)


def manual_seed_all(seed: int):
    _generator.manual_seed(seed)


def initial_seed() -> int:
    return _generator.initial_seed()


def max_memory_allocated(device=None) -> int:
    _check_device(device)
    return _peak_bytes


def memory_allocated(device=None) -> int:
    _check_device(device)
    return 0


def reset_peak_memory_stats(device=None):
    global _peak_bytes
    _check_device(device)
    events.append(("reset_peak_memory_stats", str(device)))
    _peak_bytes = 0


def get_amp_supported_dtype():
    return [torch.float16, torch.bfloat16]


def is_bf16_supported() -> bool:
    return True


def get_device_name(device=None) -> str:
    _check_device(device)
    return "Ascend910B2 (torch_npu reference)"
