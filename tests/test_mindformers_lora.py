"""MindFormers' LoRA: its q / v targets (dense1, dense3) on our fused c_attn, its unmerged LoRA .ckpt loaded into a
LoRA model, through run_mode eval and convert/merge_lora.py; checked against the adapters' own arithmetic."""
import re

import numpy as np
import pytest
import torch
import yaml

from gpt2_ascend import GPT2LMHeadModel
from gpt2_ascend.convert import hf_to_mindspore, read_ckpt, write_ckpt
from gpt2_ascend.budget import MemoryBudgetError
from gpt2_ascend.lora import apply_lora, mindformers_targets, qkv_block_mask

from conftest import load_script, tiny_config

RANK, ALPHA = 2, 8.0
E = 64


def test_mindformers_target_regex_maps_to_our_modules():
    assert mindformers_targets([".*dense1.*", ".*dense3.*"]) == ("c_attn.q", "c_attn.v")
    assert mindformers_targets([".*dense*", ".*linear*"]) == ("c_attn",)  # MindFormers' default: all of q, k, v
    assert mindformers_targets([".*mapping.*", "c_proj"]) == ("c_proj", "c_fc")
    with pytest.raises(ValueError, match="matches no layer"):
        mindformers_targets([".*wq.*"])
    from gpt2_ascend.train.recipe import load_recipe, lora_settings
    recipe = load_recipe(None, ["model.model_config.pet_config.pet_type=lora",
                                "model.model_config.pet_config.target_modules=.*dense1.*|.*dense3.*"])
    assert lora_settings(recipe)["target_modules"] == (".*dense1.*", ".*dense3.*")


def _separate_adapters_loss(base, parts, tokens):
    """The loss of `base` with separate rank-r adapters on q and v (MindFormers' LoRADense), written out."""
    (a_q, b_q), (a_v, b_v) = parts
    scale = ALPHA / RANK
    weights = {}
    for i, block in enumerate(base.transformer.h):
        w = block.attn.c_attn.weight
        delta = torch.cat([scale * b_q[i] @ a_q[i], torch.zeros(E, E), scale * b_v[i] @ a_v[i]])
        weights[f"transformer.h.{i}.attn.c_attn.weight"] = w + delta
    state = dict(base.named_parameters())
    state.update(weights)
    out = torch.func.functional_call(base, state, (tokens[:, :-1],), dict(targets=tokens[:, 1:]))
    return out.loss


def test_q_v_targets_train_exactly_like_two_separate_adapters():
    torch.manual_seed(0)
    model = apply_lora(GPT2LMHeadModel(tiny_config()), rank=RANK, alpha=ALPHA, dropout=0.0,
                       target_modules=[".*dense1.*", ".*dense3.*"])
    tokens = torch.randint(0, 512, (2, 9))
    for i, block in enumerate(model.base_model.model.transformer.h):
        torch.nn.init.normal_(block.attn.c_attn.lora_B["default"].weight)  # nonzero B, so A gets gradients too
        block.attn.c_attn.lora_B["default"].weight.data *= qkv_block_mask(3 * E, ["q", "v"], RANK)
    model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    blocks = list(model.base_model.model.transformer.h)
    a_q = [b.attn.c_attn.lora_A["default"].weight[:RANK].detach().clone().requires_grad_() for b in blocks]
    a_v = [b.attn.c_attn.lora_A["default"].weight[RANK:].detach().clone().requires_grad_() for b in blocks]
    b_q = [b.attn.c_attn.lora_B["default"].weight[:E, :RANK].detach().clone().requires_grad_() for b in blocks]
    b_v = [b.attn.c_attn.lora_B["default"].weight[2 * E:, RANK:].detach().clone().requires_grad_() for b in blocks]
    base = GPT2LMHeadModel(tiny_config())
    base.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                          for k, v in model.state_dict().items() if "lora_" not in k})
    _separate_adapters_loss(base, ((a_q, b_q), (a_v, b_v)), tokens).backward()
    for i, block in enumerate(blocks):
        grad_a = block.attn.c_attn.lora_A["default"].weight.grad
        grad_b = block.attn.c_attn.lora_B["default"].weight.grad
        torch.testing.assert_close(grad_a[:RANK], a_q[i].grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_a[RANK:], a_v[i].grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b[:E, :RANK], b_q[i].grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b[2 * E:, RANK:], b_v[i].grad, atol=1e-6, rtol=1e-5)
        # k rows and the cross blocks get no gradient, so they stay zero through any number of updates
        assert grad_b[E:2 * E].abs().max() == 0 and grad_b[:E, RANK:].abs().max() == 0
        assert grad_b[2 * E:, :RANK].abs().max() == 0


