"""MindSpore .ckpt codec and HF <-> MindFormers GPT-2 conversion (issue 7)."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import hf_model, load_script, max_diff, tiny_config
from gpt2_ascend import GPT2LMHeadModel
from gpt2_ascend.convert import (CkptError, CkptReader, hf_to_mindspore, load_mindspore_model, mindspore_to_hf,
                                 read_ckpt, write_ckpt)
from gpt2_ascend.mindspore_io.ckpt import checkpoint_messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, FIXTURES)
from make_mindspore_fixtures import fixture_arrays, micro_gpt2_arrays  # noqa: E402


def cli(name):
    return load_script(f"convert/{name}.py").main


def ids_for(vocab, B=2, T=10, seed=3):
    return torch.randint(0, vocab - 1, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the codec
# ---------------------------------------------------------------------------------------------
def test_codec_round_trip_dtypes_chunks_scalars(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = {
        "fp32": torch.randn(7, 5, generator=g), "fp16": torch.randn(33, generator=g).half(),
        "bf16": torch.randn(3, 11, generator=g).bfloat16(), "i32": torch.arange(-4, 5, dtype=torch.int32),
        "i64": torch.arange(6, dtype=torch.int64).view(2, 3), "flag": torch.tensor([True, False, True]),
        "step": torch.tensor(7, dtype=torch.int32), "note": "hello ✓",
    }
    path = tmp_path / "t.ckpt"
    write_ckpt(path, values, chunk_bytes=16)
    with CkptReader(path) as reader:
        assert reader.has_crc
        assert list(reader.entries) == list(values)
        assert len(reader.entries["fp32"].chunks) == 9  # 140 bytes in records of 16
        assert reader.entries["step"].dims == ()  # numeric scalars carry no dims, as MindSpore writes them
        assert reader.entries["note"].dims == (0,) and reader.entries["note"].tensor_type == "str"
    back = read_ckpt(path)
    for name, value in values.items():
        if isinstance(value, str):
            assert back[name] == value
        else:
            assert back[name].dtype == value.dtype and back[name].shape == value.shape and torch.equal(back[name], value), name
    # protobuf itself reads our file as one Checkpoint whose values are the records
    Checkpoint, _ = checkpoint_messages()
    data = path.read_bytes()
    assert data[-17:-10] == b"crc_num"
    message = Checkpoint.FromString(data[:-17])
    tags = [v.tag for v in message.value]
    assert tags.count("fp32") == 9 and tags.count("note") == 1
    assert b"".join(v.tensor.tensor_content for v in message.value if v.tag == "fp32") == values["fp32"].numpy().tobytes()


def test_reads_mindspore_written_file_with_chunks_bf16_and_crc():
    """tests/fixtures/mindspore_chunked_crc.ckpt was written by mindspore.save_checkpoint (2.10.0), with
    MindSpore's own record cutting (1 KiB records), a bf16 tensor, a scalar, a string and crc_check=True."""
    path = os.path.join(FIXTURES, "mindspore_chunked_crc.ckpt")
    expected = fixture_arrays()
    with CkptReader(path) as reader:
        assert reader.has_crc
        assert [length for _, length in reader.entries["big_fp32"].chunks] == [1024, 1024, 1024, 1024, 704]
        assert reader.entries["w_bf16"].tensor_type == "BFloat16"
    got = read_ckpt(path)
    # MindSpore's type names -> torch dtypes, each checked by value (a swapped Float16 / BFloat16 both ways would
    # round-trip our own files unnoticed)
    dtypes = {"w_fp32": torch.float32, "w_fp16": torch.float16, "w_bf16": torch.bfloat16, "big_fp32": torch.float32,
              "i64": torch.int64, "step": torch.int32}
    assert {name: got[name].dtype for name in dtypes} == dtypes
    for name in ("w_fp32", "w_fp16", "w_bf16", "big_fp32", "i64"):
        want = torch.from_numpy(expected[name]).to(dtypes[name])  # bf16: MindSpore rounded the fp32 values
        assert torch.equal(got[name].double(), want.double()), name
    assert got["step"].shape == () and got["step"].item() == 7
    assert got["note"] == "written by mindspore"


