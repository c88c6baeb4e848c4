"""torch_npu.npu.amp.sharded_grad_scaler._ShardedGradScaler, whose constructor changed in 26.1.0:

  up to 26.0.x:  __init__(self, init_scale=2.0**16, backoff_factor=0.5, growth_factor=2.0,
                          growth_interval=2000, enabled=True, process_group=dist.group.WORLD)
  from 26.1.0:   __init__(self, device="npu", init_scale=2.0**16, backoff_factor=0.5, ...)

(torch_npu/npu/amp/sharded_grad_scaler.py at v26.0.1-pytorch2.10.0 and v26.1.0-pytorch2.10.0). Every
release also assigns it to torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler on import, so
torch's name stops taking torch's arguments. Attribute access picks the installed version's class.
"""
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as TorchShardedGradScaler

from ...versions import scaler_takes_device


class ShardedGradScalerUpTo26_0(TorchShardedGradScaler):
    def __init__(self, init_scale=2.0 ** 16, backoff_factor=0.5, growth_factor=2.0, growth_interval=2000,
                 enabled=True, process_group=dist.group.WORLD):
        super().__init__("cpu", init_scale=init_scale, backoff_factor=backoff_factor, growth_factor=growth_factor,
                         growth_interval=growth_interval, enabled=enabled, process_group=process_group)


class ShardedGradScalerFrom26_1(TorchShardedGradScaler):
    def __init__(self, device="npu", init_scale=2.0 ** 16, backoff_factor=0.5, growth_factor=2.0,
                 growth_interval=2000, enabled=True, process_group=dist.group.WORLD):
        if device != "npu":
            raise ValueError(f"expected device npu, got {device!r}")
        super().__init__("cpu", init_scale=init_scale, backoff_factor=backoff_factor, growth_factor=growth_factor,
                         growth_interval=growth_interval, enabled=enabled, process_group=process_group)


def __getattr__(name):
    if name == "_ShardedGradScaler":
        from ... import __version__
        return ShardedGradScalerFrom26_1 if scaler_takes_device(__version__) else ShardedGradScalerUpTo26_0
    raise AttributeError(name)
