"""The reference torch_npu itself: checked against a direct masked-softmax computation (so a wrong
reference cannot make the model tests pass) and shown to refuse calls that break the documented
contract (so the model tests prove our calls follow it)."""
import math

import pytest
import torch

from npu_reference import installed, npu_reference  # noqa: F401  (fixture)

B, N, D = 2, 2, 16
TOL = 1e-5


def direct_attention(q, k, v, allowed, scale):
    """Attention written row by row: out_i = sum_j softmax_j(scale * q_i.k_j over allowed j) v_j.
    `allowed(b, n, i, j)` is a plain Python predicate, independent of any mask tensor logic."""
    Bq, Nq, Sq, _ = q.shape
    out = torch.zeros(Bq, Nq, Sq, v.size(-1), dtype=torch.float64)
    for b in range(Bq):
        for n in range(Nq):
            for i in range(Sq):
                keys = [j for j in range(k.size(2)) if allowed(b, n, i, j)]
                scores = torch.stack([q[b, n, i].double() @ k[b, n, j].double() * scale for j in keys])
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, n, i] = sum(w * v[b, n, j].double() for w, j in zip(weights, keys))
    return out


def qkv(sq, skv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, sq, D, generator=g), torch.randn(B, N, skv, D, generator=g),
            torch.randn(B, N, skv, D, generator=g))


def compressed():
    return torch.ones(2048, 2048, dtype=torch.bool).triu(1)


def padding_keep(b, j, skv):
    """Row 0 sees every key, row 1 not its first two (left padding)."""
    return not (b == 1 and j < 2)


CASES = {
    # name: (sq, skv, kwargs builder, allowed predicate)
    "no_mask": (5, 5, lambda sq, skv: {}, lambda b, n, i, j, sq, skv: True),
    "leftUpCausal_square": (5, 5, lambda sq, skv: dict(atten_mask=compressed(), sparse_mode=2),
                            lambda b, n, i, j, sq, skv: j <= i),
    "leftUpCausal_rect": (3, 6, lambda sq, skv: dict(atten_mask=compressed(), sparse_mode=2),
                          lambda b, n, i, j, sq, skv: j <= i),
    "rightDownCausal": (3, 6, lambda sq, skv: dict(atten_mask=compressed(), sparse_mode=3),
                        lambda b, n, i, j, sq, skv: j <= i + skv - sq),
    "explicit_SS": (4, 6, lambda sq, skv: dict(atten_mask=torch.ones(sq, skv, dtype=torch.bool).triu(3)),
                    lambda b, n, i, j, sq, skv: j < i + 3),
    "explicit_B1SS": (4, 6, lambda sq, skv: dict(atten_mask=torch.tensor(
        [[[[not padding_keep(b, j, skv) for j in range(skv)] for _ in range(sq)]] for b in range(B)])),
        lambda b, n, i, j, sq, skv: padding_keep(b, j, skv)),
    "explicit_BNSS_uint8": (4, 4, lambda sq, skv: dict(atten_mask=torch.tensor(
        [[[[int(j > i + n) for j in range(skv)] for i in range(sq)] for n in range(N)] for _ in range(B)],
        dtype=torch.uint8)), lambda b, n, i, j, sq, skv: j <= i + n),
    "allMask_mode1": (4, 4, lambda sq, skv: dict(atten_mask=torch.ones(sq, skv, dtype=torch.bool).triu(1),
                                                 sparse_mode=1, next_tockens=-7), lambda b, n, i, j, sq, skv: j <= i),
    "band_window_mode0": (5, 5, lambda sq, skv: dict(atten_mask=torch.zeros(sq, skv, dtype=torch.bool),
                                                     pre_tockens=1, next_tockens=0),
                          lambda b, n, i, j, sq, skv: i - 1 <= j <= i),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_equals_direct_masked_softmax(npu_reference, case):
    sq, skv, kwargs, allowed = CASES[case]
    q, k, v = qkv(sq, skv)
    scale = 1.0 / math.sqrt(D)
    out = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", scale=scale, **kwargs(sq, skv))
    expected = direct_attention(q, k, v, lambda b, n, i, j: allowed(b, n, i, j, sq, skv), scale)
    assert (out[0].double() - expected).abs().max().item() <= TOL


def test_scale_is_used_as_given_and_defaults_to_one(npu_reference):
    q, k, v = qkv(3, 3)
    default = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD")[0]
    expected = direct_attention(q, k, v, lambda *a: True, 1.0)
    assert (default.double() - expected).abs().max().item() <= TOL
    scaled = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", scale=0.25)[0]
    assert (scaled.double() - direct_attention(q, k, v, lambda *a: True, 0.25)).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["BSND", "BSH", "SBH"])
