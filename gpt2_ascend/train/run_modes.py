"""run_mode eval and predict: what MindFormers' `run_mindformer.py --run_mode eval | predict` does with a recipe.

    evaluate_recipe(recipe)         the recipe's metric on its eval_dataset with load_checkpoint's weights:
                                    PerplexityMetric (MindFormers' number: the mean of per-batch mean losses over
                                    blocks of seq_length) or Accuracy (a sequence classifier)
    predict_recipe(recipe, texts)   continuations of texts with the recipe's generation settings

train.py dispatches run_mode train / finetune to run.run_training and these two to here. Both read the recipe through
its TrainJob (job.job_from_recipe) and load the model as a run does (loading.load_model).
"""
from __future__ import annotations

import time

import torch

from .. import device as dev
from ..loading import load_model
from ..model import model_class
from .job import job_from_recipe
from .recipe import generation_config, precision
from .run import check_data, read_split, report_source, require_source, source_arguments
from .trainer import seed_everything



def inference_model(recipe, log=print):
    """(model, device): load_checkpoint's weights through loading.load_model (any source it takes; LoRA adapters
    merged, a .ckpt's heads from the recipe: run.source_arguments) on the recipe's device, in eval mode."""
    if not recipe.load_checkpoint:
        raise ValueError(f"run_mode {recipe.run_mode} needs trained weights: pass --load_checkpoint (an HF-format "
                         f"directory, OUTPUT_DIR/checkpoint/step_N or a MindFormers .ckpt)")
    device = dev.resolve_device(recipe.device)
    dev.set_device(device)
    spec = job_from_recipe(recipe).model
    require_source(spec.source)
    model = load_model(spec.source, spec.architecture, dtype=torch.float32, device=device,
                       **source_arguments(spec))
    report_source(spec, model, log)
    return model.eval(), device


def metric_of(recipe):
    """The metric the recipe's head computes (eval.runner METRICS); a metric.type of another head is refused."""
    from ..eval.runner import metric_of as head_metric
    architecture = recipe.model.arch.type
    metric = head_metric(model_class(architecture))
    if recipe.metric.type not in (None, metric.mindformers):
        raise ValueError(f"metric {recipe.metric.type} does not apply to {architecture}: use metric.type="
                         f"{metric.mindformers} (or leave metric out)")
    return metric


def evaluate_recipe(recipe, log=print, progress: bool = True) -> dict:
    """The recipe's metric on eval_dataset (eval.runner.evaluate, the one entry point: MindFormers' PerplexityMetric,
    the mean of per-batch mean losses, or Accuracy), batch eval_dataset.batch_size (null: runner_config.batch_size, as
    MindFormers evaluates), its first eval_dataset.max_samples rows, at eval_dataset.compute_dtype (null: the
    recipe's compute_dtype on GPU / NPU, float32 on the CPU). Returns a dict with MindFormers' keys (loss and PPL, or
    Accuracy) and the run's settings."""
    from ..eval.runner import evaluate
    metric = metric_of(recipe)
    if not recipe.eval_dataset.data_loader.dataset_dir:
        raise ValueError("run_mode eval needs data: pass --eval_dataset_dir PATH (a prepared .npy / .npz, or a raw "
                         "wiki.*.tokens / .txt / .tsv / .csv file)")
    model, device = inference_model(recipe, log)
    job = job_from_recipe(recipe)
    columns = check_data(read_split(job, job.eval_data, default_split="validation"), model, "evaluation data")
    batch_size = recipe.eval_dataset.batch_size or recipe.runner_config.batch_size
    prec = job.eval_precision or ("fp32" if device.type == "cpu" else precision(recipe))
    start = time.perf_counter()
    r = evaluate(model, columns, batch_size, prec, protocol="mindformers", progress=progress)
    result = {metric.mindformers_keys.get(k, k): v for k, v in r.items() if k not in ("metric", "protocol", "rows")}
    return dict(metric=metric.mindformers, **result, batch_size=batch_size, precision=prec, device=str(device),
                load_checkpoint=recipe.load_checkpoint, dataset=recipe.eval_dataset.data_loader.dataset_dir,
                seconds=round(time.perf_counter() - start, 3))


def predict_recipe(recipe, texts: list[str], batch_size: int | None = None, log=print, on_text=None) -> dict:
    """Continuations of `texts` (left-padded batches of batch_size, default runner_config.batch_size) with the
    recipe's generation settings (max_decode_length = prompt + new tokens, top_k, top_p, do_sample,
    repetition_penalty, seed), through the one generation entry point (predict.generate_texts: on_text(prompt, text)
    as each is done). Returns dict(results=[dict(prompt, text)], new_tokens, seconds): the new tokens counted by
    re-tokenizing the generated text, the seconds of the generation (loading not included)."""
    from ..data.tokenizer import default_tokenizer_dir, load_tokenizer, tokenizer_for
    from ..predict import generate_texts
    if not hasattr(model_class(recipe.model.arch.type), "generate"):
        raise ValueError(f"run_mode predict generates text, which a {recipe.model.arch.type} does not: use a "
                         f"GPT2LMHeadModel recipe (predict_gpt2_*.yaml)")
    texts = [t for t in texts if t is not None]
    if not texts:
        raise ValueError("run_mode predict needs input: pass --predict_data TEXT [TEXT ...]")
    job = job_from_recipe(recipe)
    tokenizer = load_tokenizer(job.tokenizer or tokenizer_for(job.model.source) or default_tokenizer_dir())
    model, device = inference_model(recipe, log)
    settings = generation_config(recipe)
    seed_everything(recipe.seed, device)
    kw = dict(max_decode_length=settings["max_decode_length"], do_sample=settings["do_sample"],
              top_k=settings["top_k"], top_p=settings["top_p"], temperature=settings["temperature"],
              repetition_penalty=settings["repetition_penalty"], seed=recipe.seed)
    return generate_texts(model, tokenizer, texts, batch_size=batch_size or recipe.runner_config.batch_size,
                          on_text=on_text, **kw)
