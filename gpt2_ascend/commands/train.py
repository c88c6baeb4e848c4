"""Train, finetune, evaluate or predict with GPT-2 from a MindFormers-style recipe (flags follow MindFormers'
run_mindformer.py: --run_mode train | finetune | eval | predict).

All the work is in gpt2_ascend.train (recipe.load_recipe, job.job_from_recipe, run.run_training,
run_modes.evaluate_recipe / predict_recipe); this file only parses.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import traceback

from .hf_flags import EXAMPLES as HF_EXAMPLES, add_hf_flags, hf_flag_overrides
from ..cli import ArgumentParser

EPILOG = """examples:
  # tiny pretrain on WikiText-2 (CPU, a couple of minutes), then look at OUTPUT_DIR/final
  %(prog)s --config configs/gpt2/pretrain_gpt2_tiny.yaml --output_dir out/tiny

  # GPT-2 small from scratch on CUDA, data prepared on the fly from the raw WikiText-2 files
  %(prog)s --config configs/gpt2/pretrain_gpt2_small.yaml --device cuda \\
      --train_dataset_dir $GPT2_DATA_DIR/wikitext-2/wiki.train.tokens \\
      --eval_dataset_dir $GPT2_DATA_DIR/wikitext-2/wiki.valid.tokens --output_dir out/small

  # continue a killed run from its newest complete checkpoint
  %(prog)s --config configs/gpt2/pretrain_gpt2_tiny.yaml --output_dir out/tiny --resume auto

  # LoRA finetune of an HF-format model, overriding recipe keys on the command line
  %(prog)s --config configs/gpt2/finetune_gpt2_small_lora.yaml --load_checkpoint out/small/final \\
      --train_dataset_dir train.npy runner_config.batch_size=4 lr_schedule.learning_rate=5e-4

  # SST-2 classification finetune (dev accuracy at the end)
  %(prog)s --config configs/gpt2/finetune_gpt2_small_txtcls.yaml --load_checkpoint out/small/final \\
      --train_dataset_dir $GPT2_DATA_DIR/sst2/train.tsv --eval_dataset_dir $GPT2_DATA_DIR/sst2/dev.tsv

  # MindFormers' evaluation and prediction commands, with MindFormers' own weights (.ckpt) loaded directly
  %(prog)s --config configs/gpt2/pretrain_gpt2_small.yaml --run_mode eval --epochs 1 \\
      --load_checkpoint gpt2.ckpt --eval_dataset_dir $GPT2_DATA_DIR/wikitext-2/wiki.valid.tokens
  %(prog)s --config configs/gpt2/predict_gpt2_small.yaml --run_mode predict --load_checkpoint gpt2.ckpt \\
      --predict_data "I love Beijing, because"
  # ... or a MindFormers distributed run's output/ (checkpoint/rank_N/ + strategy/), merged on the fly
  %(prog)s --config configs/gpt2/finetune_gpt2_small.yaml --load_checkpoint output/ \\
      --train_dataset_dir train.npy