def test_layouts_agree_with_bnsd(npu_reference, layout):
    q, k, v = qkv(4, 6)
    to = {"BSND": lambda t: t.transpose(1, 2).contiguous(),
          "BSH": lambda t: t.transpose(1, 2).reshape(B, t.size(2), N * D),
          "SBH": lambda t: t.transpose(1, 2).reshape(B, t.size(2), N * D).transpose(0, 1).contiguous()}[layout]
    kwargs = dict(atten_mask=compressed(), sparse_mode=3, scale=0.3)
    ref = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", **kwargs)[0]
    out = npu_reference.npu_fusion_attention(to(q), to(k), to(v), N, layout, **kwargs)[0]
    assert out.shape == to(q).shape
    assert (out - to(ref)).abs().max().item() <= TOL


def test_grouped_query_heads_share_keys(npu_reference):
    q = torch.randn(1, 4, 3, D)
    k, v = torch.randn(1, 2, 3, D), torch.randn(1, 2, 3, D)
    out = npu_reference.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.2)[0]
    expected = direct_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), lambda *a: True, 0.2)
    assert (out.double() - expected).abs().max().item() <= TOL


def test_returns_the_documented_seven_outputs(npu_reference):
    q, k, v = qkv(4, 4)
    outs = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", scale=0.5, atten_mask=compressed(), sparse_mode=2)
    assert len(outs) == 7
    attention, softmax_max, softmax_sum, softmax_in, seed, offset, numels = outs
    assert attention.shape == q.shape and attention.dtype == q.dtype
    assert softmax_max.shape == softmax_sum.shape == (B, N, 4, 8) and softmax_max.dtype == torch.float32
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), -torch.inf)
    assert torch.allclose(softmax_max[..., 0], scores.amax(-1), atol=1e-6)
    assert torch.allclose(softmax_sum[..., 0], torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1), atol=1e-5)
    assert softmax_in.numel() == 0
    assert all(isinstance(x, int) for x in (seed, offset, numels)) and numels == 0


def test_dropout_keeps_a_keep_prob_fraction_rescaled(npu_reference):
    skv, keep_prob = 16, 0.75
    q = torch.zeros(4, N, 64, skv)
    k = torch.zeros(4, N, skv, skv)
    v = torch.eye(skv).expand(4, N, skv, skv).contiguous()  # out[..., i, j] = dropped-out weight of key j
    torch.manual_seed(0)
    outs = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", keep_prob=keep_prob)
    weights = outs[0]
    kept = weights != 0
    assert torch.allclose(weights[kept], torch.full_like(weights[kept], 1.0 / (skv * keep_prob)))
    assert abs(kept.float().mean().item() - keep_prob) < 0.02
    assert outs[6] == 4 * N * 64 * skv
    torch.manual_seed(0)
    assert torch.equal(npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", keep_prob=keep_prob)[0], weights)


def test_fully_masked_rows_are_undefined_unless_invalid_row_computation(npu_reference):
    q, k, v = qkv(3, 3)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0] = True  # query 0 may see nothing
    out = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", atten_mask=mask)[0]
    assert out[:, :, 0].isnan().all() and not out[:, :, 1:].isnan().any()
    out = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", atten_mask=mask, inner_precise=2)[0]
    assert (out[:, :, 0] == 0).all()
    expected = direct_attention(q, k, v, lambda b, n, i, j: True, 1.0)
    assert (out[:, :, 1:].double() - expected[:, :, 1:]).abs().max().item() <= TOL


def _call(ref, q, k, v, *args, **kwargs):
    return ref.npu_fusion_attention(q, k, v, *args, **kwargs)


