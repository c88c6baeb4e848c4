"""Issue 24, run the way its user ran it: the flagship recipe on a CPU (a bounded, fp32, interruptible evaluation with
a bar; a resume hint only where there is a checkpoint), one tiny shape, MindSpore .ckpt files through every command
(one loader), packaged recipe names for the converter's --config, inputs checked before anything expensive, and no
cache in the working directory."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import load_script
from gpt2_ascend import GPT2Config, GPT2LMHeadModel
from gpt2_ascend.convert import hf_to_mindspore
from gpt2_ascend.data.sources import load_token_blocks
from gpt2_ascend.eval import perplexity
from gpt2_ascend.loading import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
train = load_script("train.py")
evaluate = load_script("evaluate.py")
generate = load_script("generate.py")
to_hf = load_script("convert/mindspore_to_hf.py")
TIME_TO_ERROR_S = 30  # a generous last guard: the checks read small files only (tokenizing wiki.train takes ~20 s)


def wiki_head(data_dir, lines: int, out) -> str:
    with open(os.path.join(data_dir, "wikitext-2", "wiki.valid.tokens"), encoding="utf-8") as f:
        out.write_text("".join(next(f) for _ in range(lines)), encoding="utf-8")
    return str(out)


def metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# 1. evaluation in a training run: bounded, fp32 on the CPU, a bar, signals as in the loop
# ---------------------------------------------------------------------------------------------
def test_the_flagship_recipe_on_a_cpu_evaluates_what_it_trained_in_fp32_with_a_bar(data_dir, tmp_path):
    """configs/gpt2/pretrain_gpt2_small.yaml as shipped (its optimizer, schedule, data pipeline, evaluation), made
    cheap: one layer, 32 tokens, one step of one row. Its end-of-run evaluation reads the one row it trained on (not
    the whole validation set), in fp32, with the training bar's conventions, and equals the API's perplexity of the
    exported model on that row."""
    text = wiki_head(data_dir, 40, tmp_path / "small.tokens")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config",
                           os.path.join(REPO, "configs/gpt2/pretrain_gpt2_small.yaml"), "--device", "cpu",
                           "--max_steps", "1", "--batch_size", "1", "runner_config.global_batch_size=1",
                           "model.model_config.seq_length=32", "model.model_config.num_layers=1",
                           "model.model_config.compute_dtype=float32", "--train_dataset_dir", text,
                           "--eval_dataset_dir", text, "--output_dir", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = len(load_token_blocks(text, 32))
    assert rows > 10
    assert (f"evaluations read 1 of the {rows} evaluation rows in fp32 (a run that --max_steps ends evaluates at "
            f"most the rows it trains on") in proc.stdout + proc.stderr
    # the bar, in batches, with its total (its first draw: tqdm redraws "1/1" only when 0.1 s have passed since the
    # last draw, so a fast machine ends the one batch before "100%" is shown -- CI's did)
    assert re.search(r"eval: +0%\|[^\n\r]*\| 0/1 \[", proc.stderr), proc.stderr
    last = metrics(out)[-1]
    model = load_model(str(out / "final"))
    api = perplexity(model, load_token_blocks(text, 32)[:1], 32, precision="fp32")
    assert last["eval_loss"] == pytest.approx(api["loss"], rel=1e-5)
    assert not (tmp_path / "output").exists()  # nothing in the working directory (item 7)


TINY = dict(
    device="cpu", seed=3, do_eval=False,
    runner_config=dict(batch_size=2, max_steps=2, progress_bar=False),
    model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                                 eos_token_id=511, pad_token_id=511, compute_dtype="bfloat16")),
    callbacks=[dict(type="MFLossMonitor", per_print_times=1),
               dict(type="CheckpointMonitor", save_checkpoint_steps=100, keep_checkpoint_max=2)],
)


@pytest.fixture
def tiny_recipe(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.integers(0, 512, (40, 17)).astype(np.uint16))
    np.save(tmp_path / "valid.npy", rng.integers(0, 512, (12, 16)).astype(np.uint16))
    recipe = dict(TINY, train_dataset=dict(data_loader=dict(dataset_dir=str(tmp_path / "train.npy"))),
                  eval_dataset=dict(data_loader=dict(dataset_dir=str(tmp_path / "valid.npy")), batch_size=2))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "tiny.yaml")


def test_the_eval_bound_rule(tiny_recipe, tmp_path, capsys):
    """A max_steps run evaluates the rows it trained on (2 steps x 2 rows = 4 of 12), unless told otherwise:
    --max_eval_samples N reads N, --max_eval_batches B reads B batches; in fp32 on the CPU although the run trains in
    bf16, unless eval_dataset.compute_dtype asks."""
    cases = [([], 4, 12, "fp32"), (["--max_eval_samples", "12"], 12, 12, "fp32"),
             (["--max_eval_batches", "3"], 6, 12, "fp32"),
             (["eval_dataset.compute_dtype=bfloat16", "--max_eval_samples", "6"], 6, 6, "bf16")]
    for i, (extra, rows, read, precision) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert train.main(["--config", tiny_recipe, "--output_dir", str(out), *extra]) == 0
        printed = capsys.readouterr()
        assert f"evaluations read {rows} of the {read} evaluation rows in {precision}" in printed.out + printed.err
        model = load_model(str(out / "final"))
        blocks = np.load(tmp_path / "valid.npy")[:rows]
        api = perplexity(model, blocks, 16, batch_size=2, precision=precision)
        assert metrics(out)[-1]["eval_loss"] == pytest.approx(api["loss"], rel=1e-6 if precision == "fp32" else 1e-2)
    with open(out / "final" / "tokenizer_config.json") as f:  # the exported tokenizer knows the model's context
        assert model.config.n_positions == 16 and json.load(f)["model_max_length"] == 16


def test_a_signal_during_an_evaluation_stops_it_after_its_batch_and_saves_the_step(tiny_recipe, tmp_path, capsys,
                                                                                     monkeypatch):
    """SIGTERM while the end-of-run evaluation runs (sent from inside its first batch: an event, not a time): the
    evaluation ends after that batch, unrecorded, the step is saved, exit 143 with the resume command; --resume auto
    then evaluates in full."""
    ppl_module = sys.modules["gpt2_ascend.eval.perplexity"]  # (the package exports a function of that name)
    real, calls = ppl_module.token_nll, []

    def token_nll(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(ppl_module, "token_nll", token_nll)
    out = tmp_path / "out"
    args = ["--config", tiny_recipe, "--output_dir", str(out), "--max_eval_samples", "12"]
    assert train.main(args) == 128 + signal.SIGTERM
    printed = capsys.readouterr()
    err = printed.err
    assert len(calls) == 1  # of 6 batches
    assert "evaluation stopped after 1 of 6 batches (SIGTERM): not recorded" in printed.out
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "interrupted by SIGTERM after step 2, checkpoint saved:" in line[0]
    assert line[0].endswith("--resume auto")
    assert (out / "checkpoint" / "step_0000002" / "manifest.json").exists()
    assert all(not k.startswith("eval_") for r in metrics(out) for k in r)
    monkeypatch.setattr(ppl_module, "token_nll", real)
    assert train.main(args[:-2] + ["--max_eval_samples", "12", "--resume", "auto"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    api = perplexity(load_model(str(out / "final")), np.load(tmp_path / "valid.npy"), 16, batch_size=2,
                     precision="fp32")
    assert summary["eval_loss"] == pytest.approx(api["loss"], rel=1e-6)


def test_no_resume_hint_without_a_checkpoint(tiny_recipe, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the data are read, before any checkpoint: the line says there is nothing to resume and how to
    start again, never --resume."""
    import gpt2_ascend.train.run as run_module
    real = run_module.load_data

    def load_data(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)
    monkeypatch.setattr(run_module, "load_data", load_data)
    assert train.main(["--config", tiny_recipe, "--output_dir", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: interrupted by SIGINT: stopped at once; no checkpoint was saved "
                                               "yet, so there is nothing to resume; to start again: ")
    assert "--resume" not in err[0] and "--output_dir" in err[0]


# ---------------------------------------------------------------------------------------------
# 3-5. one tiny shape; MindSpore .ckpt files through every command; packaged recipe names
# ---------------------------------------------------------------------------------------------
def test_the_tiny_recipe_is_the_tiny_preset_and_its_ckpt_converts_by_name(tmp_path, capsys):
    """The tiny recipe's model is GPT2Config.from_preset("tiny"), so its .ckpt converts with no --n_head; and
    --config takes the packaged recipe's name (gpt2-convert mindspore-to-hf --config pretrain_gpt2_tiny)."""
    from gpt2_ascend.commands.convert import main as gpt2_convert
    from gpt2_ascend.train.job import job_from_recipe
    from gpt2_ascend.train.recipe import load_recipe
    config = job_from_recipe(load_recipe("pretrain_gpt2_tiny")).model.config
    preset = GPT2Config.from_preset("tiny")
    shape = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
    assert [getattr(config, k) for k in shape] == [getattr(preset, k) for k in shape] == [2, 64, 4, 128, 50257]
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "hf"))
    hf_to_mindspore(str(tmp_path / "hf"), str(tmp_path / "tiny.ckpt"))
    want = load_model(str(tmp_path / "hf"))
    ids = torch.randint(0, 50000, (2, 12), generator=torch.Generator().manual_seed(1))
    for i, args in enumerate([[], ["--config", "pretrain_gpt2_tiny"], ["--config", "pretrain_gpt2_tiny.yaml"]]):
        code = gpt2_convert(["mindspore-to-hf", "--mindspore_path", str(tmp_path / "tiny.ckpt"), "--output_dir",
                             str(tmp_path / f"back{i}"), *args])
        assert code == 0, capsys.readouterr().err
        back = load_model(str(tmp_path / f"back{i}"))
        assert back.config.n_head == 4 and torch.equal(back(ids).logits, want(ids).logits)
    assert gpt2_convert(["mindspore-to-hf", "--mindspore_path", str(tmp_path / "tiny.ckpt"), "--output_dir",
                         str(tmp_path / "x"), "--config", "pretrain_gpt2_tinny"]) == 2
    err = capsys.readouterr().err
    assert "--config not found: pretrain_gpt2_tinny; pass a YAML file or the name of one of" in err
    assert "pretrain_gpt2_tiny" in err and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    """A 48-wide model (no preset has that width: a .ckpt alone cannot tell its 4 heads), the real vocabulary."""
    root = tmp_path_factory.mktemp("odd")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=48, n_head=4, n_positions=32, vocab_size=50257, pad_token_id=50256,
                        eos_token_id=50256, bos_token_id=50256)
    GPT2LMHeadModel(config).save_pretrained(str(root / "hf"))
    hf_to_mindspore(str(root / "hf"), str(root / "odd.ckpt"))
    np.save(root / "valid.npy", np.random.default_rng(0).integers(0, 50257, (6, 32)).astype(np.uint16))
    return root


