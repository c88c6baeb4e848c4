"""torch_npu.optim.NpuFusedAdamW: torch's AdamW arithmetic plus the fused implementation's rules.

The real optimizer flattens all parameters and their gradients into one buffer per dtype at its
first step and from then on updates those buffers. Documented (and in its source):
  - parameters must never be reallocated while it is in use (module.cpu()/.to(), assigning a new
    tensor or None), or the update goes to memory the model no longer reads;
  - parameters must be float32 or float16 (TypeError otherwise);
  - zero_grad(set_to_none=True) raises ValueError;
  - a gradient reallocated or set to None after the first step (e.g. model.zero_grad(), which sets
    None) is silently left out of the update. The reference raises instead, so tests catch it.
"""
from __future__ import annotations

import torch

FUSED_DTYPES = (torch.float32, torch.float16)


class NpuFusedAdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=False)
        self._param_storage = {id(p): p.data_ptr() for p in self._params()}
        self._grad_storage = None  # fixed at the first step, when the real one combines the grads

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _check_contract(self):
        for p in self._params():
            if p.data_ptr() != self._param_storage[id(p)]:
                raise RuntimeError("a parameter was reallocated after NpuFusedAdamW was built (module.to()/.cpu() "
                                   "or a new tensor assigned): build the optimizer after moving the model")
            if p.grad is not None and p.dtype not in FUSED_DTYPES:
                raise TypeError(f"Fused optimizer's parameters must be either float32 or float16, but received {p.dtype}")
        grads = {id(p): p.grad.data_ptr() for p in self._params() if p.grad is not None}
        if self._grad_storage is None:
            self._grad_storage = grads
        elif grads != self._grad_storage:
            raise RuntimeError("gradients were reallocated or set to None after NpuFusedAdamW's first step "
                               "(model.zero_grad() or zero_grad(set_to_none=True)): the fused update would skip them")

    def step(self, closure=None):
        self._check_contract()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = False):
        if set_to_none:
            raise ValueError("set_to_none is not supported in fused optimizers")
        super().zero_grad(set_to_none=False)