""" + HF_EXAMPLES + """
Outputs in OUTPUT_DIR: metrics.jsonl, tensorboard/, loss_curve.png, checkpoint/step_N/, final/ (HF format),
recipe.yaml (the resolved recipe) and summary.json. run_mode eval prints the recipe's metric (and one JSON
line); predict prints each prompt with its continuation. Recipe keys can also be set MindFormers' way,
`--runner_config.batch_size 8`. See docs/training.md and docs/evaluation.md.
"""


def str2bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_args(argv=None):
    p = ArgumentParser(description="Train, finetune, evaluate or predict with GPT-2 from a recipe "
                                            "(configs/gpt2/*.yaml).",
                                epilog=EPILOG)
    p.add_argument("--config", required=True, help="recipe YAML (configs/gpt2/pretrain_gpt2_small.yaml) or a "
                                                    "packaged recipe's name (pretrain_gpt2_small)")
    p.add_argument("--run_mode", choices=("train", "finetune", "eval", "predict"),
                   help="train: from scratch (or --load_checkpoint); finetune: from --load_checkpoint; eval: the "
                        "recipe's metric on --eval_dataset_dir; predict: continue --predict_data")
    p.add_argument("--train_dataset_dir", help="prepared .npy/.npz or raw wiki.*.tokens / .txt / .tsv")
    p.add_argument("--eval_dataset_dir", help="validation data, same forms; evaluated at the end (and every "
                                              "eval_step_interval steps with do_eval)")
    p.add_argument("--load_checkpoint", help="HF-format GPT-2 directory or hub id, OUTPUT_DIR/checkpoint/step_N, a "
                                             "PEFT adapter directory (continues training it), a MindFormers .ckpt "
                                             "file (its shape, the recipe's heads), or a MindFormers distributed "
                                             "checkpoint: output/ (checkpoint/ and strategy/ inside)")
    p.add_argument("--src_strategy_path_or_dir", help="the strategy of a distributed --load_checkpoint "
                                                      "output/checkpoint/ (output/strategy/ or one strategy file)")
    p.add_argument("--predict_data", nargs="+", metavar="TEXT",
                   help="run_mode predict: the prompt(s); a literal \\n in a single one is a newline")
    p.add_argument("--predict_batch_size", type=int, help="run_mode predict: prompts per batch (default batch_size)")
    p.add_argument("--epochs", type=int, help="runner_config.epochs")
    p.add_argument("--batch_size", type=int, help="runner_config.batch_size")
    p.add_argument("--gradient_accumulation_steps", type=int, help="runner_config.gradient_accumulation_steps")
    p.add_argument("--output_dir", help="where metrics, checkpoints and final/ go")
    p.add_argument("--max_steps", type=int, help="stop after N optimizer steps (the schedule spans them); its "
                                                 "evaluations then read at most the rows it trains on")
    p.add_argument("--max_eval_samples", type=int, metavar="N", help="eval_dataset.max_samples: evaluate the first N "
                                                                     "rows (HF's run_clm.py flag)")
    p.add_argument("--max_eval_batches", type=int, metavar="N",
                   help="eval_dataset.max_batches: each evaluation stops after N batches")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: newest complete checkpoint in OUTPUT_DIR/checkpoint; or a step_N directory")
    p.add_argument("--device", help="auto | cpu | cuda[:N] | npu[:N]")
    p.add_argument("--use_parallel", type=str2bool, metavar="True|False",
                   help="use the recipe's parallel section (needs torchrun for more than one device)")
    p.add_argument("--seed", type=int, help="global seed (model init, dropout, data order)")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an OUTPUT_DIR that already holds a run (its checkpoints are deleted)")
    add_hf_flags(p)  # datasets columns and format, tokenizing processes, trackers
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="recipe overrides, e.g. runner_config.batch_size=8 lr_schedule.learning_rate=3e-4")
    argv, dotted = mindformers_style_overrides(list(sys.argv[1:] if argv is None else argv), p)
    args = p.parse_intermixed_args(argv)  # section.key=value overrides may come before or after flags
    args.overrides = dotted + list(args.overrides)
    return args


def mindformers_style_overrides(argv: list[str], parser) -> tuple[list[str], list[str]]:
    """(the other arguments, the recipe overrides: run_mindformer.py's `--section.key value` pairs as section.key=value,
    and the section.key=value words themselves, taken out before argparse sees them: a --predict_data TEXT [TEXT ...]
    in front would swallow them as prompts)."""
    rest, out = [], []
    while argv:
        arg = argv.pop(0)
        if is_override(arg):
            out.append(arg)
            continue
        name, has_value, value = arg[2:].partition("=")
        if not (arg.startswith("--") and "." in name):
            rest.append(arg)
            continue
        if not has_value:
            if not argv:
                parser.error(f"{arg} needs a value")
            value = argv.pop(0)
        out.append(f"{name}={value}")
    return rest, out


def is_override(word: str) -> bool:
    """A recipe override, section.key=value or key=value, whose first name is a recipe key (not a prompt's text)."""
    from gpt2_ascend.train.recipe import SCHEMA
    match = re.match(r"([A-Za-z_]\w*)(\.[A-Za-z_]\w*)*=", word)
    return bool(match) and match.group(1) in SCHEMA


# the flags that set a recipe key
FLAG_KEYS = dict(run_mode="run_mode", train_dataset_dir="train_dataset.data_loader.dataset_dir",
                 eval_dataset_dir="eval_dataset.data_loader.dataset_dir", load_checkpoint="load_checkpoint",
                 src_strategy_path_or_dir="src_strategy_path_or_dir", output_dir="output_dir",
                 max_steps="runner_config.max_steps", max_eval_samples="eval_dataset.max_samples",
                 max_eval_batches="eval_dataset.max_batches", resume="resume_training",
                 device="device", use_parallel="use_parallel", seed="seed", epochs="runner_config.epochs",
                 batch_size="runner_config.batch_size",
                 gradient_accumulation_steps="runner_config.gradient_accumulation_steps")


def flag_of_key(args) -> dict:
    """{recipe key: the flag given for it}: a bad value is then named by its flag (--batch_size), not the file."""
    keys = {**FLAG_KEYS, "preprocessing_num_workers": "preprocessing_num_workers"}  # (an HF flag: hf_flags.py)
    return {key: f"--{flag}" for flag, key in keys.items() if getattr(args, flag, None) is not None}


def overrides_from_flags(args) -> list[str]:
    """The flags as recipe overrides (applied before the free-form ones, which win)."""
    out = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = "'" + value.replace("'", "''") + "'"  # a path stays a string in YAML
            else:
                text = str(value)
            out.append(f"{key}={text}")
    return out + hf_flag_overrides(args)


PATH_FLAGS = ("config", "train_dataset_dir", "eval_dataset_dir", "load_checkpoint", "output_dir", "resume")


def check_path_flags(args):
    """Paths with a control character are refused before they reach the recipe (YAML would fold a newline into a
    space: --output_dir $'a\\nb' wrote into 'a b'), and symlink loops are named."""
    from gpt2_ascend.fileio import check_path
    for flag in PATH_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str) and not (flag == "resume" and value == "auto"):
            check_path(value, f"--{flag}")


