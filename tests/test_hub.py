"""Hub ids through huggingface_hub, its cache and HF_HUB_OFFLINE: a local folder laid out as the hub cache,
and the real downloading code against a hub on 127.0.0.1 (HF_ENDPOINT), with a 404 and a broken download."""
import json
import os
import shutil

import pytest
import torch

from conftest import load_script, tiny_config
from gpt2_ascend import GPT2LMHeadModel, load_tokenizer
from gpt2_ascend.data.tokenizer import save_tokenizer
from helpers.fake_hub import COMMIT, FakeHub

TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 3


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, data_dir):
    """A tiny GPT-2 with GPT-2's real vocabulary, saved with its tokenizer files, as a hub repo holds it."""
    folder = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=50257, pad_token_id=50256, eos_token_id=50256, bos_token_id=50256)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok_dir = os.path.join(data_dir, "gpt2")
    save_tokenizer(load_tokenizer(tok_dir), str(folder), source_dir=tok_dir)
    return folder


def hub_cache_layout(cache, repo_id: str, folder):
    """huggingface_hub's cache layout, written by hand: blobs named by content, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, name in enumerate(sorted(os.listdir(folder))):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copyfile(folder / name, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)


def run_cli(script, *args):
    return load_script(script).main([str(a) for a in args])


def test_offline_from_a_hub_cache_folder(tmp_path, model_folder, monkeypatch, capsys):
    cache = tmp_path / "cache"
    hub_cache_layout(cache, "gpt2", model_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: any request would fail
    ids = torch.tensor([[464, 10580, 318]])
    with torch.no_grad():
        assert torch.equal(GPT2LMHeadModel.from_pretrained("gpt2")(ids).logits,
                           GPT2LMHeadModel.from_pretrained(model_folder)(ids).logits)
    assert load_tokenizer("gpt2")("Hello world").input_ids == [15496, 995]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    results = []
    for model in ("gpt2", model_folder):  # the hub id reads the cached snapshot, tokenizer included
        out = tmp_path / "ppl.json"
        assert run_cli("evaluate.py", "--task", "perplexity", "--model", model, "--eval_dataset_dir", text,
                       "--seq_length", 16, "--device", "cpu", "--no_progress", "--output_json", out) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["tokens"] == results[1]["tokens"] > 0 and results[0]["ppl"] == results[1]["ppl"]
    capsys.readouterr()
    assert run_cli("generate.py", "--model", "someone/not-cached", "--prompt", "Hi", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'someone/not-cached' in the hub cache (HF_HUB_OFFLINE is set)" in err


def test_download_resumes_after_a_broken_connection_and_404_is_one_line(tmp_path, model_folder, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE
    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB): the connection breaks
    # after one whole chunk (the model file is 13 MB), so the download can only go on from there
    cut = DOWNLOAD_CHUNK_SIZE + 1000
    assert os.path.getsize(model_folder / "model.safetensors") > cut
    with FakeHub({"openai-community/gpt2": str(model_folder)}, interrupt={"model.safetensors": cut}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        out = tmp_path / "hub.json"
        assert run_cli("generate.py", "--model", "openai-community/gpt2", "--prompt", "The tower", "--device", "cpu",
                       "--max_new_tokens", 5, "--output_json", out) == 0
        assert hub.ranges == [("model.safetensors", DOWNLOAD_CHUNK_SIZE)]  # the rest was asked for, not all of it
        capsys.readouterr()
        assert run_cli("generate.py", "--model", "someone/missing", "--prompt", "Hi", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not fetch 'someone/missing' from the hub")
    snapshot = tmp_path / "cache" / "models--openai-community--gpt2" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
    assert not list((tmp_path / "cache").rglob("*.incomplete"))
    local = tmp_path / "local.json"
    assert run_cli("generate.py", "--model", model_folder, "--prompt", "The tower", "--device", "cpu",
                   "--max_new_tokens", 5, "--output_json", local) == 0
    assert json.loads(out.read_text())["results"] == json.loads(local.read_text())["results"]
