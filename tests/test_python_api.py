"""The Python training API as a notebook uses it: docs/training.md's "From Python" section, run as written (in a
temporary directory), then its numbers checked."""
import copy
import os
import re

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def from_python_code() -> str:
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 5, "the From Python section lost its examples"
    return "\n".join(blocks)


def test_the_from_python_section_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(from_python_code(), "docs/training.md", "exec"), scope)  # noqa: S102 - our own documentation
    said = capsys.readouterr().out
    summary, result, trainer = scope["summary"], scope["result"], scope["trainer"]
    assert summary["steps"] == 12 and [r["step"] for r in summary["history"]] == list(range(1, 13))
    losses = [r["loss"] for r in summary["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # the model held in memory was trained
    assert abs(summary["eval_ppl"] - np.exp(summary["eval_loss"])) <= 1e-9 * summary["eval_ppl"]
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and np.isfinite(result["eval_loss"])
    assert "already holds a training run: pass resume='auto' to continue it, overwrite=True to start over, or " \
           "another output_dir" in said
    assert os.path.isfile(tmp_path / "out" / "notebook" / "final" / "model.safetensors")
    assert trainer.step == 10 and scope["last"]["step"] == 10
    on_text, on_tokens = scope["on_text"], scope["on_tokens"]  # a datasets.Dataset of text, and of token blocks
    assert on_text["steps"] == on_tokens["steps"] == 3
    assert np.isfinite([on_text["final_loss"], on_tokens["final_loss"]]).all()
    assert os.path.isdir(tmp_path / "out" / "notebook" / "tensorboard")  # report_to's default


# ------------------------------------------------------------------------------------------------ datasets objects

def _losses(summary) -> list:
    return [r["loss"] for r in summary["history"]]


def _train(model, train_data, eval_data=None, **job):
    """Three steps from a copy of `model` (each run starts from the same weights), nothing written."""
    from gpt2_ascend.train import TrainJob, TrainSettings, run_training
    return run_training(TrainJob(model=copy.deepcopy(model), train_data=train_data, eval_data=eval_data,
                                 batch_size=4, device="cpu", settings=TrainSettings(total_steps=3, progress=False),
                                 **job))


def test_a_datasets_object_trains_as_the_file_of_its_rows_does(tmp_path, data_dir):
    """A Dataset of WikiText lines gives the run the .tokens file of those lines gives, step for step (eval data from
    a DatasetDict: its validation split); a tokenized Dataset (input_ids rows) the run of the same array."""
    datasets = pytest.importorskip("datasets")
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    from gpt2_ascend.data.sources import load_token_blocks
    from gpt2_ascend.train import DataSplit
    with open(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), encoding="utf-8") as f:
        lines = f.readlines()
    train, held_out = lines[:80], lines[121:132]  # each starts with a heading: auto reads them as WikiText lines
    (tmp_path / "train.tokens").write_text("".join(train), encoding="utf-8")
    (tmp_path / "eval.tokens").write_text("".join(held_out), encoding="utf-8")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("tiny", n_positions=32))  # GPT-2's vocabulary
    from_files = _train(model, DataSplit(str(tmp_path / "train.tokens")), DataSplit(str(tmp_path / "eval.tokens")))
    rows = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": train}),
                                validation=datasets.Dataset.from_dict({"text": held_out}))
    from_rows = _train(model, rows["train"], rows)
    assert len(from_files["history"]) == 3 and _losses(from_rows) == _losses(from_files)
    assert from_rows["eval_loss"] == from_files["eval_loss"]
    blocks = np.asarray(load_token_blocks(str(tmp_path / "train.tokens"), 33))
    tokenized = datasets.Dataset.from_dict({"input_ids": blocks.tolist(), "text": ["unused"] * len(blocks)})
    assert _losses(_train(model, tokenized)) == _losses(from_files)  # its input_ids: the file's blocks
    ragged = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]})
    with pytest.raises(ValueError, match="rows must all be the same length: pack them into blocks first"):
        _train(model, ragged)


