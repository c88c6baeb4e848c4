"""lora.py's contract, piece by piece and fast: apply_lora's documented defaults and refusals, what
adapter_config.json may hold (and what a key left out means), the memory check's arithmetic, load_adapter's
one-line errors and its merge, and the files save_adapter writes."""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open

from conftest import assert_generate_cli_continues_like, load_script, max_diff, randomize_lora_b, tiny_config
from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.lora import apply_lora, load_adapter, read_adapter_config, save_adapter

E = 32  # n_embd: unlike any rank below, so a shape says which is which


def c_attn_of(peft_model, block=0):
    return peft_model.base_model.model.transformer.h[block].attn.c_attn


def saved_adapter(root, rank=2, alpha=8.0, targets=("c_attn",)):
    """An adapter directory written by save_adapter (non-zero B, as after training), and the adapted model."""
    torch.manual_seed(0)
    adapted = apply_lora(GPT2LMHeadModel(tiny_config()), rank=rank, alpha=alpha, dropout=0.0, target_modules=targets)
    randomize_lora_b(adapted)
    save_adapter(adapted, str(root))
    return str(root), adapted.eval()


def base_of(adapted):
    """A plain model holding the adapted model's base weights (the model the adapter was trained on)."""
    base = GPT2LMHeadModel(adapted.get_base_model().config).eval()
    base.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                          for k, v in adapted.state_dict().items() if "lora_" not in k})
    return base


def with_config(adapter_dir, **changes):
    """The adapter's adapter_config.json rewritten with keys changed (None: left out)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f)


def tight_budget(monkeypatch, free_bytes=100):
    from gpt2_ascend import budget
    monkeypatch.setattr(budget, "available_memory", lambda device: (free_bytes, "a test's limit"))


# ---------------------------------------------------------------------------------------------
# apply_lora: its defaults are the Python API's documented behaviour (MindFormers' GPT-2 LoRA recipe's numbers)
# ---------------------------------------------------------------------------------------------
def test_apply_lora_defaults_are_rank_64_alpha_128_dropout_0_1_on_c_attn():
    model = apply_lora(GPT2LMHeadModel(tiny_config(n_embd=E)))
    layer = c_attn_of(model)
    assert tuple(layer.lora_A["default"].weight.shape) == (64, E)  # rank 64
    assert tuple(layer.lora_B["default"].weight.shape) == (3 * E, 64)
    assert layer.scaling["default"] == 2.0  # alpha / rank = 128 / 64
    dropout = layer.lora_dropout["default"]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.1
    x = torch.ones(64, E)
    model.train()
    assert (dropout(x) == 0).any() and dropout(x).max() == pytest.approx(1 / 0.9)  # it drops in train mode


def test_q_k_and_v_together_are_one_rank_r_adapter_unless_fuse_qkv_is_false():
    fused = apply_lora(GPT2LMHeadModel(tiny_config(n_embd=E)), rank=2, target_modules=[".*dense*"])
    assert tuple(c_attn_of(fused).lora_A["default"].weight.shape) == (2, E)
    assert fused.peft_config["default"].rank_pattern == {}
    apart = apply_lora(GPT2LMHeadModel(tiny_config(n_embd=E)), rank=2, target_modules=[".*dense*"], fuse_qkv=False)
    assert tuple(c_attn_of(apart).lora_A["default"].weight.shape) == (6, E)  # three rank-2 adapters side by side


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_a_rank_that_is_not_a_positive_integer_is_refused(rank):
    with pytest.raises(ValueError, match=rf"^lora rank must be a positive integer, got {rank!r}$"):
        apply_lora(GPT2LMHeadModel(tiny_config(n_embd=E)), rank=rank)


def test_rank_1_is_the_smallest_adapter():
    model = apply_lora(GPT2LMHeadModel(tiny_config(n_embd=E)), rank=1, alpha=2)
    assert tuple(c_attn_of(model).lora_A["default"].weight.shape) == (1, E)
    assert c_attn_of(model).scaling["default"] == 2.0


def test_only_c_attn_is_kept_to_its_q_k_v_parts(tmp_path):
    """q alone (MindFormers' dense1) beside the output projections: c_attn's B trains q's rows only, every other
    adapted layer's B all its rows."""
    torch.manual_seed(0)
    model = apply_lora(GPT2LMHeadModel(tiny_config(n_embd=E)), rank=2, dropout=0.0,
                       target_modules=[".*dense1.*", ".*projection.*"])
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    block = model.base_model.model.transformer.h[0]
    q_rows = block.attn.c_attn.lora_B["default"].weight.grad
    assert (q_rows[:E] != 0).all() and (q_rows[E:] == 0).all()  # q's E rows of the 3E
    for layer in (block.attn.c_proj, block.mlp.c_proj):
        assert (layer.lora_B["default"].weight.grad != 0).all()  # all E rows, both columns


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2ForSequenceClassification])
def test_a_classifiers_lora_trains_and_saves_its_head_an_lms_none(tmp_path, cls):
    """A classifier's `score` head is new (random on an LM base): its LoRA trains it whole and the adapter carries
    it (modules_to_save ["score"]); a language model's LoRA trains the adapters alone and saves no module whole."""
    torch.manual_seed(0)
    adapted = apply_lora(cls(tiny_config()), rank=2, alpha=4.0, dropout=0.0)
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad and "lora_" not in n]
    save_adapter(adapted, str(tmp_path))
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), framework="pt") as f:
        saved_whole = {k: f.get_tensor(k) for k in f.keys() if "lora_" not in k}
    if cls is GPT2LMHeadModel:
        assert adapted.peft_config["default"].modules_to_save is None
        assert trained == [] and saved_whole == {}
        assert read_adapter_config(str(tmp_path))["modules_to_save"] is None
    else:
        assert "score" in adapted.peft_config["default"].modules_to_save
        assert trained == ["base_model.model.score.modules_to_save.default.weight"]
        assert list(saved_whole) == ["base_model.model.score.weight"]
        assert torch.equal(saved_whole["base_model.model.score.weight"], adapted.base_model.model.score.weight)
        assert read_adapter_config(str(tmp_path))["modules_to_save"] == ["score"]


