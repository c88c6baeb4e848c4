"""Numerical parity with transformers' GPT-2 on random weights (fp32, CPU).

Tolerances are set from measured fp32 differences (2.4e-7 on the tiny shapes, 2.2e-6 on the 12-layer one)
so that a near miss fails clearly: exact gelu in place of gelu_new is off by 1.3e-5 on the tiny shapes and
8e-4 on the small one; an attention scale off by 10% by 5e-4. Losses (~6) are compared relative to their size.
"""
import pytest
import torch

from gpt2_ascend import GPT2Config
from gpt2_ascend.model import positions_from_mask
from conftest import hf_model, max_diff, ours_from_hf, tiny_config

TINY_TOL, SMALL_TOL = 1e-6, 1e-5


def shapes():
    yield "tiny-gelu_new", tiny_config(activation="gelu_new"), TINY_TOL
    yield "tiny-fast_gelu", tiny_config(activation="fast_gelu"), TINY_TOL
    yield "tiny-gelu", tiny_config(activation="gelu"), TINY_TOL
    small = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, n_positions=64)
    yield "small-gelu_new", GPT2Config.from_preset("small", **small), SMALL_TOL
    yield "small-fast_gelu", GPT2Config.from_preset("small", activation="fast_gelu", **small), SMALL_TOL


@pytest.fixture(scope="module", params=list(shapes()), ids=lambda p: p[0])
def pair(request):
    _, config, tol = request.param
    hf = hf_model(config)
    return config, hf, ours_from_hf(hf, config), tol


def same_loss(a, b, tol):
    return abs(a.item() - b.item()) <= tol * max(1.0, abs(b.item()))


def random_batch(config, B=3, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size - 1, (B, T), generator=g)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_match_hf(pair, attn):
    config, hf, ours, tol = pair
    for m in ours.modules():
        if hasattr(m, "attn_implementation"):
            m.attn_implementation = attn
    ids = random_batch(config)
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = ours(ids, labels=ids)
    assert max_diff(out.logits, ref.logits) <= tol
    assert same_loss(out.loss, ref.loss, tol)


def test_right_padding(pair):
    config, hf, ours, tol = pair
    ids = random_batch(config)
    mask = torch.ones_like(ids)
    mask[0, 17:] = 0
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert max_diff(out.logits[real], ref.logits[real]) <= tol
    assert same_loss(out.loss, ref.loss, tol)


def test_left_padding_positions_follow_mask(pair):
    config, hf, ours, tol = pair
    ids = random_batch(config)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    pos = positions_from_mask(mask)
    assert pos[0, 7].item() == 0 and pos[2, 0].item() == 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos)
        out = ours(ids, attention_mask=mask)  # position ids derived from the mask, as HF's generate does
    real = mask.bool()
    assert torch.isfinite(out.logits).all()
    assert max_diff(out.logits[real], ref.logits[real]) <= tol
    # a left-padded row equals the same tokens without padding
    with torch.no_grad():
        alone = ours(ids[:1, 7:]).logits
    assert max_diff(out.logits[0, 7:], alone[0]) <= tol


def test_explicit_position_ids(pair):
    config, hf, ours, tol = pair
    ids = random_batch(config, B=2, T=10)
    pos = torch.arange(5, 15)[None].expand(2, -1)
    with torch.no_grad():
        assert max_diff(ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits) <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_logits_match_hf_on_gpu():
    """The same parity on CUDA in fp32 (TF32 off, as by default): both sides pick the GPU's SDPA kernels."""
    config = tiny_config()
    hf = hf_model(config, attn="sdpa")
    ours = ours_from_hf(hf, config).cuda()
    hf.cuda()
    ids = random_batch(config).cuda()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row as well
    assert not torch.backends.cuda.matmul.allow_tf32
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        out = ours(ids, attention_mask=mask).logits
    assert max_diff(out[mask.bool()], ref[mask.bool()]) <= 1e-5  # GPU kernels: not measured yet, kept loose
