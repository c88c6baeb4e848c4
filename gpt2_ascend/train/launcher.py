"""What the launcher asks of a run, read from its environment before anything is built: `accelerate launch`'s
mixed precision and --cpu, and the world size of any launcher (torchrun or accelerate launch). run.start applies it
to the TrainJob, whether the job came from a recipe (train.py) or from Python.

    ACCELERATE_MIXED_PRECISION  bf16 / fp16 (accelerate launch --mixed_precision, or its config file): the compute
                                precision. A job set to the other half precision is refused in one line; an fp32 job
                                takes accelerate's. `no` leaves the job's: accelerate sets it whenever
                                --mixed_precision is not given, so it cannot mean "override to fp32".
    ACCELERATE_USE_CPU          true (accelerate launch --cpu): device cpu
    WORLD_SIZE N > 1            with no parallel layout in the job (use_parallel false, or a layout of 1 x 1 x 1):
                                data parallel over the N processes, said in one log line, as nanoGPT and HF's
                                Trainer do. An explicit layout that does not multiply to N stays an error
                                (parallel/mesh.py).

accelerate's FSDP / DeepSpeed plugins and its dynamo settings are not read: the job's parallel layout
(optimizer_shard is FSDP2) and its compile setting decide those.
"""
from __future__ import annotations

import os
from dataclasses import replace

from .job import TrainJob, recipe_with
from .recipe import PRECISION_DTYPES as DTYPES  # in messages: the recipe's compute_dtype words

ACCELERATE_PRECISIONS = ("bf16", "fp16")  # accelerate's names are the trainer's


def apply_launcher(job: TrainJob, env=None, log=print) -> TrainJob:
    """The job with the launcher's choices applied (and written into its recipe record, recipe.yaml), or the job
    itself when there are none; a choice that contradicts the job is a one-line ValueError."""
    changes = launcher_changes(job, env, log)
    if not changes:
        return job
    recipe = recipe_with(job.recipe, **changes)
    precision = changes.pop("precision", None)
    settings = replace(job.settings, precision=precision) if precision else job.settings
    return replace(job, settings=settings, recipe=recipe, **changes)


def launcher_changes(job: TrainJob, env=None, log=print) -> dict:
    """What the launcher's environment changes in the job: precision, device, use_parallel and parallel."""
    env = os.environ if env is None else env
    if int(env.get("RANK", "0")) != 0:  # every rank decides the same; rank 0 says it
        log = lambda *args, **kwargs: None  # noqa: E731
    return dict(**precision_change(job, env, log), **device_change(job, env), **layout_change(job, env, log))


def precision_change(job: TrainJob, env, log=print) -> dict:
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if mixed in ("", "no"):
        return {}
    if mixed not in ACCELERATE_PRECISIONS:
        raise ValueError(f"accelerate launch --mixed_precision {mixed} is not supported here: use bf16, fp16 or no")
    have = job.settings.precision
    if have == mixed:
        return {}
    if have != "fp32":
        setting = job.names.precision
        raise ValueError(f"accelerate launch asks for {mixed} mixed precision but the run is set to {have} "
                         f"({setting.format(precision=have, dtype=DTYPES[have])}): pass --mixed_precision {have} to "
                         f"accelerate launch, or set {setting.format(precision=mixed, dtype=DTYPES[mixed])}")
    log(f"compute dtype {DTYPES[mixed]}: accelerate launch --mixed_precision {mixed}")
    return dict(precision=mixed)


def device_change(job: TrainJob, env) -> dict:
    if env.get("ACCELERATE_USE_CPU", "").strip().lower() not in ("true", "1", "yes") or job.device == "cpu":
        return {}
    if job.device != "auto":
        raise ValueError(f"accelerate launch --cpu runs on the CPU but the run's device is {job.device}: drop --cpu, "
                         f"or set {job.names.device_cpu}")
    return dict(device="cpu")


def layout_change(job: TrainJob, env, log=print) -> dict:
    world = int(env.get("WORLD_SIZE", "1"))
    pc = job.parallel
    if world <= 1 or (job.use_parallel and pc.devices > 1):
        return {}  # one process, or an explicit layout (checked against the world size where the mesh is built)
    why = "1 x 1 x 1" if job.use_parallel else "use_parallel is false"
    log(f"{world} processes and no parallel layout ({why}): data parallel over {world} (data_parallel={world})")
    # a layout that was not in use brings no sharding with it: plain DDP
    return dict(use_parallel=True, parallel=replace(pc, data_parallel=world, model_parallel=1, pipeline_stage=1,
                                                    optimizer_shard=pc.optimizer_shard and job.use_parallel))