def test_an_invalid_target_regex_is_one_line():
    with pytest.raises(ValueError) as e:
        apply_lora(GPT2LMHeadModel(tiny_config()), target_modules=["(("])
    assert str(e.value) == "lora target_modules '((' is not a valid regex (missing ), unterminated subpattern at " \
                           "position 1)"


def test_a_target_the_model_lacks_is_named():
    # two missing: the message names the first in order (c_attn), on a module that holds neither
    with pytest.raises(ValueError) as e:
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), target_modules=("c_proj", "c_attn"))
    assert str(e.value) == "lora target module 'c_attn' is not in the model: use c_attn, c_proj, c_fc"


# ---------------------------------------------------------------------------------------------
# adapter_config.json: what is accepted, what is refused, and what a key left out means
# ---------------------------------------------------------------------------------------------
LEFT_OUT = ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "inference_mode", "use_rslora", "use_dora")


def test_keys_left_out_mean_what_peft_reads_them_as(tmp_path):
    """A minimal adapter_config.json (as an older or hand-written one may be): our check's record of it says what
    peft loads (r 8, alpha 8, no dropout, no fan-in-fan-out, rsLoRA or DoRA; inference mode when not trained on)."""
    adapter, _ = saved_adapter(tmp_path / "a", rank=8, alpha=8.0)
    with_config(adapter, **{key: None for key in LEFT_OUT})
    record = read_adapter_config(adapter)
    assert {k: record[k] for k in LEFT_OUT} == dict(r=8, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=False,
                                                    inference_mode=True, use_rslora=False, use_dora=False)
    loaded = load_adapter(GPT2LMHeadModel(tiny_config()), adapter, merge=False).peft_config["default"]
    assert {k: record[k] for k in LEFT_OUT} == {k: getattr(loaded, k) for k in LEFT_OUT}


def refusal(path, key, value, expected):
    return f"bad value {value!r} for '{key}' in {path}: expected {expected}"


