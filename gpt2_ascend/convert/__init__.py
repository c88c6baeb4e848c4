"""Weight conversion: MindSpore/MindFormers `.ckpt` <-> HF GPT-2, HF resharding, LoRA export.

    hf_to_mindspore(torch_path, mindspore_path)      HF dir/file (or ours) -> MindFormers GPT-2 .ckpt
    mindspore_to_hf(mindspore_path, output_dir)      MindFormers .ckpt -> HF dir (config.json + safetensors)
    load_mindspore_model(mindspore_path)             MindFormers .ckpt -> our model, in memory
    merge_hf_shards(input_dir, output_dir)           reshard an HF checkpoint, one tensor in memory at a time
    merge_lora(base, adapter, output_dir)            fold a PEFT LoRA adapter into its base, write an HF dir
    merge_mindformers_lora(ckpt, output_dir, alpha)  the same for MindFormers' unmerged LoRA .ckpt
    merge_checkpoint(src, dst)                       a training checkpoint (sharded or not) -> HF dir
    transform_ckpt(src_strategy, src_dir, dst_dir)   MindFormers' transform_ckpt.py: a distributed .ckpt merged, or
                                                     cut for another layout (dst_ckpt_strategy)
    load_mindformers_lora(ckpt, alpha)               MindFormers' LoRA .ckpt -> our LoRA (peft) model
    read_ckpt / write_ckpt / CkptReader / CkptWriter the .ckpt codec (no MindSpore needed)
"""
from .checkpoint import merge_checkpoint
from .lora import load_mindformers_lora, merge_lora, merge_mindformers_lora
from ..mindspore_io.ckpt import CkptError, CkptReader, CkptWriter, read_ckpt, write_ckpt
from ..mindspore_io.source import load_mindspore_model
from .mindformers import hf_to_mindspore, mindspore_to_hf
from .shards import WeightIndex, merge_hf_shards
from .transform import transform_ckpt

__all__ = ["hf_to_mindspore", "mindspore_to_hf", "load_mindspore_model", "merge_hf_shards", "merge_lora",
           "merge_mindformers_lora", "load_mindformers_lora", "merge_checkpoint",
           "read_ckpt", "write_ckpt", "CkptReader", "CkptWriter", "CkptError", "WeightIndex", "transform_ckpt"]
