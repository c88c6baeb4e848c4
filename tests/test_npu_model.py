"""The model's NPU path (npu_fusion_attention, npu_fast_gelu, explicit gelu, NpuFusedAdamW) run on CPU
tensors through the reference torch_npu, against the SDPA path: equal to 2e-6 in fp32 (measured: at most 8.3e-7)."""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel, KVCache, ops
from gpt2_ascend import device as dev
from gpt2_ascend.npu_ops import npu_attention
from conftest import max_diff, tiny_config
from npu_reference import npu_reference  # noqa: F401  (fixture)

TOL = 2e-6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def npu_path(npu_reference, monkeypatch):
    """The reference torch_npu installed and every tensor treated as an NPU tensor, so activations
    take their NPU branches too (attention follows attn_implementation)."""
    monkeypatch.setattr(dev, "is_npu_tensor", lambda x: True)
    return npu_reference


def twin_models(cls=GPT2LMHeadModel, **overrides):
    """The same weights twice: attention through the NPU kernel, and through SDPA."""
    torch.manual_seed(0)
    sdpa = cls(tiny_config(attn_implementation="sdpa", **overrides)).eval()
    npu = cls(tiny_config(attn_implementation="npu", **overrides)).eval()
    npu.load_state_dict(sdpa.state_dict())
    return npu, sdpa


def attention_calls(ref):
    return [c for c in ref.calls if c["op"] == "npu_fusion_attention"]


def padded_batch(config, left: bool, T=10, pad=(0, 3)):
    """Two rows of T tokens; row r has pad[r] padding tokens on the left or the right."""
    torch.manual_seed(1)
    ids = torch.randint(0, config.vocab_size - 1, (2, T))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad):
        if n and left:
            mask[row, :n] = 0
        elif n:
            mask[row, T - n:] = 0
    return ids.masked_fill(mask == 0, config.pad_token_id), mask


# ---------------------------------------------------------------------------------------------
# the kernel call itself
# ---------------------------------------------------------------------------------------------
def test_causal_call_uses_the_compressed_mask_and_explicit_arguments(npu_reference):
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    out = npu_attention(q, k, v, is_causal=True, scale=0.25)
    call = attention_calls(npu_reference)[-1]
    assert call["input_layout"] == "BNSD" and call["head_num"] == 4 and call["scale"] == 0.25
    assert call["keep_prob"] == 1.0 and call["sparse_mode"] == 2 and call["mask_shape"] == (2048, 2048)
    assert call["inner_precise"] == 0
    assert max_diff(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)) <= TOL


def test_default_scale_is_one_over_sqrt_head_dim_not_the_kernels_one(npu_reference):
    q, k, v = (torch.randn(1, 2, 3, 16) for _ in range(3))
    npu_attention(q, k, v)
    assert attention_calls(npu_reference)[-1]["scale"] == 1.0 / math.sqrt(16)


def test_cached_queries_align_to_the_end_of_the_keys(npu_reference):
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    out = npu_attention(q, k, v, is_causal=True)
    assert attention_calls(npu_reference)[-1]["sparse_mode"] == 3
    bottom_right = torch.ones(3, 7, dtype=torch.bool).tril(7 - 3)
    assert max_diff(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right)) <= TOL
    one = npu_attention(q[:, :, :1], k, v, is_causal=True)  # a single decode row sees every key
    assert attention_calls(npu_reference)[-1]["mask_shape"] is None
    assert max_diff(one, F.scaled_dot_product_attention(q[:, :, :1], k, v)) <= TOL
    with pytest.raises(ValueError, match="at least its own key"):
        npu_attention(k, q, q, is_causal=True)


def test_padding_mask_is_inverted_and_fully_masked_rows_are_opened(npu_reference):
    q, k, v = (torch.randn(2, 4, 5, 16) for _ in range(3))
    attend = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    attend[1, :, :, :2] = False  # row 1 is left-padded by two: its first two queries see nothing
    out = npu_attention(q, k, v, mask=attend)
    call = attention_calls(npu_reference)[-1]
    assert call["sparse_mode"] == 0 and call["mask_shape"] == (2, 1, 5, 5)
    assert not out.isnan().any()
    opened = attend | ~attend.any(-1, keepdim=True)
    assert max_diff(out, F.scaled_dot_product_attention(q, k, v, attn_mask=opened)) <= TOL
    # 1NSS is not a shape the kernel takes: it is expanded to BNSS
    per_head = torch.ones(1, 4, 5, 5, dtype=torch.bool).tril()
    out = npu_attention(q, k, v, mask=per_head)
    assert attention_calls(npu_reference)[-1]["mask_shape"] == (2, 4, 5, 5)
    assert max_diff(out, F.scaled_dot_product_attention(q, k, v, attn_mask=per_head)) <= TOL
    with pytest.raises(ValueError, match="boolean mask"):
        npu_attention(q, k, v, mask=torch.zeros(2, 1, 5, 5))


