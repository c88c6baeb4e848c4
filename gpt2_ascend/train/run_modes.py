"""run_mode eval and predict: what MindFormers' `run_mindformer.py --run_mode eval | predict` does with a recipe.

    evaluate_recipe(recipe)         the recipe's metric on its eval_dataset with load_checkpoint's weights:
                                    PerplexityMetric (MindFormers' number: the mean of per-batch mean losses over
                                    blocks of seq_length) or Accuracy (a sequence classifier)
    predict_recipe(recipe, texts)   continuations of texts with the recipe's generation settings

train.py dispatches run_mode train / finetune to run.run_training and these two to here. Both read the recipe through
its TrainJob (job.job_from_recipe) and build the model as a run does (run.model_from_spec).
"""
from __future__ import annotations

import time

from .. import device as dev
from ..model import CLASSIFIER, LANGUAGE_MODEL
from .job import job_from_recipe
from .recipe import generation_config, precision
from .run import check_data, model_from_spec, read_split, seq_length
from .trainer import seed_everything

METRIC_OF_ARCHITECTURE = {LANGUAGE_MODEL: "PerplexityMetric", CLASSIFIER: "Accuracy"}


def inference_model(recipe, log=print):
    """(model, device): the recipe's model with load_checkpoint's weights (HF directory, one of our checkpoints,
    a MindFormers .ckpt, LoRA adapters merged) on the recipe's device, in eval mode."""
    if not recipe.load_checkpoint:
        raise ValueError(f"run_mode {recipe.run_mode} needs trained weights: pass --load_checkpoint (an HF-format "
                         f"directory, OUTPUT_DIR/checkpoint/step_N or a MindFormers .ckpt)")
    device = dev.resolve_device(recipe.device)
    dev.set_device(device)
    model = model_from_spec(job_from_recipe(recipe).model, device, log)
    if hasattr(model, "merge_and_unload"):  # a LoRA recipe: evaluate / generate with the adapters folded in
        model = model.merge_and_unload()
    return model.eval(), device


def metric_of(recipe) -> str:
    """The recipe's metric.type, or the one its model.arch computes; a metric of the other task is refused."""
    architecture = recipe.model.arch.type
    metric = recipe.metric.type or METRIC_OF_ARCHITECTURE[architecture]
    if metric != METRIC_OF_ARCHITECTURE[architecture]:
        raise ValueError(f"metric {metric} does not apply to {architecture}: use metric.type="
                         f"{METRIC_OF_ARCHITECTURE[architecture]} (or leave metric out)")
    return metric


def evaluate_recipe(recipe, log=print, progress: bool = True) -> dict:
    """The recipe's metric on eval_dataset, batch eval_dataset.batch_size (null: runner_config.batch_size, as
    MindFormers evaluates), precision from compute_dtype. Returns a dict with MindFormers' keys (loss and PPL,
    or Accuracy) and the run's settings."""
    from ..eval import classification_accuracy, perplexity
    metric = metric_of(recipe)
    if not recipe.eval_dataset.data_loader.dataset_dir:
        raise ValueError("run_mode eval needs data: pass --eval_dataset_dir PATH (a prepared .npy / .npz, or a raw "
                         "wiki.*.tokens / .txt / .tsv / .csv file)")
    model, device = inference_model(recipe, log)
    job = job_from_recipe(recipe)
    data = read_split(job, job.eval_data, seq_length(job), default_split="validation")
    columns = check_data(data, model, "evaluation data")
    batch_size = recipe.eval_dataset.batch_size or recipe.runner_config.batch_size
    prec = precision(recipe)
    start = time.perf_counter()
    if metric == "PerplexityMetric":
        seq = recipe.model.model_config.seq_length
        r = perplexity(model, columns["input_ids"], seq, batch_size=batch_size, protocol="mindformers", precision=prec,
                       progress=progress)
        result = dict(loss=r["loss"], PPL=r["ppl"], tokens=r["tokens"], blocks=r["blocks"], seq_length=seq)
    else:
        r = classification_accuracy(model, columns, batch_size=batch_size, precision=prec, progress=progress)
        result = dict(Accuracy=r["accuracy"], correct=r["correct"], total=r["total"], loss=r["loss"],
                      per_class=r["per_class"])
    return dict(metric=metric, **result, batch_size=batch_size, precision=prec, device=str(device),
                load_checkpoint=recipe.load_checkpoint, dataset=recipe.eval_dataset.data_loader.dataset_dir,
                seconds=round(time.perf_counter() - start, 3))


def predict_recipe(recipe, texts: list[str], batch_size: int | None = None, log=print) -> dict:
    """Continuations of `texts` (left-padded batches of batch_size, default runner_config.batch_size) with the
    recipe's generation settings (max_decode_length = prompt + new tokens, top_k, top_p, do_sample,
    repetition_penalty, seed). Returns dict(results=[dict(prompt, text)], new_tokens, seconds): the new tokens
    counted by re-tokenizing the generated text, the seconds of the generation (loading not included)."""
    from ..data.tokenizer import default_tokenizer_dir, load_tokenizer, tokenizer_for
    from ..generation import generate_text
    if recipe.model.arch.type != LANGUAGE_MODEL:
        raise ValueError("run_mode predict generates text: use a GPT2LMHeadModel recipe (predict_gpt2_*.yaml)")
    texts = [t for t in texts if t is not None]
    if not texts:
        raise ValueError("run_mode predict needs input: pass --predict_data TEXT [TEXT ...]")
    model, device = inference_model(recipe, log)
    job = job_from_recipe(recipe)
    tokenizer = load_tokenizer(job.tokenizer or tokenizer_for(job.model.source) or default_tokenizer_dir())
    settings = generation_config(recipe)
    seed_everything(recipe.seed, device)
    kw = dict(max_decode_length=settings["max_decode_length"], do_sample=settings["do_sample"],
              top_k=settings["top_k"], top_p=settings["top_p"], temperature=settings["temperature"],
              repetition_penalty=settings["repetition_penalty"], seed=recipe.seed)
    start = time.perf_counter()
    outputs = generate_text(model, tokenizer, texts, batch_size=batch_size or recipe.runner_config.batch_size, **kw)
    dev.synchronize(device)
    seconds = time.perf_counter() - start
    return dict(results=[dict(prompt=prompt, text=text) for prompt, text in zip(texts, outputs)],
                new_tokens=sum(len(tokenizer(text).input_ids) for text in outputs), seconds=round(seconds, 3))