BOUNDARIES = [  # (key, value, None when accepted or what the refusal expects)
    ("r", 0, "an integer in [1, 16777216]"), ("r", 1, None),
    ("lora_alpha", 0, "a finite number > 0"), ("lora_alpha", -0.5, "a finite number > 0"), ("lora_alpha", 0.5, None),
    ("lora_dropout", -0.1, "a finite number in [0, 1)"), ("lora_dropout", 0.0, None),
    ("lora_dropout", 0.99, None), ("lora_dropout", 1.0, "a finite number in [0, 1)"),
    ("target_modules", [1], "a module name or a list of module names"),
    ("target_modules", 5, "a module name or a list of module names"),
    ("target_modules", "c_attn", None), ("target_modules", ["c_attn", "c_fc"], None),
]


@pytest.mark.parametrize("key,value,expected", BOUNDARIES)
def test_adapter_config_bounds(tmp_path, key, value, expected):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", key: value}))
    if expected is None:
        assert read_adapter_config(str(tmp_path))[key] == value
    else:
        with pytest.raises(ValueError) as e:
            read_adapter_config(str(tmp_path))
        assert str(e.value) == refusal(tmp_path / "adapter_config.json", key, value, expected)


@pytest.mark.parametrize("key, smallest, refused, expected", [
    ("rank_pattern", 1, 0, "an integer in [1, 16777216]"),  # ranks start at 1
    ("alpha_pattern", 0.5, 0, "a finite number > 0"),  # alphas are positive
])
def test_pattern_values_are_bounded_like_their_key(tmp_path, key, smallest, refused, expected):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", key: {"c_attn": smallest}}))
    assert read_adapter_config(str(tmp_path))[key] == {"c_attn": smallest}
    path.write_text(json.dumps({"peft_type": "LORA", key: {"c_attn": refused}}))
    with pytest.raises(ValueError) as e:
        read_adapter_config(str(tmp_path))
    assert str(e.value) == refusal(path, f"{key}.c_attn", refused, expected)


def test_a_rank_1_adapter_loads(tmp_path):
    adapter, adapted = saved_adapter(tmp_path / "a", rank=1, alpha=4.0)
    merged = load_adapter(base_of(adapted), adapter)
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        assert max_diff(want, base_of(adapted)(ids).logits) > 1e-2
        assert max_diff(merged.eval()(ids).logits, want) <= 1e-5


# ---------------------------------------------------------------------------------------------
# the memory check before peft allocates: rank x (in + out) x 4 bytes over the adapted layers
# ---------------------------------------------------------------------------------------------
# names, peft's one regex on whole names, or none named (peft's default for GPT-2: c_attn)
@pytest.mark.parametrize("targets", [["c_attn"], r".*\.c_attn", None])
def test_the_memory_check_counts_exactly_the_targeted_layers(tmp_path, monkeypatch, targets):
    # c_attn is 64 in + 192 out in each of 2 blocks: 512 values per unit of rank; rank 1 is checked too
    adapter, _ = saved_adapter(tmp_path / "a", rank=1)
    with_config(adapter, target_modules=targets)
    tight_budget(monkeypatch)
    with pytest.raises(ValueError, match=rf"^the LoRA adapter in {re.escape(adapter)} \(r=1\): 512 x r=1 values x 4 "
                                         r"bytes needs 2.0 KB \(2048 bytes\) of cpu memory, .* use a smaller lora "
                                         r"rank \(r\)$"):
        load_adapter(GPT2LMHeadModel(tiny_config()), adapter)


