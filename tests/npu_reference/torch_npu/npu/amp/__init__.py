"""torch_npu.npu.amp: the loss scalers (torch_npu/npu/amp/grad_scaler.py, sharded_grad_scaler.py).

The reference's tensors live on the CPU, so its scalers are torch's CPU scalers behind torch_npu's
constructor signatures (which is what the calling code has to get right)."""
import torch

from . import sharded_grad_scaler  # noqa: F401  (imported by torch_npu/__init__.py in the real package)


class GradScaler(torch.amp.GradScaler):
    """torch_npu.npu.amp.GradScaler(init_scale, growth_factor, backoff_factor, growth_interval, dynamic,
    enabled): no device argument, every release."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 dynamic=True, enabled=True):
        super().__init__("cpu", init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)