def test_dropout_becomes_keep_prob_in_training_only(npu_reference):
    model = GPT2LMHeadModel(tiny_config(attn_implementation="npu", attn_pdrop=0.1))
    ids = torch.randint(0, 500, (2, 8))
    model.train()(ids)
    assert {c["keep_prob"] for c in attention_calls(npu_reference)} == {0.9}
    npu_reference.calls.clear()
    model.eval()(ids)
    assert {c["keep_prob"] for c in attention_calls(npu_reference)} == {1.0}


def test_cache_dtype_is_matched_to_the_query(npu_reference):
    q = torch.randn(1, 2, 1, 16)
    k, v = torch.randn(1, 2, 4, 16, dtype=torch.float16), torch.randn(1, 2, 4, 16, dtype=torch.float16)
    out = npu_attention(q, k, v)
    assert out.dtype == torch.float32
    assert max_diff(out, F.scaled_dot_product_attention(q, k.float(), v.float())) <= 1e-3


# ---------------------------------------------------------------------------------------------
# the model: npu equals sdpa
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["gelu_new", "fast_gelu", "gelu"])
def test_causal_forward_equals_sdpa(npu_path, activation):
    npu, sdpa = twin_models(activation=activation)
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert max_diff(npu(ids).logits, sdpa(ids).logits) <= TOL
    calls = attention_calls(npu_path)
    assert len(calls) == 2 and all(c["sparse_mode"] == 2 for c in calls)
    assert any(c["op"] == "npu_fast_gelu" for c in npu_path.calls) == (activation == "fast_gelu")


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_padded_forward_equals_sdpa(npu_path, left):
    npu, sdpa = twin_models()
    ids, mask = padded_batch(npu.config, left)
    with torch.no_grad():
        got = npu(ids, attention_mask=mask).logits
        want = sdpa(ids, attention_mask=mask).logits
    assert not got.isnan().any()
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= TOL
    assert all(c["sparse_mode"] == 0 and c["mask_shape"] == (2, 1, 10, 10) for c in attention_calls(npu_path))


def test_classification_pooling_equals_sdpa(npu_path):
    npu, sdpa = twin_models(GPT2ForSequenceClassification, num_labels=2)
    for left in (False, True):
        ids, mask = padded_batch(npu.config, left)
        labels = torch.tensor([0, 1])
        with torch.no_grad():
            got, want = npu(ids, attention_mask=mask, labels=labels), sdpa(ids, attention_mask=mask, labels=labels)
        assert max_diff(got.logits, want.logits) <= TOL
        assert abs(got.loss.item() - want.loss.item()) <= TOL


@pytest.mark.parametrize("cache_kind", ["dynamic", "static", "fixed_shape"])
def test_cached_decoding_token_by_token_equals_sdpa(npu_path, cache_kind):
    npu, sdpa = twin_models()
    config = npu.config
    ids, mask = padded_batch(config, left=True, T=14, pad=(0, 4))
    prompt = 8

    def decode(model):
        logits = []
        if cache_kind == "fixed_shape":
            cache = KVCache.static(config, 2, 14, fixed_shape=True)
            for t in range(14):  # every step reads all 14 slots under the mask
                cache.positions = torch.tensor([t])
                slot_mask = mask.clone()
                slot_mask[:, t + 1:] = 0
                logits.append(model(ids[:, t:t + 1], attention_mask=slot_mask, past_key_values=cache,
                                    use_cache=True).logits)
            return torch.cat(logits, 1)
        cache = KVCache.static(config, 2, 14) if cache_kind == "static" else None
        out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        for t in range(prompt, 14):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            logits.append(out.logits)
        return torch.cat(logits, 1)

    with torch.no_grad():
        got, want = decode(npu), decode(sdpa)
    real = mask.bool()
    assert not got.isnan().any()
    assert max_diff(got[real], want[real]) <= TOL


