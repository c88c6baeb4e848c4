"""MindSpore's files without MindSpore: the `.ckpt` codec, MindFormers' GPT-2 names, parallel strategy files and
distributed checkpoints (every rank's slices, read as one checkpoint).

    read_ckpt / write_ckpt / CkptReader / CkptWriter   the .ckpt codec (ckpt.py)
    MindFormersSource, load_mindspore_model            a MindFormers GPT-2 .ckpt or distributed checkpoint as HF
                                                       tensors / as our model (source.py)
    read_strategy, DistributedCheckpoint               strategy files; rank slices merged (strategy.py,
                                                       distributed.py)

It sits beside hf.py (HF's formats) below the loader, so that loading.load_model reads MindSpore's weights like any
other; convert/ writes files from them (HF directories, merged or re-sliced distributed checkpoints).
"""