VIOLATIONS = {
    "unknown_layout": (lambda q, k, v: ((N, "BHSD"), {}), ValueError, "input_layout"),
    "lowercase_layout": (lambda q, k, v: ((N, "bnsd"), {}), ValueError, "input_layout"),
    "missing_head_num": (lambda q, k, v: ((), dict(input_layout="BNSD")), TypeError, "head_num"),
    "wrong_head_num": (lambda q, k, v: ((N + 1, "BNSD"), {}), ValueError, "head_num"),
    "float_head_num": (lambda q, k, v: ((2.0, "BNSD"), {}), TypeError, "head_num"),
    "positional_mask": (lambda q, k, v: ((N, "BNSD", None, None, compressed()), {}), TypeError, "positional"),
    "mask_B_S": (lambda q, k, v: ((N, "BNSD"), dict(atten_mask=torch.zeros(B, 4, dtype=torch.bool))),
                 ValueError, "atten_mask shape"),
    "mask_1NSS": (lambda q, k, v: ((N, "BNSD"), dict(atten_mask=torch.zeros(1, N, 4, 4, dtype=torch.bool))),
                  ValueError, "atten_mask shape"),
    "float_mask": (lambda q, k, v: ((N, "BNSD"), dict(atten_mask=torch.zeros(4, 4))), TypeError, "bool"),
    "causal_mode_without_mask": (lambda q, k, v: ((N, "BNSD"), dict(sparse_mode=2)), ValueError, "2048"),
    "right_down_without_mask": (lambda q, k, v: ((N, "BNSD"), dict(sparse_mode=3)), ValueError, "2048"),
    "causal_mode_full_size_mask": (lambda q, k, v: ((N, "BNSD"), dict(
        sparse_mode=3, atten_mask=torch.ones(4, 4, dtype=torch.bool).triu(1))), ValueError, "compressed"),
    "causal_mode_lower_triangle": (lambda q, k, v: ((N, "BNSD"), dict(
        sparse_mode=2, atten_mask=torch.ones(2048, 2048, dtype=torch.bool).tril(-1))), ValueError, "compressed"),
    "keep_prob_zero": (lambda q, k, v: ((N, "BNSD"), dict(keep_prob=0.0)), ValueError, "keep_prob"),
    "padding_mask": (lambda q, k, v: ((N, "BNSD"), dict(padding_mask=torch.zeros(4, 4, dtype=torch.bool))),
                     ValueError, "padding_mask"),
    "inner_precise_3": (lambda q, k, v: ((N, "BNSD"), dict(inner_precise=3)), ValueError, "inner_precise"),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_rejects_calls_that_break_the_contract(npu_reference, name):
    build, error, match = VIOLATIONS[name]
    q, k, v = qkv(4, 4)
    args, kwargs = build(q, k, v)
    with pytest.raises(error, match=match):
        _call(npu_reference, q, k, v, *args, **kwargs)


def test_rejects_bad_tensors(npu_reference):
    q, k, v = qkv(4, 4)
    with pytest.raises(TypeError, match="one dtype"):
        npu_reference.npu_fusion_attention(q, k.half(), v.half(), N, "BNSD")
    with pytest.raises(TypeError, match="float64"):
        npu_reference.npu_fusion_attention(q.double(), k.double(), v.double(), N, "BNSD")
    with pytest.raises(ValueError, match="key and value shapes"):
        npu_reference.npu_fusion_attention(q, k, v[:, :, :3], N, "BNSD")
    with pytest.raises(ValueError, match="dims"):
        npu_reference.npu_fusion_attention(q, k, v, N, "BSH")


def test_gradients_flow_through_the_reference(npu_reference):
    q, k, v = (t.requires_grad_() for t in qkv(4, 4))
    out = npu_reference.npu_fusion_attention(q, k, v, N, "BNSD", scale=0.25, atten_mask=compressed(), sparse_mode=2)[0]
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=0.25)
    ref.square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert (a.grad - b.grad).abs().max().item() <= TOL


def test_fast_gelu_is_the_documented_a2_formula(npu_reference):
    x = torch.linspace(-6, 6, 241, dtype=torch.float64).float()
    documented = x / (1 + torch.exp(-1.702 * x))
    assert (npu_reference.npu_fast_gelu(x) - documented).abs().max().item() <= 1e-6
    assert (npu_reference.fast_gelu(x) - documented).abs().max().item() <= 1e-6
    with pytest.raises(TypeError, match="float64"):
        npu_reference.npu_fast_gelu(x.double())
    npu_reference.npu_fast_gelu(x.bfloat16())  # float16, float32 and bfloat16 on A2
    with pytest.raises(TypeError, match="bfloat16 not supported: documented float16, float32"):
        npu_reference.fast_gelu(x.bfloat16())


# The releases around op-plugin 7.3.0, which gave npu_fast_gelu its derivative (tag -> version.txt ->
# op-plugin submodule -> derivatives.yaml): True = a backward is registered.
NPU_FAST_GELU_BACKWARD = {"2.6.0.post3": False, "2.6.0.post4": False, "2.6.0.post5": True, "2.7.1": False,
                          "2.7.1.post1": False, "2.7.1.post2": True, "2.8.0": False, "2.8.0.post1": False,
                          "2.8.0.post2": True, "2.9.0": True, "2.10.0.post2": True}


def fast_gelu_derivative(x):
    s = torch.sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1 - s)