def flag_names():
    """How the run's errors name what to change: this command's flags."""
    from gpt2_ascend.train.job import ArgumentNames
    return ArgumentNames(overwrite="--overwrite_output_dir", resume_auto="--resume auto", output_dir="--output_dir",
                         max_steps="--max_steps", load_checkpoint="--load_checkpoint", train_data="--train_dataset_dir PATH",
                         use_parallel="--use_parallel True", no_parallel="--use_parallel False",
                         run_mode_train="--run_mode train", precision="model.model_config.compute_dtype={dtype}",
                         device_cpu="--device cpu", eval_max_samples="--max_eval_samples",
                         eval_max_batches="--max_eval_batches")


def report_error(e: Exception):
    """One line on stderr. Under torchrun a recipe / layout / checkpoint problem (ValueError) is the same on
    every rank, so rank 0 alone says it; other errors may be one rank's own and carry its number."""
    from gpt2_ascend.train import TrainingStopped
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and isinstance(e, (ValueError, TrainingStopped)):  # (the ranks agree on a divergence)
        return
    prefix = f"[rank {rank}] " if rank != 0 else ""
    from gpt2_ascend.cli import print_error
    print_error(e, prefix)


def resume_command(argv=None, ending: str | None = "--resume auto") -> str:
    """This command with --resume auto (or `ending`: --overwrite_output_dir, or nothing) in place of --resume X /
    --overwrite_output_dir: how to continue (or start again)."""
    from ..cli import invoked_words
    program = invoked_words("python train.py" if argv is not None else "")  # as the user typed it
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        flag = "--" + arg[2:].replace("-", "_") if arg.startswith("--") else arg  # --overwrite-output-dir too
        if flag == "--resume" and args:
            args.pop(0)
        elif not (flag.startswith(("--resume=", "resume_training=")) or flag == "--overwrite_output_dir"):
            kept.append(arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun runs a Python script or module itself, and a console script with --no-python
        launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world))]
        program = launcher + (program[1:] if program[0] == "python" else ["--no-python", *program])
    return shlex.join([*program, *kept, *(ending.split() if ending else [])])


def report_interrupt(e: BaseException, argv, output_dir: str | None = None) -> int:
    """Ctrl-C / SIGTERM: one line on rank 0 (where the checkpoint is, how to continue: the resume command only when
    there is a checkpoint to resume from); exit 128 + signal. output_dir: the training run's (None: not a training
    run, or stopped before its recipe was read)."""
    import signal
    signum = getattr(e, "signum", signal.SIGINT)
    if int(os.environ.get("RANK", "0")) == 0:
        name = signal.Signals(signum).name
        if getattr(e, "checkpoint", None):
            line = f"interrupted by {name} after step {e.step}, checkpoint saved: {e.checkpoint}; to continue: " \
                   f"{resume_command(argv)}"
        else:
            line = f"interrupted by {name}: stopped at once; {what_is_left(output_dir, argv)}"
        print(f"error: {line}", file=sys.stderr, flush=True)
    return 128 + signum


