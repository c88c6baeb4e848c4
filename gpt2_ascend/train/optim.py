"""AdamW with MindFormers' parameter groups, MindSpore's update rule, and the learning-rate schedules of the GPT-2
recipes (gradient clipping: parallel/clip.py).

Two update rules, picked by the recipe's optimizer.type (UPDATE_RULES):
  torch      (AdamW): torch.optim.AdamW, with Adam's bias corrections.
  mindspore  (FusedAdamWeightDecay, FP32StateAdamWeightDecay, AdamWeightDecay): MindSpore's AdamWeightDecay,
             m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p <- p - lr (m / (sqrt(v) + eps) + wd p),
             no bias correction (measured on MindSpore 2.10: ../shared/mindformers_reference/adamwd.json).
Both run in the device's fastest AdamW kernel (gpt2_ascend.ops.adamw): see use_mindspore_rule.

Schedules are plain functions of t = 0, 1, 2, ..., the number of updates applied before this one
(MindFormers' optimizer global_step: a step skipped for an fp16 overflow does not advance it), computed as
MindFormers r1.3.0's cells do (mindformers/core/lr/lr_schedule.py), with w = warmup_steps, T = total_steps:

    polynomial (PolynomialWithWarmUpLR): t < w: warmup;  t > T: lr_end;
                                         else lr_end + (learning_rate - lr_end) * (1 - (t - w) / D) ** power
    cosine (CosineWithWarmUpLR):         t >= D: lr_end;  t < w: warmup;  else lr_end + (learning_rate - lr_end)
                                         * max(0, 0.5 * (1 + cos(pi * num_cycles * 2 * (t - w) / max(1, T - w))))
    constant (ConstantWarmUpLR):         t < w: warmup;  else learning_rate
    warmup:                              warmup_lr_init + (learning_rate - warmup_lr_init) * t / w

D is decay_steps (at least 1), by default max(1, T - w) (polynomial) or max(1, T) (cosine); num_cycles 0.5 is one
half-cosine; warmup_ratio, when set, replaces w by int(T * warmup_ratio).

With warmup, t = 0 trains at warmup_lr_init (0 by default): the first update moves only Adam's moments.
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


# The recipe's optimizer.type -> the update rule it computes. MindSpore's AdamWeightDecay family (MindFormers'
# FusedAdamWeightDecay and FP32StateAdamWeightDecay give identical numbers) does not bias-correct.
UPDATE_RULES = {"AdamW": "torch", "FusedAdamWeightDecay": "mindspore", "FP32StateAdamWeightDecay": "mindspore",
                "AdamWeightDecay": "mindspore"}


def build_optimizer(model: torch.nn.Module, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1, device_type: str = "cpu",
                    update_rule: str = "torch") -> torch.optim.Optimizer:
    """AdamW over MindFormers' groups in the device's fastest kernel (gpt2_ascend.ops), computing torch's
    update or MindSpore's (update_rule, see UPDATE_RULES)."""
    if update_rule not in ("torch", "mindspore"):
        raise ValueError(f"unknown update rule {update_rule!r}: use torch or mindspore")
    groups = param_groups(model, weight_decay)
    for group in groups:
        group.pop("names")
    optimizer = ops.adamw(groups, lr=lr, betas=betas, eps=eps, device_type=device_type)
    if update_rule == "mindspore":
        use_mindspore_rule(optimizer)
    for group in optimizer.param_groups:
        group.setdefault("update_rule", "torch")
    optimizer.register_load_state_dict_post_hook(_check_update_rule(update_rule))
    return optimizer


def torch_settings_for_mindspore_step(lr: float, eps: float, weight_decay: float, betas, t: int):
    """(lr, eps, weight_decay) that make torch's AdamW step t (1-based) compute MindSpore's update.

    torch's AdamW step t is  p <- p (1 - lr wd) - (lr / c1) m / (sqrt(v) / s + eps),  c1 = 1 - b1^t, s = sqrt(1 - b2^t)
    (torch_npu's NpuFusedAdamW computes the same); with lr' = lr c1 / s, eps' = eps / s, wd' = wd s / c1 that is
    p <- p - lr wd p - lr m / (sqrt(v) + eps): MindSpore's AdamWeightDecay, equal up to float rounding."""
    c1 = 1.0 - betas[0] ** t
    s = math.sqrt(1.0 - betas[1] ** t)
    return lr * c1 / s, eps / s, weight_decay * s / c1