def test_a_datasets_object_of_sentences_trains_a_classifier_as_the_tsv_does(data_dir):
    datasets = pytest.importorskip("datasets")
    from gpt2_ascend import GPT2Config, GPT2ForSequenceClassification
    from gpt2_ascend.data.txtcls import prepare_txtcls, read_sst2
    from gpt2_ascend.train import DataSplit
    tsv = os.path.join(data_dir, "sst2", "dev.tsv")
    sentences, labels = read_sst2(tsv)
    want = {k: v[:24] for k, v in prepare_txtcls(tsv, 32).items()}
    torch.manual_seed(0)
    classifier = GPT2ForSequenceClassification(GPT2Config.from_preset("tiny", n_positions=32))
    reviews = datasets.Dataset.from_dict({"review": sentences[:24], "stars": labels[:24].tolist()})
    from_arrays = _train(classifier, want, want)
    from_rows = _train(classifier, DataSplit(reviews, text_column="review", label_column="stars"),
                       DataSplit(reviews, text_column="review", label_column="stars"))
    assert _losses(from_rows) == _losses(from_arrays) and from_rows["eval_accuracy"] == from_arrays["eval_accuracy"]
    # tokenized rows padded with another id than the pad id (a tokenizer's own pad token, "!" = 0): the Dataset's
    # attention_mask decides what is pooled, as the arrays' does; pooling by the pad id would take the last "!"
    repadded = dict(want, input_ids=np.where(want["attention_mask"] == 1, want["input_ids"], 0))
    tokenized = datasets.Dataset.from_dict({k: v.tolist() for k, v in repadded.items()})
    from_tokenized = _train(classifier, tokenized, tokenized)
    assert _losses(from_tokenized) == _losses(_train(classifier, repadded, repadded))
    assert np.allclose(_losses(from_tokenized), _losses(from_arrays), rtol=1e-6, atol=0)  # the pad id plays no part
    assert abs(from_tokenized["eval_loss"] - from_arrays["eval_loss"]) <= 1e-6 * from_arrays["eval_loss"]


def test_report_to_from_python(tmp_path):
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.train import TrainJob, TrainSettings, run_training
    from gpt2_ascend.train.run import run_config
    from gpt2_ascend.train.trackers import flat_params
    from conftest import tiny_config
    model = GPT2LMHeadModel(tiny_config(n_positions=16))
    blocks = np.random.default_rng(0).integers(0, 512, (8, 17))
    job = dict(model=model, train_data=blocks, batch_size=4, device="cpu",
               settings=TrainSettings(total_steps=1, progress=False))
    with pytest.raises(ValueError, match=r"^report_to names wandb, whose files go in the run's output_dir: pass one, "
                                         r"or drop wandb from report_to$"):
        run_training(TrainJob(**job, report_to=("tensorboard", "wandb")))
    with pytest.raises(ValueError, match=r"^unknown tracker 'comet' in report_to: use tensorboard, wandb, mlflow, or "
                                         r"none$"):
        run_training(TrainJob(**job, output_dir=str(tmp_path / "comet"), report_to=("comet",)))
    assert not (tmp_path / "comet").exists()
    run_training(TrainJob(**job, output_dir=str(tmp_path / "quiet"), report_to=()))
    assert (tmp_path / "quiet" / "metrics.jsonl").is_file() and not (tmp_path / "quiet" / "tensorboard").exists()
    params = flat_params(run_config(TrainJob(**job, output_dir="out/x")))  # a Python job's config, for the trackers
    assert params["settings.total_steps"] == "1" and params["batch_size"] == "4" and params["output_dir"] == "out/x"
    assert params["architecture"] == "GPT2LMHeadModel" and params["report_to"] == '["tensorboard"]'


IN_MEMORY_UNDER_TORCHRUN = """
import os
import numpy as np, torch
from gpt2_ascend import GPT2Config, GPT2LMHeadModel
from gpt2_ascend.train import OptimizerSettings, TrainJob, TrainSettings, run_training
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config.from_preset("tiny", vocab_size=512, n_positions=32))
blocks = np.random.default_rng(0).integers(0, 512, (64, 33))
summary = run_training(TrainJob(model=model, train_data=blocks, batch_size=4, device="cpu",
                                settings=TrainSettings(total_steps=3, progress=False),
                                optimizer=OptimizerSettings(learning_rate=1e-3)))
with open(f"finished_{os.environ['RANK']}.txt", "w") as f:  # each rank's own file: prints of two ranks interleave
    f.write(str(bool(summary)))
"""


def test_an_in_memory_run_under_torchrun_ends_on_every_rank(tmp_path):
    """No output_dir, two processes: rank 0 returns the summary, rank 1 an empty one, and neither waits for
    the other forever (rank 0 once returned before the barrier rank 1 waits at)."""
    import subprocess
    import sys
    from test_parallel import _port
    script = tmp_path / "in_memory.py"
    script.write_text(IN_MEMORY_UNDER_TORCHRUN)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_port()), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"finished_{rank}.txt").read_text() for rank in (0, 1)] == ["True", "False"]