def make_lora_ckpt(root, cells=(("dense1", 0), ("dense3", 2))):
    """A MindFormers-style LoRA checkpoint in root: base weights (written by our converter) plus mindpet's
    lora_a [r, in] / lora_b [out, r] on the given attention cells of every block; and the expected merged model."""
    torch.manual_seed(1)
    base = GPT2LMHeadModel(tiny_config(vocab_size=1000, n_positions=32, pad_token_id=999, eos_token_id=999,
                                       bos_token_id=999))
    base.save_pretrained(str(root / "base"))
    hf_to_mindspore(str(root / "base"), str(root / "base.ckpt"))
    tensors = read_ckpt(str(root / "base.ckpt"))
    gen = torch.Generator().manual_seed(2)
    merged = {}
    for i in range(2):
        for cell, part in cells:
            a = torch.randn(RANK, E, generator=gen) * 0.1
            b = torch.randn(E, RANK, generator=gen) * 0.1
            tensors[f"backbone.blocks.{i}.attention.{cell}.mindpet_delta_lora_a"] = a
            tensors[f"backbone.blocks.{i}.attention.{cell}.mindpet_delta_lora_b"] = b
            merged[(i, part)] = ALPHA / RANK * b @ a  # [out, in]: dense's own layout
    write_ckpt(str(root / "lora.ckpt"), tensors)
    expected = GPT2LMHeadModel.from_pretrained(str(root / "base"))
    with torch.no_grad():
        for (i, part), delta in merged.items():
            expected.transformer.h[i].attn.c_attn.weight[part * E:(part + 1) * E] += delta
    return root, expected.eval()


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """LoRA on dense1 (q) and dense3 (v), as MindFormers' GPT-2 LoRA recipes write it."""
    return make_lora_ckpt(tmp_path_factory.mktemp("mf_lora"))


def test_lora_ckpt_on_q_k_and_v_keeps_three_adapters(tmp_path):
    """MindFormers' default targets ('.*dense*') adapt all of q, k and v: three rank-r adapters, loaded as one
    block-diagonal c_attn adapter of rank 3r (a rank-r one cannot hold them; it crashed the load)."""
    from gpt2_ascend.convert import load_mindformers_lora
    root, expected = make_lora_ckpt(tmp_path, (("dense1", 0), ("dense2", 1), ("dense3", 2)))
    model = load_mindformers_lora(str(root / "lora.ckpt"), ALPHA, n_head=4).eval()
    assert model.lora_layout == (RANK, ("c_attn.q", "c_attn.k", "c_attn.v"))
    tokens = torch.randint(0, 1000, (2, 12))
    assert (model(tokens).logits - expected(tokens).logits).abs().max() < 1e-5


def test_lora_ckpt_loads_as_a_lora_model_and_merges(lora_ckpt, tmp_path):
    from gpt2_ascend.convert import load_mindformers_lora
    root, expected = lora_ckpt
    tokens = torch.randint(0, 1000, (2, 12))
    model = load_mindformers_lora(str(root / "lora.ckpt"), ALPHA, n_head=4).eval()
    assert model.lora_layout == (RANK, ("c_attn.q", "c_attn.v"))
    want = expected(tokens).logits
    assert (model(tokens).logits - want).abs().max() < 1e-5
    merge = load_script("convert/merge_lora.py")
    assert merge.main(["--base", str(root / "lora.ckpt"), "--lora_alpha", str(ALPHA), "--n_head", "4",
                       "--output_dir", str(tmp_path / "merged")]) == 0
    merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    assert (merged(tokens).logits - want).abs().max() < 1e-5
    assert merge.main(["--base", str(root / "lora.ckpt"), "--output_dir", str(tmp_path / "m2")]) == 2  # no alpha