# ---------------------------------------------------------------------------------------------
# load_adapter: merged by default; peft's errors as one line naming the adapter
# ---------------------------------------------------------------------------------------------
def test_load_adapter_merges_by_default(tmp_path):
    adapter, adapted = saved_adapter(tmp_path / "a")
    base = base_of(adapted)
    merged = load_adapter(base_of(adapted), adapter)
    assert type(merged) is GPT2LMHeadModel and not any("lora_" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        assert max_diff(want, base(ids).logits) > 1e-2  # the adapter changes the model...
        assert max_diff(merged.eval()(ids).logits, want) <= 1e-5  # ...and is folded into its weights


def test_an_unmerged_adapter_loads_frozen_unless_trainable(tmp_path):
    adapter, _ = saved_adapter(tmp_path / "a")
    frozen = load_adapter(GPT2LMHeadModel(tiny_config()), adapter, merge=False)
    assert frozen.peft_config["default"].inference_mode is True
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == []
    trains = load_adapter(GPT2LMHeadModel(tiny_config()), adapter, merge=False, trainable=True)
    assert trains.peft_config["default"].inference_mode is False
    assert [n for n, p in trains.named_parameters() if p.requires_grad] == [
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.default.weight" for i in range(2) for m in "AB"]


def test_an_adapter_of_another_shape_is_one_line(tmp_path):
    adapter, _ = saved_adapter(tmp_path / "a")
    with pytest.raises(ValueError) as e:
        load_adapter(GPT2LMHeadModel(tiny_config(n_embd=E)), adapter)
    assert str(e.value) == (
        f"cannot load the LoRA adapter in {adapter}: size mismatch for base_model.model.transformer.h.0.attn.c_attn."
        f"lora_A.default.weight: copying a param with shape torch.Size([2, 64]) from checkpoint, the shape in current "
        f"model is torch.Size([2, 32]). (was it trained on a base of another shape?)")


def test_a_damaged_adapter_file_is_one_line(tmp_path):
    adapter, _ = saved_adapter(tmp_path / "a")
    with open(os.path.join(adapter, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x05" + bytes(7) + b"{}")  # a header length past the file's end
    with pytest.raises(ValueError) as e:
        load_adapter(GPT2LMHeadModel(tiny_config()), adapter)
    assert str(e.value) == (f"cannot load the LoRA adapter in {adapter}: SafetensorError: Error while deserializing "
                            f"header: invalid header length (is the adapter complete and for this base model?)")


def test_an_error_of_several_lines_is_kept_whole_on_one_line(tmp_path, monkeypatch):
    # as torch words a strict state-dict load: its first line alone is a header that names no problem
    from peft import PeftModel
    def fails(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for PeftModelForCausalLM:\n\tUnexpected key(s) in "
                           "state_dict: \"lora_C\".")
    monkeypatch.setattr(PeftModel, "from_pretrained", fails)
    adapter, _ = saved_adapter(tmp_path / "a")
    with pytest.raises(ValueError) as e:
        load_adapter(GPT2LMHeadModel(tiny_config()), adapter)
    assert str(e.value) == (f"cannot load the LoRA adapter in {adapter}: RuntimeError: Error(s) in loading "
                            f"state_dict for PeftModelForCausalLM: Unexpected key(s) in state_dict: \"lora_C\". (is "
                            f"the adapter complete and for this base model?)")


def test_an_invalid_target_regex_in_an_adapter_is_one_line(tmp_path):
    # the memory check cannot count layers with it (and lets it pass); peft then fails on it, in one line
    adapter, _ = saved_adapter(tmp_path / "a")
    with_config(adapter, target_modules="((")
    with pytest.raises(ValueError) as e:
        load_adapter(GPT2LMHeadModel(tiny_config()), adapter)
    assert re.fullmatch(rf"cannot load the LoRA adapter in {re.escape(adapter)}: \w+: missing \), unterminated "
                        r"subpattern at position 1 \(is the adapter complete and for this base model\?\)",
                        str(e.value)), str(e.value)


# ---------------------------------------------------------------------------------------------
# an adapter folder without its weights file: said so (peft would look the folder up on the hub), API and CLI
# ---------------------------------------------------------------------------------------------
def lacks_weights(adapter):
    return (f"the LoRA adapter in {adapter} lacks its weights file adapter_model.safetensors (an older peft's "
            f"adapter_model.bin): copy it beside its adapter_config.json, or save the adapter again")


def test_an_adapter_without_its_weights_file_is_one_line(tmp_path):
    adapter, _ = saved_adapter(tmp_path / "a")
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_adapter(GPT2LMHeadModel(tiny_config()), adapter)
    assert str(e.value) == lacks_weights(adapter)


def test_an_adapter_without_its_weights_file_in_generate(tmp_path, capsys):
    adapter, adapted = saved_adapter(tmp_path / "a")
    base_of(adapted).save_pretrained(str(tmp_path / "base"))
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    code = load_script("generate.py").main(["--model", str(tmp_path / "base"), "--adapter", adapter, "--prompt", "hi",
                                            "--max_new_tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert (code, err.strip().splitlines()[-1]) == (2, f"error: {lacks_weights(adapter)}"), err
    assert "Traceback" not in err


def test_an_older_peft_adapter_model_bin_loads(tmp_path):
    adapter, adapted = saved_adapter(tmp_path / "a")
    adapted.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)  # peft's adapter_model.bin
    assert sorted(os.listdir(tmp_path / "bin")) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    merged = load_adapter(base_of(adapted), str(tmp_path / "bin"))
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(merged.eval()(ids).logits, adapted(input_ids=ids).logits) <= 1e-5


# ---------------------------------------------------------------------------------------------
# an adapter_config.json without target_modules: the layers peft adapts on transformers' GPT-2
# ---------------------------------------------------------------------------------------------
def test_an_adapter_without_target_modules_adapts_c_attn_as_peft_on_transformers_does(tmp_path, capsys):
    """peft's default for transformers' GPT-2 (its target-module mapping for model_type gpt2: c_attn), which peft
    cannot look up on our model (GPT2Config.to_dict gives it no model_type): the same logits and the same greedy
    continuation through generate.py --adapter as peft on transformers' GPT-2."""
    import transformers
    from peft import PeftModel
    torch.manual_seed(0)
    config = tiny_config(vocab_size=50257, pad_token_id=50256, eos_token_id=50256, bos_token_id=50256)
    GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "base"))
    adapted = apply_lora(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), rank=2, alpha=8.0, dropout=0.0)
    randomize_lora_b(adapted)
    adapter = str(tmp_path / "adapter")
    save_adapter(adapted, adapter)
    with_config(adapter, target_modules=None)
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", attn_implementation="eager")
    theirs = PeftModel.from_pretrained(hf_base, adapter).eval()
    ours = load_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), adapter, merge=False).eval()
    assert theirs.peft_config["default"].target_modules == ours.peft_config["default"].target_modules == {"c_attn"}
    ids = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert max_diff(want, GPT2LMHeadModel.from_pretrained(tmp_path / "base")(ids).logits) > 1e-2
        assert max_diff(ours(input_ids=ids).logits, want) <= 1e-5
    assert_generate_cli_continues_like(theirs, tmp_path / "base", adapter, tmp_path / "out.json", capsys)