def test_cached_decoding_without_padding_uses_the_causal_modes(npu_path):
    npu, sdpa = twin_models()
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        out = npu(ids[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, 10):
            out = npu(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        full = sdpa(ids).logits
    assert max_diff(torch.cat(steps, 1), full) <= TOL
    modes = [(c["sparse_mode"], c["mask_shape"]) for c in attention_calls(npu_path)]
    assert modes[:2] == [(2, (2048, 2048))] * 2  # prefill: causal, square
    assert set(modes[2:]) == {(0, None)}  # one query row: nothing to mask


@pytest.mark.parametrize("fixed_shape", [False, True], ids=["growing_cache", "fixed_shape_cache"])
def test_greedy_generation_gives_the_same_tokens(npu_path, fixed_shape):
    npu, sdpa = twin_models()
    ids, mask = padded_batch(npu.config, left=True, T=6, pad=(0, 2))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, fixed_shape=fixed_shape)
    got, want = npu.generate(ids, **kwargs), sdpa.generate(ids, **kwargs)
    assert got.shape == (2, 14) and torch.equal(got, want)
    assert len(attention_calls(npu_path)) == 2 * 8  # 2 layers x (prefill + 7 decode steps)


# fast_gelu on a release whose npu_fast_gelu has no backward (2.7.1) and on one where it has (2.7.1.post2)
@pytest.mark.parametrize("activation, version", [("gelu_new", "2.7.1"), ("fast_gelu", "2.7.1"),
                                                 ("fast_gelu", "2.7.1.post2")])
def test_training_step_loss_and_grads_equal_sdpa(npu_path, activation, version):
    npu_path.set_version(version)
    npu, sdpa = twin_models(activation=activation)
    npu.train(), sdpa.train()
    ids, mask = padded_batch(npu.config, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    loss_npu = npu(ids, attention_mask=mask, labels=labels).loss
    loss_sdpa = sdpa(ids, attention_mask=mask, labels=labels).loss
    loss_npu.backward(), loss_sdpa.backward()
    assert abs(loss_npu.item() - loss_sdpa.item()) <= TOL
    grads_sdpa = dict(sdpa.named_parameters())
    for name, p in npu.named_parameters():
        assert p.grad is not None, name  # (npu_fast_gelu without a backward leaves c_fc with none)
        assert max_diff(p.grad, grads_sdpa[name].grad) <= TOL, name
    causal = twin_models(activation=activation)
    for model in causal:
        model.train()(ids, labels=ids).loss.backward()
    for (name, a), b in zip(causal[0].named_parameters(), causal[1].parameters()):
        assert max_diff(a.grad, b.grad) <= TOL, name
    if activation == "fast_gelu":  # the kernel with a registered backward did the MLP's activation
        used = {c["op"] for c in npu_path.calls if "gelu" in c["op"] and c["requires_grad"]}
        assert used == ({"npu_fast_gelu"} if version == "2.7.1.post2" else {"fast_gelu"})


# (release, dtype, requires grad) -> the torch_npu op fast_gelu runs, None = the formula in torch ops
FAST_GELU_ROUTES = [
    ("2.7.1", torch.float32, False, "npu_fast_gelu"), ("2.7.1", torch.bfloat16, False, "npu_fast_gelu"),
    ("2.7.1", torch.float32, True, "fast_gelu"), ("2.7.1", torch.float16, True, "fast_gelu"),
    ("2.7.1", torch.bfloat16, True, None),  # fast_gelu is documented for float16/float32 only
    ("2.7.1.post2", torch.bfloat16, True, "npu_fast_gelu"), ("2.8.0.post1", torch.bfloat16, True, None),
    ("2.9.0", torch.float32, True, "npu_fast_gelu"),
]


@pytest.mark.parametrize("version, dtype, grad, op", FAST_GELU_ROUTES)
def test_fast_gelu_takes_a_kernel_with_a_backward_when_training(npu_path, version, dtype, grad, op):
    npu_path.set_version(version)
    x = torch.linspace(-5, 5, 41).to(dtype).requires_grad_(grad)
    npu_path.calls.clear()
    y = ops.activation("fast_gelu", x)
    assert [c["op"] for c in npu_path.calls] == ([op] if op else [])
    ref = x.detach().double().requires_grad_(grad)
    expected = ref * torch.sigmoid(1.702 * ref)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert max_diff(y.double(), expected) <= tol
    if grad:  # the gradient reaches the input whichever way was taken
        y.sum().backward(), expected.sum().backward()
        assert max_diff(x.grad.double(), ref.grad) <= tol * 3
    with torch.no_grad():  # inference always gets the fused npu_fast_gelu
        npu_path.calls.clear()
        ops.activation("fast_gelu", x)
        assert [c["op"] for c in npu_path.calls] == ["npu_fast_gelu"]


# ---------------------------------------------------------------------------------------------
# activations and optimizer on the NPU path
# ---------------------------------------------------------------------------------------------
def test_npu_activations(npu_path):
    x = torch.linspace(-5, 5, 101)
    assert max_diff(ops.activation("gelu_new", x), F.gelu(x, approximate="tanh")) <= 1e-6
    assert max_diff(ops.activation("gelu", x), F.gelu(x)) <= 1e-6
    npu_path.calls.clear()
    assert max_diff(ops.activation("fast_gelu", x), x * torch.sigmoid(1.702 * x)) <= 1e-6
    assert [c["op"] for c in npu_path.calls] == ["npu_fast_gelu"]


def _groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def test_adamw_on_npu_is_npu_fused_adamw_with_the_same_groups(npu_reference):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    twin = GPT2LMHeadModel(tiny_config())
    twin.load_state_dict(model.state_dict())
    fused = ops.adamw(_groups(model), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, device_type="npu")
    # the reference: torch's multi-tensor AdamW (the arithmetic NpuFusedAdamW's stand-in reproduces; ops.adamw's
    # CPU choice, the fused kernel, rounds differently and Adam magnifies that in near-zero gradients)
    plain = torch.optim.AdamW(_groups(twin), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    assert isinstance(fused, npu_reference.optim.NpuFusedAdamW)
    assert ops.adamw(_groups(twin), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, device_type="cpu").defaults["fused"]
    assert [(g["weight_decay"], g["lr"], g["betas"], len(g["params"])) for g in fused.param_groups] == \
        [(g["weight_decay"], g["lr"], g["betas"], len(g["params"])) for g in plain.param_groups]
    ids = torch.randint(0, 500, (2, 8))
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            m(ids, labels=ids).loss.backward()
            opt.step()
            # what a generic training loop calls; the fused optimizer zeroes in place instead of
            # refusing (torch_npu raises on set_to_none=True), and the reference checks the grads stay put
            opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert max_diff(a, b) <= 1e-6
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_adamw_on_npu_falls_back_where_the_fused_rules_exclude(npu_reference):
    """bf16 parameters (and DTensor shards): torch's fused AdamW (op-plugin's _fused_adamw_ on the device)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)  # NpuFusedAdamW takes fp32/fp16 only
    twin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    opt = ops.adamw(model.parameters(), lr=1e-2, device_type="npu")
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups[0]["params"]) == 2
    assert opt.defaults["fused"] is True
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    start = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    for _ in range(3):
        for m, o in ((model, opt), (twin, plain)):
            o.zero_grad()
            m(x).float().square().mean().backward()
            o.step()
    for a, b, a0 in zip(model.parameters(), twin.parameters(), start):
        assert max_diff(a, a0) >= 2e-2 and max_diff(a, b) <= 4e-3  # moved ~3 lr; equal to bf16 rounding
    opt = ops.adamw(torch.nn.Linear(4, 4).parameters(), lr=1e-3, device_type="npu")  # a generator is fine
    assert isinstance(opt, npu_reference.optim.NpuFusedAdamW) and len(opt.param_groups[0]["params"]) == 2


def test_npu_attention_on_cpu_tensors_needs_the_reference(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", None)  # no torch_npu at all
    with pytest.raises(RuntimeError, match="needs tensors on an NPU device"):
        ops.resolve_attn_implementation("npu", "cpu")
    assert ops.resolve_attn_implementation("auto", "npu") == "npu"
    assert ops.resolve_attn_implementation("auto", "cpu") == "sdpa"


def test_torch_npu_is_imported_only_in_device_py():
    """One home for the optional dependency: no other module may import torch_npu."""
    pattern = re.compile(r"^\s*(import torch_npu|from torch_npu|.*import_module\(\s*['\"]torch_npu)", re.M)
    offenders = []
    for root, _dirs, files in os.walk(REPO):
        rel = os.path.relpath(root, REPO)
        if rel.split(os.sep)[0] in (".venv", ".git", "tests", "build", "dist") or "site-packages" in rel:
            continue
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and os.path.relpath(path, REPO) != os.path.join("gpt2_ascend", "device.py"):
                with open(path, encoding="utf-8") as f:
                    if pattern.search(f.read()):
                        offenders.append(os.path.relpath(path, REPO))
    assert offenders == []
    with open(os.path.join(REPO, "gpt2_ascend", "device.py"), encoding="utf-8") as f:
        assert pattern.search(f.read())  # the guard itself is where the import lives