def test_our_writer_reproduces_mindspore_bytes(tmp_path):
    """Re-writing what MindSpore wrote (same record size, crc) gives the identical file, byte for byte."""
    path = os.path.join(FIXTURES, "mindspore_chunked_crc.ckpt")
    write_ckpt(tmp_path / "again.ckpt", read_ckpt(path), chunk_bytes=1024)
    assert (tmp_path / "again.ckpt").read_bytes() == open(path, "rb").read()


def test_crc_mismatch_and_corruption_are_clear_errors(tmp_path):
    data = bytearray(open(os.path.join(FIXTURES, "mindspore_chunked_crc.ckpt"), "rb").read())
    data[200] ^= 0x01  # inside big_fp32's data
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CkptError, match="fails its crc check"):
        read_ckpt(bad)
    assert read_ckpt(bad, verify_crc=False)["w_fp32"].shape == (3, 5)  # the damage is in another tensor
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"PK\x03\x04 definitely not protobuf" * 3)
    with pytest.raises(CkptError, match="not a MindSpore checkpoint|truncated or corrupt"):
        read_ckpt(junk)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CkptError, match="empty"):
        read_ckpt(tmp_path / "empty.ckpt")


def test_truncated_file_is_a_clear_error(tmp_path):
    path = os.path.join(FIXTURES, "mindspore_gpt2_micro.ckpt")
    data = open(path, "rb").read()
    with CkptReader(path) as reader:
        boundaries = {offset + length for e in reader.entries.values() for offset, length in e.chunks}
    cuts = [c for c in range(1, len(data) - 17, 211) if c not in boundaries]
    assert len(cuts) > 30
    for cut in cuts:
        (tmp_path / "cut.ckpt").write_bytes(data[:cut])
        with pytest.raises(CkptError, match="truncated or corrupt"):
            CkptReader(tmp_path / "cut.ckpt").close()
    # through the CLI: one line, exit 2
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert cli("mindspore_to_hf")(["--mindspore_path", str(tmp_path / "cut.ckpt"), "--output_dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# the MindFormers mapping
# ---------------------------------------------------------------------------------------------
def mindformers_reference_logits(ms: dict, ids: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-2 forward written from MindFormers' conventions alone: Dense layers (dense1/2/3) compute x @ W.T
    with W [out, in]; the projection / mapping layers compute x @ W with W [in, out]; the head is tied."""
    E = ms["backbone.layernorm.gamma"].numel()
    x = ms["backbone.embedding.word_embedding.embedding_table"][ids] + \
        ms["backbone.embedding.position_embedding.embedding_table"][: ids.shape[1]]
    B, T, _ = x.shape
    n_layer = 1 + max(int(k.split(".")[2]) for k in ms if k.startswith("backbone.blocks."))
    for i in range(n_layer):
        p = lambda s: ms[f"backbone.blocks.{i}.{s}"]
        h = F.layer_norm(x, (E,), p("layernorm1.gamma"), p("layernorm1.beta"), 1e-5)
        q, k, v = (h @ p(f"attention.{d}.weight").T + p(f"attention.{d}.bias") for d in ("dense1", "dense2", "dense3"))
        q, k, v = (t.view(B, T, n_head, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, E)
        x = x + a @ p("attention.projection.weight") + p("attention.projection.bias")
        h = F.layer_norm(x, (E,), p("layernorm2.gamma"), p("layernorm2.beta"), 1e-5)
        h = F.gelu(h @ p("output.mapping.weight") + p("output.mapping.bias"), approximate="tanh")
        x = x + h @ p("output.projection.weight") + p("output.projection.bias")
    x = F.layer_norm(x, (E,), ms["backbone.layernorm.gamma"], ms["backbone.layernorm.beta"], 1e-5)
    return x @ ms["backbone.embedding.word_embedding.embedding_table"].T


def expected_mindformers_shapes(E, V, P, L, labels=None):
    shapes = {"backbone.embedding.word_embedding.embedding_table": (V, E),
              "backbone.embedding.position_embedding.embedding_table": (P, E),
              "backbone.layernorm.gamma": (E,), "backbone.layernorm.beta": (E,)}
    for i in range(L):
        b = f"backbone.blocks.{i}."
        for ln in ("layernorm1", "layernorm2"):
            shapes.update({b + ln + ".gamma": (E,), b + ln + ".beta": (E,)})
        for d in ("dense1", "dense2", "dense3"):
            shapes.update({b + f"attention.{d}.weight": (E, E), b + f"attention.{d}.bias": (E,)})
        shapes.update({b + "attention.projection.weight": (E, E), b + "attention.projection.bias": (E,),
                       b + "output.mapping.weight": (E, 4 * E), b + "output.mapping.bias": (4 * E,),
                       b + "output.projection.weight": (4 * E, E), b + "output.projection.bias": (E,)})
    if labels:
        shapes["score.weight"] = (labels, E)
    return shapes


def test_names_shapes_and_qkv_layout_follow_mindformers(tmp_path):
    config = tiny_config(n_embd=48, n_head=4)  # q, k, v of different widths than the MLP: transposes show
    hf = hf_model(config, attn="eager")
    hf.save_pretrained(tmp_path / "hf")
    hf_to_mindspore(str(tmp_path / "hf"), str(tmp_path / "m.ckpt"), layers=2)
    ms = read_ckpt(tmp_path / "m.ckpt")
    assert {k: tuple(v.shape) for k, v in ms.items()} == expected_mindformers_shapes(48, 512, 64, 2)
    E, sd = 48, hf.state_dict()
    c_attn = sd["transformer.h.1.attn.c_attn.weight"]  # Conv1D [in, 3*out]
    assert torch.equal(ms["backbone.blocks.1.attention.dense1.weight"], c_attn[:, :E].t())
    assert torch.equal(ms["backbone.blocks.1.attention.dense3.weight"], c_attn[:, 2 * E:].t())
    assert torch.equal(ms["backbone.blocks.1.attention.dense2.bias"], sd["transformer.h.1.attn.c_attn.bias"][E:2 * E])
    assert torch.equal(ms["backbone.blocks.1.output.mapping.weight"], sd["transformer.h.1.mlp.c_fc.weight"])  # kept
    assert torch.equal(ms["backbone.blocks.0.attention.projection.weight"], sd["transformer.h.0.attn.c_proj.weight"])
    assert torch.equal(ms["backbone.blocks.0.layernorm2.gamma"], sd["transformer.h.0.ln_2.weight"])
    # the converted tensors, used the way MindFormers uses them, give transformers' logits
    ids = ids_for(512)
    with torch.no_grad():
        assert max_diff(mindformers_reference_logits(ms, ids, n_head=4), hf(ids).logits) <= 1e-5


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_hf_to_ckpt_to_hf_is_bit_exact(tmp_path, kind):
    import transformers
    config = tiny_config()
    hf = hf_model(config, kind=kind, attn="eager")
    hf.save_pretrained(tmp_path / "hf")
    assert cli("hf_to_mindspore")(["--layers", "2", "--torch_path", str(tmp_path / "hf"),
                                   "--mindspore_path", str(tmp_path / "m.ckpt")]) == 0
    assert ("score.weight" in CkptReader(tmp_path / "m.ckpt").entries) == (kind == "cls")
    assert cli("mindspore_to_hf")(["--mindspore_path", str(tmp_path / "m.ckpt"), "--output_dir", str(tmp_path / "back")]) == 0
    cls = transformers.GPT2LMHeadModel if kind == "lm" else transformers.GPT2ForSequenceClassification
    back = cls.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    original = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    restored = back.state_dict()
    assert set(original) == {k for k in restored if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
    ids = ids_for(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    assert back.config.n_head == 4 and back.config.pad_token_id == 511  # preset 'tiny'; <|endoftext|> = last id


def test_ours_bin_and_sharded_inputs_give_the_same_ckpt(tmp_path):
    config = tiny_config(pad_vocab_size_multiple=64, vocab_size=500, pad_token_id=499, eos_token_id=499, bos_token_id=499)
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(config).eval()
    ours.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # sharded safetensors + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    torch.save(ours.state_dict(), tmp_path / "hf" / "ours.pt")  # our nn.Linear layout, padded vocab, tied head
    hf_state = {k.removeprefix("transformer."): v for k, v in
                GPT2LMHeadModel.from_pretrained(tmp_path / "hf").state_dict().items() if k != "lm_head.weight"}
    hf_state = {k: (v.t().contiguous() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
                for k, v in hf_state.items()}
    hf_state["wte.weight"] = hf_state["wte.weight"][:500].clone()
    hf_state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # old HF .bin buffers: skipped
    (tmp_path / "old").mkdir()
    torch.save(hf_state, tmp_path / "old" / "pytorch_model.bin")
    outputs = {}
    for label, src in (("sharded", tmp_path / "hf"), ("ours", tmp_path / "hf" / "ours.pt"),
                       ("bin", tmp_path / "old" / "pytorch_model.bin")):
        summary = hf_to_mindspore(str(src), str(tmp_path / f"{label}.ckpt"))
        outputs[label] = read_ckpt(tmp_path / f"{label}.ckpt")
    assert summary["skipped"] == ["h.0.attn.bias"]
    assert outputs["ours"]["backbone.embedding.word_embedding.embedding_table"].shape == (500, 64)  # padding gone
    for label in ("ours", "bin"):
        assert outputs[label].keys() == outputs["sharded"].keys()
        for name, tensor in outputs["sharded"].items():
            assert torch.equal(outputs[label][name], tensor), (label, name)
    # and back into our model through the Python API: same logits as the original
    back = load_mindspore_model(str(tmp_path / "ours.ckpt"))
    ids = ids_for(500)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours(ids).logits)


def test_dtype_options(tmp_path):
    from safetensors import safe_open
    hf = hf_model(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    hf_to_mindspore(str(tmp_path / "hf"), str(tmp_path / "bf16.ckpt"), dtype="bf16")
    with CkptReader(tmp_path / "bf16.ckpt") as reader:
        assert {e.tensor_type for e in reader.entries.values()} == {"BFloat16"}
        wte = reader.load("backbone.embedding.word_embedding.embedding_table")
    assert torch.equal(wte, hf.state_dict()["transformer.wte.weight"].bfloat16())
    summary = mindspore_to_hf(str(tmp_path / "bf16.ckpt"), str(tmp_path / "fp16"), dtype="fp16")
    assert summary["dtype"] == torch.float16
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.float16
        assert torch.equal(f.get_tensor("transformer.wte.weight"), wte.half())
    mindspore_to_hf(str(tmp_path / "bf16.ckpt"), str(tmp_path / "keep"))  # default: the checkpoint's dtype
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "keep").dtype == torch.bfloat16


def test_mindspore_written_gpt2_with_optimizer_states(tmp_path, capsys):
    """A MindFormers-named GPT-2 written by MindSpore, with adam_m/adam_v, global_step and scale_sense."""
    import transformers
    path = os.path.join(FIXTURES, "mindspore_gpt2_micro.ckpt")
    main = cli("mindspore_to_hf")
    assert main(["--mindspore_path", path, "--output_dir", str(tmp_path / "x")]) == 2
    assert "error: cannot tell the number of attention heads of a 8-wide model" in capsys.readouterr().err
    assert main(["--mindspore_path", path, "--output_dir", str(tmp_path / "hf"), "--n_head", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("shape: 2 layers, hidden 8, 2 heads (from --n_head), vocab 16, positions 8, MLP 32, "
                      "activation gelu_new")  # first, so a wrong head count shows before anything is written
    assert out[2] == ("skipped 6: 4 optimizer states (adam_m.*, adam_v.*); 2 bookkeeping entries "
                      "(global_step, scale_sense)")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    weights, _ = micro_gpt2_arrays()
    sd = model.state_dict()
    assert model.config.n_layer == 2 and model.config.n_embd == 8 and model.config.vocab_size == 16
    assert np.array_equal(sd["transformer.h.1.attn.c_attn.weight"].numpy(), np.concatenate(
        [weights[f"backbone.blocks.1.attention.{d}.weight"].T for d in ("dense1", "dense2", "dense3")], axis=1))
    assert np.array_equal(sd["transformer.h.0.mlp.c_proj.weight"].numpy(), weights["backbone.blocks.0.output.projection.weight"])
    ids = ids_for(16, T=8)
    ms = {k: torch.from_numpy(v) for k, v in weights.items()}
    with torch.no_grad():
        assert max_diff(model(ids).logits, mindformers_reference_logits(ms, ids, n_head=2)) <= 1e-5


def test_head_count_from_a_mindformers_recipe(tmp_path, capsys):
    """A .ckpt does not store the head count: --config RECIPE.yaml supplies it (and must agree with the tensors)."""
    import json
    import yaml
    path = os.path.join(FIXTURES, "mindspore_gpt2_micro.ckpt")
    main = cli("mindspore_to_hf")

    def recipe(name, **model_config):
        file = tmp_path / name
        file.write_text(yaml.safe_dump({"model": {"model_config": dict(dict(num_layers=2, hidden_size=8, vocab_size=16),
                                                                          **model_config)}}))
        return str(file)

    good = recipe("run_gpt2_micro.yaml", num_heads=2, hidden_act="fast_gelu")
    assert main(["--mindspore_path", path, "--output_dir", str(tmp_path / "hf"), "--config", good]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"shape: 2 layers, hidden 8, 2 heads (from {good}),") and "fast_gelu" in first
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_head"] == 2 and config["activation_function"] == "quick_gelu"
    for args, message in [
        (["--config", recipe("four.yaml", num_heads=4), "--n_head", "2"], "--n_head 2 but"),
        (["--config", recipe("deep.yaml", num_heads=2, num_layers=3)], "model.model_config.num_layers=3 but the checkpoint has 2"),
        (["--config", recipe("nohead.yaml")], "has no model.model_config.num_heads"),
        (["--config", str(tmp_path / "missing.yaml")], "--config not found: " + str(tmp_path / "missing.yaml")),
        (["--n_head", "3"], "3 heads (--n_head) do not divide the hidden size 8"),
    ]:
        assert main(["--mindspore_path", path, "--output_dir", str(tmp_path / "bad"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


def test_hf_config_that_disagrees_with_the_weights_is_refused(tmp_path, capsys):
    import json
    hf = hf_model(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    to_ms = cli("hf_to_mindspore")
    for key, value, message in [("n_layer", 4, "says n_layer=4 but the weights have 2"),
                                ("n_positions", 256, "says n_positions=256 but the weights have"),
                                ("vocab_size", 600, "says vocab_size=600 but the word embedding has 512 rows")]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, **{key: value})))
        capsys.readouterr()
        assert to_ms(["--torch_path", str(tmp_path / "hf"), "--mindspore_path", str(tmp_path / "m.ckpt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "m.ckpt").exists() and os.listdir(tmp_path) == ["hf"]  # no temporary left


def test_conversion_errors(tmp_path, capsys):
    hf = hf_model(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    to_ms = cli("hf_to_mindspore")
    assert to_ms(["--layers", "12", "--torch_path", str(tmp_path / "hf"), "--mindspore_path", str(tmp_path / "m.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --layers 12 but") and "has 2 layers" in err and err.count("\n") == 1
    assert not (tmp_path / "m.ckpt").exists()
    assert to_ms(["--torch_path", str(tmp_path / "missing"), "--mindspore_path", str(tmp_path / "m.ckpt")]) == 2
    assert "error:" in capsys.readouterr().err
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1  # untied head: MindFormers cannot hold it
    torch.save(state, tmp_path / "untied.bin")
    with pytest.raises(ValueError, match="differs from the word embedding"):
        hf_to_mindspore(str(tmp_path / "untied.bin"), str(tmp_path / "m.ckpt"))
    del state["lm_head.weight"], state["transformer.h.1.mlp.c_fc.bias"]
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="missing tensor 'transformer.h.1.mlp.c_fc.bias'"):
        hf_to_mindspore(str(tmp_path / "partial.bin"), str(tmp_path / "m.ckpt"))
    # a LoRA-trained MindFormers checkpoint, unmerged: refused with a hint
    hf_to_mindspore(str(tmp_path / "hf"), str(tmp_path / "m.ckpt"))
    ms = read_ckpt(tmp_path / "m.ckpt")
    ms["backbone.blocks.0.attention.dense1.lora_a"] = torch.zeros(4, 64)
    write_ckpt(tmp_path / "lora.ckpt", ms)
    with pytest.raises(ValueError, match="unexpected tensor 'backbone.blocks.0.attention.dense1.lora_a' .unmerged LoRA"):
        mindspore_to_hf(str(tmp_path / "lora.ckpt"), str(tmp_path / "out"))


def test_cli_help_has_examples():
    import subprocess
    for name in ("hf_to_mindspore", "mindspore_to_hf", "merge_hf_shards", "merge_lora"):
        with pytest.raises(SystemExit) as e:
            cli(name)(["--help"])
        assert e.value.code == 0
    # and as a real process, from outside the repository
    run = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "mindspore_to_hf.py"), "--help"],
                         capture_output=True, text=True, cwd="/")
    assert run.returncode == 0 and "examples:" in run.stdout and "--n_head" in run.stdout
