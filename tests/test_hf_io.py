"""from_pretrained / save_pretrained against transformers: files, shards, .bin, hub ids, errors."""
import json
import os

import pytest
import torch

from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from conftest import hf_model, max_diff, tiny_config
from helpers.fake_hub import FakeHub

TOL = 1e-6  # measured fp32 differences on these tiny shapes: at most 1.8e-7


def ids_for(config, B=2, T=12):
    return torch.randint(0, config.vocab_size - 1, (B, T), generator=torch.Generator().manual_seed(3))


def test_ours_to_transformers(tmp_path):
    import transformers
    config = tiny_config(activation="fast_gelu")
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(config).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = ids_for(config)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, theirs(ids).logits) <= TOL
    hf_state = theirs.state_dict()
    assert torch.equal(hf_state["transformer.h.0.attn.c_attn.weight"], ours.transformer.h[0].attn.c_attn.weight.t())
    assert torch.equal(hf_state["transformer.wte.weight"], ours.transformer.wte.weight)
    # and back: bit-identical weights
    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert again.lm_head.weight is again.transformer.wte.weight


@pytest.mark.parametrize("fmt", ["safetensors", "sharded-safetensors"])
def test_transformers_to_ours(tmp_path, fmt):
    config = tiny_config()
    hf = hf_model(config)
    hf.save_pretrained(tmp_path, max_shard_size="60KB" if fmt.startswith("sharded") else "5GB")
    if fmt.startswith("sharded"):
        assert "model.safetensors.index.json" in os.listdir(tmp_path)
    ours = GPT2LMHeadModel.from_pretrained(tmp_path)
    ids = ids_for(config)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL
    for name, tensor in hf.state_dict().items():
        mine = ours.state_dict()[name]
        assert torch.equal(mine.t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else mine, tensor), name


def test_bin_files_written_by_torch_save(tmp_path):
    """pytorch_model.bin and its sharded index, as older transformers wrote them (no prefix, mask buffers)."""
    config = tiny_config()
    hf = hf_model(config)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # causal buffer of old checkpoints: skipped
    names = sorted(state)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    ours = GPT2LMHeadModel.from_pretrained(tmp_path)
    ids = ids_for(config)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL


def test_our_sharded_save_loads_in_transformers(tmp_path):
    import transformers
    config = tiny_config()
    torch.manual_seed(1)
    ours = GPT2LMHeadModel(config).eval()
    ours.save_pretrained(tmp_path, max_shard_size="50KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = ids_for(config)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, theirs(ids).logits) <= TOL
    # saving again unsharded replaces the shards instead of leaving stale ones
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_classification_round_trip_and_lm_base(tmp_path):
    import transformers
    config = tiny_config(num_labels=2)
    torch.manual_seed(0)
    ours = GPT2ForSequenceClassification(config).eval()
    ours.save_pretrained(tmp_path / "cls")
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    ids = ids_for(config)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, theirs(ids).logits) <= TOL
    # an LM checkpoint starts a classifier with a fresh score head, like HF
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    cls = GPT2ForSequenceClassification.from_pretrained(tmp_path / "lm")
    assert cls.score.weight.shape == (2, config.n_embd)
    assert cls.score.weight.std().item() > 0


def test_dtype_and_device_arguments(tmp_path):
    config = tiny_config()
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(tmp_path, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "half").dtype == torch.float16


def test_errors_name_the_problem(tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="model path not found"):
        GPT2LMHeadModel.from_pretrained(str(tmp_path / "nope"))
    # shape mismatch: a config that disagrees with the weights
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "n_positions": 32}))
    with pytest.raises(ValueError, match="transformer.wpe.weight.*shape"):
        GPT2LMHeadModel.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match="missing tensor 'transformer.h.2"):
        GPT2LMHeadModel.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.1"):
        GPT2LMHeadModel.from_pretrained(bad)
    # truncated weights
    (bad / "config.json").write_text(json.dumps(cfg))
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        GPT2LMHeadModel.from_pretrained(bad)
    os.remove(bad / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights"):
        GPT2LMHeadModel.from_pretrained(bad)


def test_hub_id_through_local_server(tmp_path, monkeypatch):
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "repo")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with FakeHub({"someone/tiny-gpt2": str(tmp_path / "repo")}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        loaded = GPT2LMHeadModel.from_pretrained("someone/tiny-gpt2")
        with pytest.raises(OSError, match="could not fetch 'someone/missing'"):
            GPT2LMHeadModel.from_pretrained("someone/missing")
    ids = ids_for(config)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hub_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(OSError) as e:
        GPT2LMHeadModel.from_pretrained("openai-community/gpt2")
    assert "\n" not in str(e.value) and "local directory" in str(e.value)
