"""What a run_mindformer.py user types: --run_mode eval / predict with a recipe and MindFormers' own .ckpt,
--epochs, --predict_data, `--section.key value`, a metric: section; MindFormers' text-classification files."""
import json

import numpy as np
import pytest
import torch
import yaml

from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.convert import hf_to_mindspore
from gpt2_ascend.data.txtcls import read_txtcls

from conftest import load_script, tiny_config


@pytest.fixture(scope="module")
def gpt2_vocab_model(tmp_path_factory, data_dir):
    """A tiny GPT-2 over the real 50257-token vocabulary, as an HF directory and as a MindFormers .ckpt."""
    root = tmp_path_factory.mktemp("mf_cli")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(vocab_size=50257, n_embd=32, n_head=4, n_positions=64, pad_token_id=50256,
                                        eos_token_id=50256, bos_token_id=50256))
    model.save_pretrained(str(root / "hf"))
    hf_to_mindspore(str(root / "hf"), str(root / "gpt2.ckpt"))
    recipe = {"device": "cpu", "output_dir": str(root / "out"), "seed": 3, "runner_config": {"batch_size": 2},
              "model": {"model_config": dict(seq_length=16, vocab_size=50257, hidden_size=32, num_layers=2,
                                             num_heads=4, hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                                             max_decode_length=12, do_sample=False)}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return root, model.eval()


def test_eval_with_mindformers_ckpt_and_flags(gpt2_vocab_model, tmp_path, capsys):
    root, model = gpt2_vocab_model
    blocks = np.random.default_rng(0).integers(0, 50257, (5, 16)).astype(np.uint16)
    np.save(tmp_path / "valid.npy", blocks)
    train = load_script("train.py")
    # MindFormers' own spelling: --epochs 1 and a `--section.key value` pair
    assert train.main(["--config", str(root / "r.yaml"), "--run_mode", "eval", "--epochs", "1",
                       "--load_checkpoint", str(root / "gpt2.ckpt"), "--eval_dataset_dir", str(tmp_path / "valid.npy"),
                       "--runner_config.batch_size", "2", "--metric.type", "PerplexityMetric"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    from gpt2_ascend.eval import perplexity
    want = perplexity(model, blocks, 16, batch_size=2, protocol="mindformers")  # batches of 2, 2, 1
    assert result["loss"] == pytest.approx(want["loss"], abs=1e-5) and result["PPL"] == pytest.approx(want["ppl"], rel=1e-5)
    token = perplexity(model, blocks, 16, batch_size=2)
    assert abs(token["loss"] - want["loss"]) > 1e-4  # the metric is MindFormers' mean of batch means, not per token
    assert (result["batch_size"], result["blocks"], result["tokens"]) == (2, 5, 75)
    assert train.main(["--config", str(root / "r.yaml"), "--run_mode", "eval", "--load_checkpoint",
                       str(root / "gpt2.ckpt"), "--eval_dataset_dir", str(tmp_path / "valid.npy"),
                       "metric.type=ADGENMetric"]) == 2
    assert "bad value 'ADGENMetric' for 'metric.type'" in capsys.readouterr().err


def test_predict_with_mindformers_ckpt(gpt2_vocab_model, capsys):
    root, model = gpt2_vocab_model
    train = load_script("train.py")
    assert train.main(["--config", str(root / "r.yaml"), "--run_mode", "predict", "--load_checkpoint",
                       str(root / "gpt2.ckpt"), "--predict_data", "I love Beijing, because", "Hello"]) == 0
    lines = capsys.readouterr().out.splitlines()
    from gpt2_ascend.generation import generate_text
    from gpt2_ascend.data.tokenizer import load_tokenizer
    want = generate_text(model, load_tokenizer(), ["I love Beijing, because", "Hello"], batch_size=2,
                         max_decode_length=12, do_sample=False)
    assert lines == ["I love Beijing, because" + want[0], "Hello" + want[1]]
    assert train.main(["--config", str(root / "r.yaml"), "--run_mode", "predict", "--load_checkpoint",
                       str(root / "gpt2.ckpt")]) == 2
    assert "needs input: pass --predict_data" in capsys.readouterr().err


def test_accuracy_metric_on_a_classifier(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_config()).eval()
    model.save_pretrained(str(tmp_path / "cls"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 511, (6, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[:, 8:], mask[:, 8:] = 511, 0
    data = dict(input_ids=ids, attention_mask=mask, labels=rng.integers(0, 2, 6))
    np.savez(tmp_path / "dev.npz", **data)
    recipe = {"device": "cpu", "output_dir": str(tmp_path / "out"), "runner_config": {"batch_size": 4},
              "metric": {"type": "Accuracy", "eval_type": "classification"},
              "model": {"arch": {"type": "GPT2ForSequenceClassification"},
                        "model_config": dict(seq_length=12, vocab_size=512, hidden_size=64, num_layers=2,
                                             num_heads=4, eos_token_id=511, pad_token_id=511)}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    train = load_script("train.py")
    assert train.main(["--config", str(tmp_path / "r.yaml"), "--run_mode", "eval", "--load_checkpoint",
                       str(tmp_path / "cls"), "--eval_dataset_dir", str(tmp_path / "dev.npz")]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    from gpt2_ascend.eval import classification_accuracy
    want = classification_accuracy(model, data, batch_size=4)
    assert (result["metric"], result["Accuracy"], result["correct"]) == ("Accuracy", want["accuracy"], want["correct"])


# ---------------------------------------------------------------------------------------------
# text classification: MindFormers' four datasets, and why 128 tokens give MindFormers' 1024's results
# ---------------------------------------------------------------------------------------------
def test_cola_imdb_ag_news_files(tmp_path):
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
    assert read_txtcls(str(cola), "cola") == (["Our friends won't buy this analysis.", "They drank the pub."],
                                              pytest.approx(np.array([1, 0])))
    # MindFormers' script drops the first line of every file, data or not
    assert read_txtcls(str(cola), "cola", skip_first_line=True)[0] == ["They drank the pub."]
    imdb = tmp_path / "imdb.csv"
    imdb.write_text('review,sentiment\n"A film, with ""quotes"".",positive\nDull.,negative\n')
    sentences, labels = read_txtcls(str(imdb), "imdb")
    assert sentences == ['A film, with ""quotes"".', "Dull."] and labels.tolist() == [1, 0]
    ag = tmp_path / "ag.csv"
    ag.write_text('"3","Wall St. Bears Claw Back","Reuters - Short-sellers are back."\n"1","Title","Text"\n')
    sentences, labels = read_txtcls(str(ag), "ag_news")
    assert sentences == ["Wall St. Bears Claw Back. Reuters - Short-sellers are back.", "Title. Text"]
    assert labels.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"sst.tsv line 2: expected `sentence<TAB>label`"):
        bad = tmp_path / "sst.tsv"
        bad.write_text("sentence\tlabel\na\tb\tc\n")
        read_txtcls(str(bad), "sst_2")


def test_padding_to_128_gives_the_results_of_padding_to_1024(tmp_path):
    """MindFormers pads text-classification rows to 1024 tokens; our recipe to 128. With right padding, causal
    attention and last-real-token pooling, padding is never read: logits, loss and gradients are the same."""
    from gpt2_ascend.data.txtcls import encode_rows
    from gpt2_ascend.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    sentences = ["it 's a charming and often affecting journey . ", "unflinchingly bleak and desperate "]
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_config(vocab_size=50257, n_positions=1024, pad_token_id=50256,
                                                      eos_token_id=50256, bos_token_id=50256))
    outs = {}
    for width in (128, 1024):
        ids, mask, _ = encode_rows(sentences, width, tokenizer)
        model.zero_grad()
        out = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    labels=torch.tensor([1, 0]))
        out.loss.backward()
        outs[width] = out.logits.detach(), model.score.weight.grad.clone()
    assert (outs[128][0] - outs[1024][0]).abs().max() < 1e-5
    assert (outs[128][1] - outs[1024][1]).abs().max() < 1e-5
    with torch.no_grad():  # and both are each sentence's own logits, unpadded
        alone = torch.cat([model(torch.tensor([tokenizer(s).input_ids])).logits for s in sentences])
    assert (alone - outs[1024][0]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# recipes: one per MindFormers r1.3.0 configs/gpt2/ file, each naming its source
# ---------------------------------------------------------------------------------------------
MINDFORMERS_GPT2_CONFIGS = {  # MindFormers r1.3.0 configs/gpt2/ -> ours
    "pretrain_gpt2_small_fp16.yaml": "pretrain_gpt2_small", "finetune_gpt2_small_fp16.yaml": "finetune_gpt2_small",
    "finetune_gpt2_small_lora_fp16.yaml": "finetune_gpt2_small_lora",
    "finetune_gpt2_small_txtcls_fp16.yaml": "finetune_gpt2_small_txtcls",
    "predict_gpt2_small_fp16.yaml": "predict_gpt2_small", "pretrain_gpt2_13b_fp16.yaml": "pretrain_gpt2_13b",
    "run_gpt2.yaml": "run_gpt2", "run_gpt2_13b.yaml": "run_gpt2_13b", "run_gpt2_13b_910b.yaml": "run_gpt2_13b_910b",
    "run_gpt2_52b.yaml": "run_gpt2_52b", "run_gpt2_lora.yaml": "run_gpt2_lora", "run_gpt2_txtcls.yaml": "run_gpt2_txtcls",
    "run_gpt2_xl.yaml": "run_gpt2_xl", "run_gpt2_xl_lora.yaml": "run_gpt2_xl_lora",
}


def test_every_mindformers_recipe_has_a_counterpart_naming_its_source():
    import os
    from gpt2_ascend.parallel.mesh import ParallelConfig
    from gpt2_ascend.train.recipe import gpt2_config, load_recipe
    from conftest import REPO
    for source, ours in MINDFORMERS_GPT2_CONFIGS.items():
        path = os.path.join(REPO, "configs", "gpt2", ours + ".yaml")
        header = open(path).read().split("\nseed:")[0]
        assert f"configs/gpt2/{source}" in header and "Differences from MindFormers" in header, ours
        recipe = load_recipe(path)
        assert recipe.model.model_config.init_style == "mindformers", ours
        p = recipe.parallel
        ParallelConfig(data_parallel=p.data_parallel, model_parallel=p.model_parallel, pipeline_stage=p.pipeline_stage,
                       micro_batch_num=p.micro_batch_num).validate(n_head=recipe.model.model_config.num_heads,
                                                                   n_layer=recipe.model.model_config.num_layers)
        assert recipe.runner_config.global_batch_size % (recipe.runner_config.batch_size * p.data_parallel) == 0
    b52 = load_recipe(os.path.join(REPO, "configs/gpt2/run_gpt2_52b.yaml"))
    assert (b52.parallel.data_parallel, b52.parallel.pipeline_stage, b52.parallel.micro_batch_num) == (8, 16, 64)
    assert (gpt2_config(b52).n_layer, gpt2_config(b52).n_embd, b52.runner_config.global_batch_size) == (64, 8192, 1024)
    for name in ("finetune_gpt2_13b", "finetune_gpt2_13b_lora", "predict_gpt2_13b"):  # the README's 13B rows
        cfg = gpt2_config(load_recipe(os.path.join(REPO, "configs", "gpt2", name + ".yaml")))
        assert (cfg.n_layer, cfg.n_embd, cfg.n_positions, cfg.activation) == (40, 5120, 2048, "fast_gelu"), name
