"""Training: a recipe (recipe.py) becomes a TrainJob (job.py), which run.py assembles into a Trainer (trainer.py).

    from gpt2_ascend.train import Trainer, TrainSettings, TrainJob, run_training
"""
from .job import DataSplit, LoraSettings, ModelSpec, OptimizerSettings, TrainJob
from .run import run_training
from .trainer import Trainer, TrainingStopped, TrainSettings

__all__ = ["Trainer", "TrainSettings", "TrainJob", "ModelSpec", "DataSplit", "LoraSettings", "OptimizerSettings",
           "TrainingStopped", "run_training"]