@pytest.mark.parametrize("version", sorted(NPU_FAST_GELU_BACKWARD))
def test_npu_fast_gelu_backward_exists_from_op_plugin_7_3_0(npu_reference, version, recwarn):
    """Before 7.3.0 autograd's fallback warns and passes nothing back; fast_gelu always has its backward."""
    from gpt2_ascend import device as dev
    npu_reference.set_version(version)
    x = torch.linspace(-4, 4, 9, requires_grad=True)
    npu_reference.npu_fast_gelu(x).sum().backward()
    if NPU_FAST_GELU_BACKWARD[version]:
        assert (x.grad - fast_gelu_derivative(x.detach())).abs().max().item() <= 1e-6
    else:
        assert x.grad is None
        assert any("npu::npu_fast_gelu: an autograd kernel was not registered" in str(w.message) for w in recwarn)
    x.grad = None
    npu_reference.fast_gelu(x).sum().backward()
    assert (x.grad - fast_gelu_derivative(x.detach())).abs().max().item() <= 1e-6
    # what the library asks the dispatcher, as it would the real torch_npu
    assert dev.npu_op_has_backward("npu_fast_gelu") is NPU_FAST_GELU_BACKWARD[version]
    assert dev.npu_op_has_backward("fast_gelu") is True
    assert dev.npu_op_has_backward("npu_no_such_op") is False


def test_removing_the_reference_undoes_what_its_import_did_to_torch():
    from torch.distributed.fsdp import sharded_grad_scaler
    torch_class = sharded_grad_scaler.ShardedGradScaler
    with installed() as module:
        assert sharded_grad_scaler.ShardedGradScaler is not torch_class
        assert module.fast_gelu(torch.ones(1)).item() > 0
    assert sharded_grad_scaler.ShardedGradScaler is torch_class
    with pytest.raises(AttributeError):
        torch.ops.npu.fast_gelu  # the npu:: operators are gone with it


def test_version_switch_refuses_what_is_not_a_release(npu_reference):
    with pytest.raises(ValueError, match="not a torch_npu release version"):
        npu_reference.set_version("2.7")


@pytest.mark.parametrize("version, present", [("2.5.1.post1", False), ("2.6.0", True), ("2.7.1", True)])
def test_inductor_package_ships_from_2_6_0(npu_reference, version, present):
    import importlib
    npu_reference.set_version(version)
    if present:
        importlib.import_module("torch_npu._inductor")
    else:
        with pytest.raises(ImportError, match="torch_npu._inductor"):
            importlib.import_module("torch_npu._inductor")


@pytest.mark.parametrize("version, takes_device", [("2.7.1.post6", False), ("2.10.0.post2", False),
                                                   ("2.7.1.post8", True), ("2.10.0.post4", True)])
def test_sharded_grad_scaler_signature_changed_in_26_1_0(npu_reference, version, takes_device):
    """torch_npu also puts its class under torch's name, which then stops taking torch's arguments."""
    from torch.distributed.fsdp import sharded_grad_scaler
    npu_reference.set_version(version)
    cls = npu_reference.npu.amp.sharded_grad_scaler._ShardedGradScaler
    assert sharded_grad_scaler.ShardedGradScaler is cls
    assert cls(init_scale=8.0)._init_scale == 8.0
    if takes_device:
        assert cls("npu", init_scale=8.0)._init_scale == 8.0
    else:
        with pytest.raises(TypeError, match="multiple values for argument 'init_scale'"):
            cls("npu", init_scale=8.0)  # torch's ShardedGradScaler("npu", ...) call


# ---------------------------------------------------------------------------------------------
# NpuFusedAdamW
# ---------------------------------------------------------------------------------------------
def _two_group_params(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return model, [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _train(model, opt, steps=3):
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()


def test_fused_adamw_equals_torch_adamw(npu_reference):
    model_a, groups_a = _two_group_params()
    model_b, groups_b = _two_group_params()
    _train(model_a, npu_reference.optim.NpuFusedAdamW(groups_a, lr=0.01, betas=(0.9, 0.95), eps=1e-8))
    _train(model_b, torch.optim.AdamW(groups_b, lr=0.01, betas=(0.9, 0.95), eps=1e-8))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert (a - b).abs().max().item() <= 1e-7


def test_fused_adamw_enforces_its_rules(npu_reference):
    model, groups = _two_group_params()
    opt = npu_reference.optim.NpuFusedAdamW(groups, lr=0.01)
    with pytest.raises(ValueError, match="set_to_none"):
        opt.zero_grad(set_to_none=True)
    _train(model, opt, steps=1)
    model.zero_grad()  # torch's default sets grads to None: the fused update would skip them
    model(torch.randn(5, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="set to None"):
        opt.step()

    model, groups = _two_group_params()
    opt = npu_reference.optim.NpuFusedAdamW(groups, lr=0.01)
    model[0].weight.data = model[0].weight.data.clone()  # reallocated after the optimizer was built
    model(torch.randn(5, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="reallocated"):
        opt.step()

    model, groups = _two_group_params()
    model.to(torch.bfloat16)
    opt = npu_reference.optim.NpuFusedAdamW(groups, lr=0.01)
    model(torch.randn(5, 4, dtype=torch.bfloat16)).sum().backward()
    with pytest.raises(TypeError, match="float32 or float16"):
        opt.step()