def test_lora_ckpt_through_a_lora_recipe_eval_and_refused_without_one(lora_ckpt, tmp_path, capsys):
    root, expected = lora_ckpt
    blocks = np.random.default_rng(0).integers(0, 1000, (4, 32)).astype(np.uint16)
    np.save(tmp_path / "eval.npy", blocks)
    recipe = {"device": "cpu", "output_dir": str(tmp_path / "out"), "runner_config": {"batch_size": 2},
              "model": {"model_config": dict(seq_length=32, vocab_size=1000, hidden_size=64, num_layers=2,
                                             num_heads=4, hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                                             pet_config=dict(pet_type="lora", lora_rank=RANK, lora_alpha=ALPHA,
                                                             lora_dropout=0.0,
                                                             target_modules=".*dense1.*|.*dense3.*"))}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    train = load_script("train.py")
    args = ["--config", str(tmp_path / "r.yaml"), "--run_mode", "eval", "--load_checkpoint", str(root / "lora.ckpt"),
            "--eval_dataset_dir", str(tmp_path / "eval.npy")]
    assert train.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    import json
    result = json.loads(out[-1])
    from gpt2_ascend.eval import perplexity
    want = perplexity(expected, blocks, 32, batch_size=2, protocol="mindformers")
    assert result["metric"] == "PerplexityMetric" and abs(result["loss"] - want["loss"]) < 1e-5
    assert out[0] == f"LoRA adapters from {root / 'lora.ckpt'}: rank 2 on c_attn.q, c_attn.v (alpha 8 from the recipe)"
    assert out[-2].startswith("PerplexityMetric: loss ")
    recipe["model"]["model_config"].pop("pet_config")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(recipe))
    assert train.main(["--config", str(tmp_path / "plain.yaml")] + args[2:]) == 2
    assert "(unmerged LoRA weights: load them with a LoRA recipe" in capsys.readouterr().err


def test_trainable_count_is_mindformers_for_q_v_adapters():
    """MindFormers' q and v LoRADense hold A [r, E] + B [E, r] each: 4 r E per layer. The fused c_attn adapter's B is
    [3E, 2r], with zero blocks that never train: the count printed is MindFormers' (issue 25: 7,680 was 3,840)."""
    from gpt2_ascend.train.run import _trainable
    config = tiny_config(n_embd=48, n_head=4, n_layer=2)
    model = apply_lora(GPT2LMHeadModel(config), rank=10, alpha=20, target_modules=[".*dense1.*", ".*dense3.*"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 7680  # A [2r, E] + B [3E, 2r], 2 layers
    assert _trainable(model) == 4 * 10 * 48 * 2 == 3840
    whole = apply_lora(GPT2LMHeadModel(config), rank=10, alpha=20, target_modules=("c_attn",))
    assert _trainable(whole) == sum(p.numel() for p in whole.parameters() if p.requires_grad)  # no zero blocks


def test_a_lora_rank_no_machine_holds_is_refused_before_peft_allocates():
    # the CLIs refuse a rank beyond 2^24 as they read it; the Python API takes any integer, so the memory budget
    # is its guard: 10^11 x (64+192) x 4 bytes is ~100 TB, refused with one line before peft allocates
    model = GPT2LMHeadModel(tiny_config())
    with pytest.raises(MemoryBudgetError, match=r"LoRA adapters of rank 100000000000 on c_attn.*use a smaller lora rank"):
        apply_lora(model, rank=10 ** 11)


def test_an_adapter_whose_rank_exceeds_the_free_memory_is_refused_before_peft_reads_it(tmp_path, monkeypatch):
    # r = 2^24 is inside the schema's range; 2^24 x 512 x 4 bytes = 34 GB against a free memory of 1 GB here
    import json
    from gpt2_ascend import budget
    from gpt2_ascend.lora import load_adapter
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=1 << 24, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
        task_type="CAUSAL_LM", bias="none")))
    monkeypatch.setattr(budget, "available_memory", lambda device: (1 << 30, "a test's limit"))
    with pytest.raises(MemoryBudgetError, match=rf"^the LoRA adapter in {re.escape(str(tmp_path))} \(r=16777216\): "
                                                 r".* needs 34.4 GB .* use a smaller lora rank"):
        load_adapter(GPT2LMHeadModel(tiny_config()), str(tmp_path))
