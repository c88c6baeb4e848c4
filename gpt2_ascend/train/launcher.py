"""What the launcher asks of a run, read from its environment before anything is built: `accelerate launch`'s
mixed precision and --cpu, and the world size of any launcher (torchrun or accelerate launch).

    ACCELERATE_MIXED_PRECISION  bf16 / fp16 (accelerate launch --mixed_precision, or its config file): the compute
                                dtype. A recipe that names the other half precision is refused in one line; a
                                float32 recipe takes accelerate's. `no` leaves the recipe's dtype: accelerate sets it
                                whenever --mixed_precision is not given, so it cannot mean "override to fp32".
    ACCELERATE_USE_CPU          true (accelerate launch --cpu): device cpu
    WORLD_SIZE N > 1            with no parallel layout in the recipe (use_parallel false, or a layout of 1 x 1 x 1):
                                data parallel over the N processes, said in one log line, as nanoGPT and HF's
                                Trainer do. An explicit layout that does not multiply to N stays an error
                                (parallel/mesh.py).

accelerate's FSDP / DeepSpeed plugins and its dynamo settings are not read: the recipe's parallel section
(optimizer_shard is FSDP2) and runner_config.compile decide those.
"""
from __future__ import annotations

import os

ACCELERATE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # accelerate's names -> model_config.compute_dtype
FLAG_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


def launcher_overrides(recipe, env=None, log=print) -> list[str]:
    """The recipe overrides (section.key=value) the launcher's environment asks for; one-line ValueError when it
    contradicts the recipe."""
    env = os.environ if env is None else env
    if int(env.get("RANK", "0")) != 0:  # every rank decides the same; rank 0 says it
        log = lambda *args, **kwargs: None  # noqa: E731
    return precision_overrides(recipe, env, log) + device_overrides(recipe, env) + layout_overrides(recipe, env, log)


def apply_launcher(recipe, env=None, log=print):
    """The recipe with the launcher's choices applied (validated again), or the recipe itself when there are none."""
    overrides = launcher_overrides(recipe, env, log)
    if not overrides:
        return recipe
    from .recipe import load_recipe
    return load_recipe(None, overrides, base=recipe.to_dict())


def precision_overrides(recipe, env, log=print) -> list[str]:
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if mixed in ("", "no"):
        return []
    if mixed not in ACCELERATE_DTYPES:
        raise ValueError(f"accelerate launch --mixed_precision {mixed} is not supported here: use bf16, fp16 or no")
    wanted, have = ACCELERATE_DTYPES[mixed], recipe.model.model_config.compute_dtype
    if have == wanted:
        return []
    if have != "float32":
        raise ValueError(f"accelerate launch asks for {mixed} mixed precision but the recipe's "
                         f"model.model_config.compute_dtype is {have}: pass --mixed_precision {FLAG_OF_DTYPE[have]} "
                         f"to accelerate launch, or set model.model_config.compute_dtype={wanted}")
    log(f"compute dtype {wanted}: accelerate launch --mixed_precision {mixed}")
    return [f"model.model_config.compute_dtype={wanted}"]


def device_overrides(recipe, env) -> list[str]:
    if env.get("ACCELERATE_USE_CPU", "").strip().lower() not in ("true", "1", "yes") or recipe.device == "cpu":
        return []
    if recipe.device != "auto":
        raise ValueError(f"accelerate launch --cpu runs on the CPU but the recipe's device is {recipe.device}: "
                         f"drop --cpu, or pass --device cpu")
    return ["device=cpu"]


def layout_overrides(recipe, env, log=print) -> list[str]:
    world = int(env.get("WORLD_SIZE", "1"))
    p = recipe.parallel
    if world <= 1 or (recipe.use_parallel and p.data_parallel * p.model_parallel * p.pipeline_stage > 1):
        return []  # one process, or an explicit layout (checked against the world size where the mesh is built)
    why = "1 x 1 x 1" if recipe.use_parallel else "use_parallel is false"
    log(f"{world} processes and no parallel layout in the recipe ({why}): data parallel over {world} "
        f"(parallel.data_parallel={world})")
    out = ["use_parallel=true", f"parallel.data_parallel={world}", "parallel.model_parallel=1",
           "parallel.pipeline_stage=1"]
    if not recipe.use_parallel:  # a section that was not in use brings no sharding with it: plain DDP
        out.append("parallel.optimizer_shard=false")
    return out
