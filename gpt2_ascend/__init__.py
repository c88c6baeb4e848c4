"""gpt2_ascend: the GPT-2 family in PyTorch for CPU, CUDA and Ascend NPU, numerically identical to HF."""
from .config import GPT2Config
from .kv_cache import KVCache
from .model import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from .data.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["GPT2Config", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "KVCache",
           "load_tokenizer"]