def use_mindspore_rule(optimizer: torch.optim.Optimizer):
    """Make a torch-AdamW optimizer (torch.optim.AdamW in any implementation, torch_npu's NpuFusedAdamW) compute
    MindSpore's AdamWeightDecay update, in the same fused / foreach kernels: so it is exactly as fast.

    Outside a step the groups hold MindSpore's lr, eps and weight_decay (what the schedule sets); a step-pre hook
    swaps in torch_settings_for_mindspore_step(...) for the step, a step-post hook puts them back and counts the
    step in group["mindspore_step"] (saved with the optimizer's state dict, so a resumed run continues the count).
    torch counts steps per parameter and skips a parameter without a gradient: every parameter of a group must get
    one each step (true for the trainer, which keeps only trainable parameters in the optimizer)."""
    recipe_values = []

    def to_torch(opt, args, kwargs):
        recipe_values.clear()
        for group in opt.param_groups:
            recipe_values.append((group["lr"], group["eps"], group["weight_decay"]))
            group["lr"], group["eps"], group["weight_decay"] = torch_settings_for_mindspore_step(
                group["lr"], group["eps"], group["weight_decay"], group["betas"], group["mindspore_step"] + 1)

    def back_to_mindspore(opt, args, kwargs):
        for group, (lr, eps, weight_decay) in zip(opt.param_groups, recipe_values):
            group["lr"], group["eps"], group["weight_decay"] = lr, eps, weight_decay
            group["mindspore_step"] += 1

    for group in optimizer.param_groups:
        group.update(update_rule="mindspore", mindspore_step=0)
    optimizer.register_step_pre_hook(to_torch)
    optimizer.register_step_post_hook(back_to_mindspore)
    return optimizer


def _check_update_rule(expected: str):
    """A load_state_dict post-hook: optimizer state belongs to the update rule it was trained with (checkpoints
    without the key were written when every recipe trained with torch's rule)."""
    def check(optimizer):
        found = optimizer.param_groups[0].get("update_rule", "torch")
        if found != expected:
            type_name = "AdamW" if found == "torch" else "FusedAdamWeightDecay"
            raise ValueError(f"the checkpoint's optimizer state was trained with {found}'s update rule but this "
                             f"recipe's optimizer.type uses {expected}'s: resume with optimizer.type={type_name} "
                             f"(the rule the run started with), or start a new run")
    return check


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
    num_cycles: float = 0.5  # cosine: waves over the decay (0.5: one half-cosine)
    decay_steps: int | None = None  # None: MindFormers' default (see the module doc)

    def __post_init__(self):
        if self.type not in ("polynomial", "cosine", "constant"):
            raise ValueError(f"unknown lr schedule {self.type!r}: use polynomial, cosine or constant")
        if self.total_steps < 1:
            raise ValueError(f"lr schedule total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr schedule warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.type == "polynomial" and self.decay_steps is not None and \
                max(1, self.decay_steps) < self.total_steps - self.warmup_steps:
            raise ValueError(f"lr_schedule.decay_steps {self.decay_steps} ends the polynomial decay before "
                             f"total_steps {self.total_steps} (minus {self.warmup_steps} warmup steps): MindFormers' "
                             f"formula would then take the lr below lr_end; raise decay_steps or leave it out")

    def __call__(self, step: int) -> float:
        """lr for the update that follows `step` applied ones (MindFormers' formulas, see the module doc)."""
        w, total, decay = self.warmup_steps, self.total_steps, self.decay_steps
        if self.type == "cosine" and step >= (total if decay is None else max(1, decay)):
            return self.lr_end
        if step < w:
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * step / w
        if self.type == "constant":
            return self.learning_rate
        if self.type == "polynomial" and step > total:
            return self.lr_end
        if self.type == "polynomial":
            factor = (1.0 - (step - w) / (max(1, total - w) if decay is None else max(1, decay))) ** self.power
        else:
            progress = (step - w) / max(1, total - w)
            # (never negative: MindFormers' max(0, .) changes nothing)
            factor = 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress))
        return self.lr_end + (self.learning_rate - self.lr_end) * factor

    def state_dict(self) -> dict:
        return asdict(self)


def resolve_total_steps(total_steps: int, steps_per_epoch: int, epochs: int, max_steps: int = -1) -> int:
    """The schedule's length: the recipe's total_steps, or -1 -> max_steps when set (>= 1; -1, 0 or None: not set),
    else the dataset's steps per epoch x epochs (MindFormers: dataset size x epochs)."""
    if total_steps != -1:
        return total_steps
    if max_steps is not None and max_steps > 0:
        return max_steps
    return steps_per_epoch * epochs


def warmup_of(warmup_steps: int, warmup_ratio: float | None, total_steps: int) -> int:
    """MindFormers' _get_warmup_steps: warmup_ratio, when set, gives int(total_steps * warmup_ratio)."""
    return warmup_steps if warmup_ratio is None else int(total_steps * warmup_ratio)


def build_schedule(lr_config: dict, total_steps: int) -> LRSchedule:
    """An LRSchedule from a recipe's lr_schedule section (parsed: every key present) and the resolved number of
    steps."""
    return LRSchedule(type=lr_config["type"], learning_rate=lr_config["learning_rate"],
                      lr_end=lr_config["lr_end"],
                      warmup_steps=warmup_of(lr_config["warmup_steps"], lr_config["warmup_ratio"], total_steps),
                      total_steps=total_steps, power=lr_config["power"],
                      warmup_lr_init=lr_config["warmup_lr_init"], num_cycles=lr_config["num_cycles"],
                      decay_steps=lr_config["decay_steps"])
