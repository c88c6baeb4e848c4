"""AdamW with MindFormers' parameter groups, and the learning-rate schedules of the GPT-2 recipes.

Schedules are plain functions of the optimizer step t = 0, 1, 2, ... (the number of updates done
before this one), as MindFormers' LearningRateSchedule cells are of global_step:

    warmup (t < warmup_steps):  lr = warmup_lr_init + (learning_rate - warmup_lr_init) * t / warmup_steps
    then, with progress p = min(1, (t - warmup_steps) / max(1, total_steps - warmup_steps)):
      polynomial: lr = lr_end + (learning_rate - lr_end) * (1 - p) ** power
      cosine:     lr = lr_end + (learning_rate - lr_end) * 0.5 * (1 + cos(pi * p))
      constant:   lr = learning_rate

With power 1 the polynomial schedule is linear warmup then linear decay to lr_end, reached at t =
total_steps and held after. (MindFormers' older cells clamp warmup_steps to at least 1, so their step 0
trains at lr 0 even without warmup; here no warmup means step 0 uses the full learning rate.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .. import ops


# ---------------------------------------------------------------------------------------------
# parameter groups and the optimizer
# ---------------------------------------------------------------------------------------------
def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """MindFormers' rule: biases, layer norms and every other 1-D parameter are not decayed."""
    return param.ndim < 2 or name.endswith("bias")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters (a tied weight counts once)."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if no_weight_decay(name, param):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [dict(params=decay, weight_decay=weight_decay, names=decay_names),
              dict(params=no_decay, weight_decay=0.0, names=no_decay_names)]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW over MindFormers' groups, the fused kernel where the device has one (gpt2_ascend.ops)."""
    groups = param_groups(model, weight_decay)
    for group in groups:
        group.pop("names")
    return ops.adamw(groups, lr=lr, betas=betas, eps=eps, device_type=device_type)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
@dataclass
class LRSchedule:
    """lr(t) for optimizer step t. Stateless: resuming only needs the step count."""
    type: str = "polynomial"  # polynomial | cosine | constant
    learning_rate: float = 1e-4
    lr_end: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1
    power: float = 1.0
    warmup_lr_init: float = 0.0

    def __post_init__(self):
        if self.type not in ("polynomial", "cosine", "constant"):
            raise ValueError(f"unknown lr schedule {self.type!r}: use polynomial, cosine or constant")
        if self.total_steps < 1:
            raise ValueError(f"lr schedule total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr schedule warmup_steps must be >= 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * step / self.warmup_steps
        if self.type == "constant":
            return self.learning_rate
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.type == "polynomial":
            factor = (1.0 - progress) ** self.power
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr_end + (self.learning_rate - self.lr_end) * factor

    def state_dict(self) -> dict:
        return asdict(self)


def resolve_total_steps(total_steps: int, steps_per_epoch: int, epochs: int, max_steps: int = -1) -> int:
    """The schedule's length: the recipe's total_steps, or -1 -> max_steps when set, else the dataset's
    steps per epoch x epochs (MindFormers: dataset size x epochs)."""
    if total_steps != -1:
        return total_steps
    if max_steps is not None and max_steps > 0:
        return max_steps
    return steps_per_epoch * epochs


def build_schedule(lr_config: dict, total_steps: int) -> LRSchedule:
    """An LRSchedule from a recipe's lr_schedule section and the resolved number of steps."""
    return LRSchedule(type=lr_config["type"], learning_rate=lr_config["learning_rate"],
                      lr_end=lr_config["lr_end"], warmup_steps=lr_config["warmup_steps"],
                      total_steps=total_steps, power=lr_config["power"],
                      warmup_lr_init=lr_config["warmup_lr_init"])
