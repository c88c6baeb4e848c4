"""Where torch_npu releases differ, version by version, as read from Ascend's sources.

Each release tag of Ascend/pytorch (`v7.3.0-pytorch2.7.1`, ...) pins an Ascend/op-plugin commit
(the `third_party/op-plugin` submodule) and names its package version in `version.txt`; the facts
below come from those files at those tags:

  npu_fast_gelu backward   op_plugin/config/derivatives.yaml gains `- name: npu_fast_gelu(Tensor self)`
                           in op-plugin 7.3.0. Without it the op has no AutogradPrivateUse1 kernel and
                           torch_npu's fallback (torch_npu/csrc/aten/VariableFallbackKernel.cpp) warns
                           once at backward and passes no gradient. `fast_gelu` (the same FastGelu
                           kernel) has had its derivative since op-plugin 5.0.
  inductor backend         torch_npu/_inductor exists from torch_npu 2.6.0 (v2.6.0-7.1.0) on.
  _ShardedGradScaler       torch_npu/npu/amp/sharded_grad_scaler.py: `__init__(init_scale, ...)` up to
                           26.0.x; `__init__(device="npu", init_scale, ...)` from 26.1.0 on.
"""
from __future__ import annotations

import re

# base release -> first .postN with the npu_fast_gelu derivative (op-plugin 7.3.0: v7.3.0-pytorch2.6.0 is
# 2.6.0.post5, v7.3.0-pytorch2.7.1 is 2.7.1.post2, v7.3.0-pytorch2.8.0 is 2.8.0.post2; 2.7.1 / .post1
# and 2.8.0 / .post1 are op-plugin 7.2.0 / 7.2.0.1). 2.9.0 and later have it in every release.
NPU_FAST_GELU_BACKWARD_FROM_POST = {(2, 6, 0): 5, (2, 7, 1): 2, (2, 8, 0): 2}
NPU_FAST_GELU_BACKWARD_FROM_BASE = (2, 9, 0)
INDUCTOR_FROM_BASE = (2, 6, 0)
# 26.1.0: 2.7.1.post8, 2.9.0.post6, 2.10.0.post4, 2.11.0 (no 2.8.0 release in 26.1.0)
SCALER_DEVICE_ARG_FROM_POST = {(2, 7, 1): 8, (2, 9, 0): 6, (2, 10, 0): 4}
SCALER_DEVICE_ARG_FROM_BASE = (2, 11, 0)


def parse(version: str) -> tuple[tuple[int, int, int], int]:
    """'2.7.1.post2' -> ((2, 7, 1), 2); '2.9.0' -> ((2, 9, 0), 0)."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", version)
    if not match:
        raise ValueError(f"not a torch_npu release version: {version!r} (e.g. 2.7.1 or 2.7.1.post2)")
    major, minor, patch, post = match.groups()
    return (int(major), int(minor), int(patch)), int(post or 0)


def _from(version: str, by_post: dict, from_base: tuple) -> bool:
    base, post = parse(version)
    if base >= from_base:
        return True
    return base in by_post and post >= by_post[base]


def npu_fast_gelu_has_backward(version: str) -> bool:
    return _from(version, NPU_FAST_GELU_BACKWARD_FROM_POST, NPU_FAST_GELU_BACKWARD_FROM_BASE)


def has_inductor(version: str) -> bool:
    return parse(version)[0] >= INDUCTOR_FROM_BASE


def scaler_takes_device(version: str) -> bool:
    return _from(version, SCALER_DEVICE_ARG_FROM_POST, SCALER_DEVICE_ARG_FROM_BASE)