def test_a_ckpt_of_another_width_through_every_command(odd_ckpt, tmp_path, capsys):
    """train.py --run_mode eval / predict take the heads from model.model_config.num_heads=4, evaluate.py and
    generate.py from --n_head, all through loading.load_model: the same numbers as the HF directory gives; without
    the heads, one line naming every way to give them."""
    root, ckpt, valid = odd_ckpt, str(odd_ckpt / "odd.ckpt"), str(odd_ckpt / "valid.npy")
    api = perplexity(load_model(str(root / "hf")), np.load(valid), 32, batch_size=2, protocol="mindformers")
    common = ["--config", "pretrain_gpt2_tiny", "--load_checkpoint", ckpt, "--device", "cpu",
              "model.model_config.num_heads=4", "model.model_config.hidden_act=gelu_new"]
    assert train.main(["--run_mode", "eval", "--eval_dataset_dir", valid, "eval_dataset.batch_size=2",
                       "model.model_config.seq_length=32", *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(api["loss"], rel=1e-6)
    assert train.main(["--run_mode", "predict", "--predict_data", "The tower is", "model.model_config.do_sample=false",
                       "model.model_config.max_decode_length=12", *common]) == 0
    predicted = capsys.readouterr().out.strip().splitlines()[-1]
    assert evaluate.main(["--model", ckpt, "--n_head", "4", "--eval_dataset_dir", valid, "--batch_size", "2",
                          "--protocol", "mindformers", "--no_progress", "--output_json", str(tmp_path / "e.json"),
                          "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["loss"] == pytest.approx(api["loss"], rel=1e-6)
    assert generate.main(["--model", ckpt, "--n_head", "4", "--prompt", "The tower is", "--max_new_tokens", "9",
                          "--no-do_sample", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == predicted
    assert train.main(["--run_mode", "eval", "--eval_dataset_dir", valid, "--config", "pretrain_gpt2_tiny",
                       "--load_checkpoint", ckpt]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the number of attention heads of a 48-wide model" in err and "num_heads" in err


# ---------------------------------------------------------------------------------------------
# 6. every input checked before anything expensive; 7. no cache in the working directory
# ---------------------------------------------------------------------------------------------
def test_a_bad_load_checkpoint_is_reported_before_the_training_set_is_tokenized(data_dir, tmp_path):
    """The tiny recipe on the whole raw wiki.train.tokens (tokenizing it takes ~20 s): a missing, a damaged and an
    unfitting --load_checkpoint are each one line, before any data are prepared (no cache entry appears), in far
    less time than the tokenizing would take."""
    ours = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=50257))
    ours.save_pretrained(str(tmp_path / "short"))  # a 32-token context for the recipe's 128-token rows
    damaged = tmp_path / "damaged"
    ours.save_pretrained(str(damaged))
    (damaged / "config.json").write_text("{not json")
    cache = tmp_path / "cache"
    for source, message in [(str(tmp_path / "missing"), "load_checkpoint not found"),
                            (str(damaged), "config.json"),
                            (str(tmp_path / "short"), "exceeds the model's n_positions 32")]:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", "pretrain_gpt2_tiny",
                               "--run_mode", "finetune", "--load_checkpoint", source, "--device", "cpu",
                               "--output_dir", str(tmp_path / "out"), f"data_cache_dir={cache}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - start
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
        assert not cache.exists() and not (tmp_path / "out").exists()  # nothing tokenized, nothing written
        assert seconds < TIME_TO_ERROR_S, seconds


def test_caches_go_to_the_cache_home_never_the_working_directory(data_dir, tmp_path, monkeypatch, capsys):
    """The tiny recipes cache prepared data under $GPT2_CACHE, else the platform's user cache folder (here
    XDG_CACHE_HOME), never ./output/data_cache or a literal ./$GPT2_CACHE; a recipe without data_cache_dir caches
    under its OUTPUT_DIR."""
    from gpt2_ascend.data.download import cache_home
    from gpt2_ascend.train.job import resolve_path
    monkeypatch.delenv("GPT2_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    text = wiki_head(data_dir, 30, tmp_path / "small.tokens")
    common = ["--max_steps", "1", "--train_dataset_dir", text, "--eval_dataset_dir", text, "--device", "cpu",
              "runner_config.progress_bar=false"]
    assert train.main(["--config", "pretrain_gpt2_tiny", "--output_dir", str(tmp_path / "a"), *common]) == 0
    home = tmp_path / "xdg" / "gpt2_ascend" if sys.platform.startswith("linux") else cache_home()
    assert os.listdir(os.path.join(home, "data_cache"))  # the prepared blocks
    assert train.main(["--config", "pretrain_gpt2_tiny", "--output_dir", str(tmp_path / "b"), "data_cache_dir=",
                       *common]) == 0
    assert os.listdir(tmp_path / "b" / "data_cache")
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "small.tokens", "xdg"]  # no ./output, no ./$GPT2_CACHE
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "mine"))
    assert cache_home() == str(tmp_path / "mine")
    assert resolve_path("$GPT2_CACHE/data_cache") == str(tmp_path / "mine" / "data_cache")