# ---------------------------------------------------------------------------------------------
# save_adapter: the files an older peft and transformers' GPT-2 read
# ---------------------------------------------------------------------------------------------
def test_save_adapter_writes_the_adapter_only_and_a_portable_config(tmp_path):
    adapter, adapted = saved_adapter(tmp_path / "a", rank=2, alpha=8.0, targets=[".*dense1.*", ".*dense3.*"])
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight"
                                    for i in range(2) for m in "AB"]  # no embedding or head copies
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        written = json.load(f)
    # the keys that say what the adapter is, and those off peft's defaults (q and v: rank 2 x 2, alpha 8 x 2)
    assert written == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 8.0, "lora_dropout": 0.0,
        "target_modules": ["c_attn"], "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "inference_mode": True, "base_model_name_or_path": None, "rank_pattern": {"c_attn": 4},
        "alpha_pattern": {"c_attn": 16.0},
        "auto_mapping": {"base_model_class": "GPT2LMHeadModel",
                         "parent_library": "transformers.models.gpt2.modeling_gpt2"}}
    assert adapted.peft_config["default"].inference_mode is False  # the model in memory still trains


def test_a_nested_module_an_adapter_trains_whole_stays_in_its_config(tmp_path):
    """An HF adapter that also trains transformer.ln_f (modules_to_save ['ln_f']), continued here and saved again:
    ln_f stays in modules_to_save, so the trained ln_f is loaded with it."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    theirs = get_peft_model(GPT2LMHeadModel(tiny_config()), LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], modules_to_save=["ln_f"], task_type="CAUSAL_LM"))
    theirs.save_pretrained(str(tmp_path / "hf"))
    continued = load_adapter(GPT2LMHeadModel(tiny_config()), str(tmp_path / "hf"), merge=False, trainable=True)
    save_adapter(continued, str(tmp_path / "again"))
    assert read_adapter_config(str(tmp_path / "again"))["modules_to_save"] == ["ln_f"]
