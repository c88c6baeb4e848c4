"""Evaluation: language-model perplexity (token / MindFormers / sliding-window protocols) and classification
accuracy, and `evaluate` (runner.py), the one entry point that computes the metric a model's head carries. evaluate.py,
train.py --run_mode eval and a training run's evaluations all go through it."""
from .classification import classification_accuracy
from .perplexity import PROTOCOLS, EvaluationStopped, perplexity, token_nll
from .runner import METRICS, evaluate

__all__ = ["perplexity", "classification_accuracy", "token_nll", "PROTOCOLS", "evaluate", "METRICS",
           "EvaluationStopped"]
