"""train.py's flags for the HF workflow (issue 16: datasets sources and experiment trackers), named as HF's
run_clm.py / run_glue.py and TrainingArguments name them, turned into recipe overrides."""
from __future__ import annotations

import json

EXAMPLES = """  # a datasets source: a hub id (NAME:CONFIG:SPLIT, offline from the cache with HF_DATASETS_OFFLINE=1), a
  # save_to_disk folder, or .parquet / .jsonl / .csv / .arrow files; tokenized by Dataset.map on 2 processes
  %(prog)s --config configs/gpt2/pretrain_gpt2_tiny.yaml --output_dir out/hf \\
      --train_dataset_dir wikitext:wikitext-2-raw-v1:train --eval_dataset_dir wikitext:wikitext-2-raw-v1:validation \\
      --preprocessing_num_workers 2 --report_to tensorboard,wandb

  # accelerate launch starts the processes (data parallel over them) and sets the mixed precision
  accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 train.py \\
      --config configs/gpt2/pretrain_gpt2_tiny.yaml --output_dir out/acc
"""


def add_hf_flags(parser):
    group = parser.add_argument_group("datasets sources and experiment trackers (docs/data.md, docs/training.md)")
    group.add_argument("--text_column", help="the text column of a datasets source, for training and evaluation "
                                             "data (default: text; sentence for classification)")
    group.add_argument("--label_column", help="the label column of a datasets source (classification; default label)")
    group.add_argument("--text_format", choices=("auto", "wikitext", "text"),
                       help="how a datasets source's rows make the text: wikitext (WikiText lines: MindFormers' "
                            "cleaning), text (a row is a document), auto (default: wikitext when the first row is a "
                            "' = Heading = ')")
    group.add_argument("--preprocessing_num_workers", type=int, metavar="N",
                       help="processes that tokenize a datasets source (Dataset.map num_proc)")
    group.add_argument("--report_to", metavar="T[,T]",
                       help="experiment trackers, comma-separated: tensorboard (default), wandb, mlflow, or none")


def hf_flag_overrides(args) -> list[str]:
    """The flags as recipe overrides; the column and format flags set both dataset sections, as run_clm.py's do."""
    out = []
    for flag in ("text_column", "label_column", "text_format"):
        value = getattr(args, flag, None)
        if value is not None:
            out += [f"{section}.{flag}={json.dumps(value)}" for section in ("train_dataset", "eval_dataset")]
    if getattr(args, "preprocessing_num_workers", None) is not None:
        out.append(f"preprocessing_num_workers={args.preprocessing_num_workers}")
    if getattr(args, "report_to", None) is not None:
        out.append(f"report_to={json.dumps(args.report_to)}")  # "wandb,mlflow": the list key splits it
    return out
