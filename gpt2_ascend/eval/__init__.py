"""Evaluation: language-model perplexity (token / MindFormers / sliding-window protocols) and
classification accuracy. `evaluate.py` is the command-line shell around these."""
from .classification import classification_accuracy
from .perplexity import PROTOCOLS, perplexity, token_nll

__all__ = ["perplexity", "classification_accuracy", "token_nll", "PROTOCOLS"]
