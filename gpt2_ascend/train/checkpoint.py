"""How a Trainer saves and restores itself: two Checkpointers for the two kinds of checkpoint directory
(gpt2_ascend/checkpoints.py describes the format).

    FileCheckpointer      one process: model.pt, optimizer.pt, trainer.pt and config.json
    ShardedCheckpointer   torchrun: every rank writes its shards with torch.distributed.checkpoint, and its own
                          loop state as rank_N.pt (parallel/checkpoint.py); restored in any layout
"""
from __future__ import annotations

import os

from .. import checkpoints as ckpt


class FileCheckpointer:
    """OUTPUT_DIR/checkpoint/step_N/ of one process. json_files: extra files of every checkpoint ({name: object},
    the model's config.json); meta: what the manifest records about the run (its prefix, LoRA, start weights)."""

    def __init__(self, output_dir: str, keep: int | None = 3, meta: dict | None = None,
                 json_files: dict | None = None):
        self.root = ckpt.checkpoint_root(output_dir)
        self.keep, self.meta, self.json_files = keep, dict(meta or {}), dict(json_files or {})

    def path(self, step: int) -> str:
        return os.path.join(self.root, ckpt.step_dir_name(step))

    def save(self, trainer) -> str:
        return ckpt.save_checkpoint(self.root, trainer.step, trainer.state_dict(), json_files=self.json_files,
                                    meta=dict(self.meta, step=trainer.step), keep=self.keep)

    def load(self, trainer, path: str):
        with ckpt.reading(path):
            states = ckpt.load_checkpoint(path)
        trainer.load_state_dict(states)


class ShardedCheckpointer(FileCheckpointer):
    """A torchrun run's checkpoints: the weights and optimizer in DCP shards, config.json with the model and the
    layout it was written in (model_meta), one rank_N.pt per rank. Every rank calls save and load."""

    def __init__(self, output_dir: str, dims, keep: int | None = 3, meta: dict | None = None,
                 model_meta: dict | None = None):
        super().__init__(output_dir, keep, meta)
        self.dims, self.model_meta = dims, dict(model_meta or {})

    def save(self, trainer) -> str:
        from ..parallel.checkpoint import save_sharded
        pc = self.dims.pc
        path = self.path(trainer.step)
        meta = dict(self.model_meta, step=trainer.step, layout=dict(
            data_parallel=pc.data_parallel, model_parallel=pc.model_parallel, pipeline_stage=pc.pipeline_stage))
        save_sharded(path, trainer.model, trainer.optimizer, trainer.trainer_state(), meta,
                     manifest_meta=dict(self.meta, step=trainer.step, sharded=True))
        if self.dims.is_main and self.keep:
            ckpt.prune(self.root, self.keep)
        self.dims.barrier()
        return path

    def load(self, trainer, path: str):
        from ..parallel.checkpoint import load_sharded
        with ckpt.reading(path):
            state = load_sharded(path, trainer.model, trainer.optimizer)
        trainer.load_trainer_state(state)