def what_is_left(output_dir: str | None, argv) -> str:
    """After a stop at once: how to continue from the newest checkpoint, or that there is none (and how to start
    again), or, outside a training run, that nothing was written."""
    from gpt2_ascend.checkpoints import checkpoint_root, list_checkpoints
    if output_dir is None:
        return "nothing was written"
    if list_checkpoints(checkpoint_root(output_dir)):  # (every write is atomic: the newest complete one)
        return f"complete checkpoints are intact; to continue: {resume_command(argv)}"
    from gpt2_ascend.train.rundir import run_state
    again = resume_command(argv, "--overwrite_output_dir") if run_state(output_dir).kind != "empty" else \
        resume_command(argv, None)
    return f"no checkpoint was saved yet, so there is nothing to resume; to start again: {again}"


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt2_ascend.parallel.mesh import ranks_done, started_process_group
    try:
        code = train_and_report(args, argv)
    except BaseException:
        if not started_process_group():
            raise
        traceback.print_exc()  # as Python would have printed it
        exit_now(1)
    if started_process_group():
        if code == 0:  # every rank finished (after an error another rank may be stuck in a collective: no barrier)
            ranks_done()
        exit_now(code)
    return code


def exit_now(code: int):
    """A torchrun rank's end, once its run has written and closed everything: straight out of the process.
    Python's own teardown of a rank (torch's C++ threads of the store and the process groups) sometimes died of
    `terminate called without an active exception` (SIGABRT) on a loaded machine after the run had finished,
    and torchrun then reported the finished run as failed (seen 3 times in 2 suites beside a busy loop on each
    core; destroying the process group first was not enough). The ranks leave together (ranks_done) and skip it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_and_report(args, argv) -> int:
    from gpt2_ascend.checkpoints import CheckpointError
    from gpt2_ascend.train import TrainingStopped, run_training
    from gpt2_ascend.train.interrupt import TrainingInterrupted
    from gpt2_ascend.train.job import job_from_recipe
    from gpt2_ascend.train.recipe import load_recipe

    output_dir = None  # a training run's, once known: what an interruption leaves there
    try:
        check_path_flags(args)
        recipe = load_recipe(args.config, overrides_from_flags(args) + list(args.overrides), flags=flag_of_key(args))
        if recipe.run_mode == "eval":
            return report_eval(recipe)
        if recipe.run_mode == "predict":
            return report_predict(recipe, predict_texts(args.predict_data), args.predict_batch_size)
        job = job_from_recipe(recipe, names=flag_names())
        output_dir = job.output_dir
        summary = run_training(job, overwrite=args.overwrite_output_dir)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        return report_interrupt(e, argv, output_dir)
    except TrainingStopped as e:  # the run itself failed (it diverged), not its input: exit 1
        report_error(e)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError, OSError) as e:
        report_error(e)
        return 2
    if not summary:  # a distributed run's other ranks: rank 0 reports
        return 0
    parts = [f"{summary['steps']} steps in {summary['seconds']:.1f}s"]
    if summary.get("final_loss") is not None:
        parts.append(f"final train loss {summary['final_loss']:.4f}")
    for key, label in (("eval_loss", "validation loss"), ("eval_ppl", "validation perplexity"),
                       ("eval_accuracy", "dev accuracy")):
        if summary.get(key) is not None:
            parts.append(f"{label} {summary[key]:.4f}")
    print("done: " + ", ".join(parts))
    print(f"model: {summary['final']}  metrics: {summary['metrics']}")
    return 0


def predict_texts(predict_data: list[str] | None) -> list[str]:
    """MindFormers' reading of --predict_data: several texts are a list; one has its literal \\n made newlines."""
    if not predict_data:
        return []
    if len(predict_data) == 1:
        return [predict_data[0].replace("\\n", "\n")]
    return list(predict_data)


def report_eval(recipe) -> int:
    from gpt2_ascend.eval.runner import nonfinite_problem
    from gpt2_ascend.fileio import json_safe
    from gpt2_ascend.train.run_modes import evaluate_recipe, metric_of
    result = evaluate_recipe(recipe)
    print(metric_of(recipe).mindformers_line(result))
    problem = nonfinite_problem({key.lower(): value for key, value in result.items()})
    print(json.dumps(json_safe(dict(result, error=problem) if problem else result), allow_nan=False))
    if problem:  # printed, flagged, and not a success
        raise ValueError(problem)
    return 0


def report_predict(recipe, texts: list[str], batch_size: int | None) -> int:
    from gpt2_ascend.train.run_modes import predict_recipe
    out = predict_recipe(recipe, texts, batch_size, on_text=lambda prompt, text: print(prompt + text, flush=True))
    rate = out["new_tokens"] / max(out["seconds"], 1e-9)
    print(f"{len(texts)} prompt(s), {out['new_tokens']} new tokens in {out['seconds']:.2f} s ({rate:.1f} tokens/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
