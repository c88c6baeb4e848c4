"""gpt2_ascend.generation: transformers parity, KV cache numerics, sampling filters, stopping, streaming."""
import os
import warnings

import pytest
import torch

from conftest import counting_backend, hf_model, max_diff, ours_from_hf, tiny_config
from gpt2_ascend.generation import Decoder, generate, generate_text, left_pad

PAD = 511


@pytest.fixture(scope="module")
def models():
    config = tiny_config(initializer_range=0.2)  # larger weights than GPT-2's init: varied, non-repeating output
    hf = hf_model(config, seed=11)
    return ours_from_hf(hf, config), hf


def prompts(lengths=(7, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lengths]


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, pad_token_id=PAD,
                           **kw)


def greedy_reference(model, ids, mask, steps, penalty=1.0):
    """Token by token with a full recompute of every step: no cache involved."""
    ids, mask = ids.clone(), mask.clone()
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[:, -1]
        if penalty != 1.0:
            for row in range(ids.size(0)):
                seen = ids[row][mask[row].bool()].unique()
                vals = logits[row, seen]
                logits[row, seen] = torch.where(vals < 0, vals * penalty, vals / penalty)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("penalty", [1.0, 1.3, 2.0])
def test_greedy_matches_transformers_single_and_left_padded_batch(models, penalty):
    ours, hf = models
    batch = prompts()
    ids, mask = left_pad(batch, PAD)
    kw = dict(max_new_tokens=12, repetition_penalty=penalty, eos_token_id=None)
    expected = hf_generate(hf, ids, mask, **kw)
    got = generate(ours, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(got, expected)
    assert torch.equal(got, greedy_reference(ours, ids, mask, 12, penalty))
    if penalty != 1.0:  # the penalty really changes this output
        assert not torch.equal(got, generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None))
    for row, p in enumerate(batch):  # each prompt alone: the same tokens as inside the padded batch
        alone = torch.tensor([p])
        single = ours.generate(alone, **kw)
        assert torch.equal(single, hf_generate(hf, alone, torch.ones_like(alone), **kw))
        assert torch.equal(single[0, len(p):], got[row, ids.size(1):])


def test_repetition_penalty_is_transformers_on_scores_of_every_sign():
    """Seen tokens' scores below 0 are multiplied by the penalty, the others (0 and (0, 1) included) divided, as
    transformers' processor does; unseen tokens keep theirs."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    from gpt2_ascend.generation import SamplingSettings, process_logits
    scores = torch.tensor([[-2.0, -0.5, 0.0, 0.25, 0.75, 1.0, 3.0, -1.0, 0.5]])
    seen_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6]])
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, seen_ids, True)
    settings = SamplingSettings(5, 0, False, 1.0, 0, 1.0, 1.5)
    theirs = RepetitionPenaltyLogitsProcessor(1.5)(seen_ids, scores.clone())
    assert torch.equal(process_logits(scores, settings, 0, seen=seen), theirs)
    assert theirs[0, 3] == 0.25 / 1.5 and theirs[0, 1] == -0.75 and theirs[0, 8] == 0.5


def test_repetition_penalty_skips_padding_whose_id_the_model_competes_for(models):
    """Left padding with the token the short prompt's greedy continuation starts with as the pad id: padding is not
    part of the sequence, so that token is not penalised for it (with pad id 511, a token the model never picks,
    penalising padding changes nothing). Where a padded prompt really holds the pad id, it is penalised."""
    ours, hf = models
    batch = prompts()
    pad = int(ours.generate(torch.tensor([batch[1]]), max_new_tokens=1, eos_token_id=None)[0, -1])
    assert pad not in batch[1]
    batch[2][1] = pad  # a padded row holding the pad id as one of its tokens
    ids, mask = left_pad(batch, pad)
    kw = dict(max_new_tokens=12, repetition_penalty=1.3, eos_token_id=None, pad_token_id=pad)
    got = generate(ours, ids, attention_mask=mask, **kw)
    with torch.no_grad():
        assert torch.equal(got, hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, **kw))
    assert torch.equal(got, greedy_reference(ours, ids, mask, 12, penalty=1.3))
    for row, p in enumerate(batch):  # each prompt alone, without padding
        assert torch.equal(ours.generate(torch.tensor([p]), **kw)[0, len(p):], got[row, ids.size(1):]), row


def test_generate_turns_dropout_off_and_gives_the_model_back_training():
    """A model in training mode with dropout 0.1 generates transformers' tokens (its model in eval mode), and is
    handed back in training mode."""
    config = tiny_config(initializer_range=0.2, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    hf = hf_model(config, seed=11)
    ours = ours_from_hf(hf, config).train()
    ids, mask = left_pad(prompts(), PAD)
    kw = dict(max_new_tokens=12, eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(got, hf_generate(hf, ids, mask, **kw))
    assert ours.training


def test_eos_stop_padding_and_min_new_tokens_match_transformers(models):
    ours, hf = models
    ids, mask = left_pad(prompts((7, 3, 5)), PAD)
    ids, mask = ids[[0, 2]], mask[[0, 2]]
    T = ids.size(1)
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)[:, T:]
    # an eos that both rows emit, at different steps: one row finishes first, then both
    first = {t: [int((row == t).nonzero()[0]) for row in free] for t in set(free[0].tolist()) & set(free[1].tolist())}
    eos, steps = next((t, s) for t, s in sorted(first.items()) if s[0] != s[1])
    kw = dict(max_new_tokens=10, eos_token_id=eos)
    got = generate(ours, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(got, hf_generate(hf, ids, mask, **kw))
    new = got[:, T:]
    assert new.size(1) == max(steps) + 1  # stopped when the last row emitted eos
    for row, step in enumerate(steps):
        assert int(new[row, step]) == eos
        assert (new[row, step + 1:] == PAD).all()  # padding after a row's eos
        assert torch.equal(new[row, :step], free[row, :step])
    # min_new_tokens forbids eos before it
    got_min = generate(ours, ids, attention_mask=mask, pad_token_id=PAD, min_new_tokens=max(steps) + 2, **kw)
    assert torch.equal(got_min, hf_generate(hf, ids, mask, min_new_tokens=max(steps) + 2, **kw))
    assert got_min.size(1) - T >= max(steps) + 2
    assert not (got_min[:, T:T + max(steps) + 2] == eos).any()


def test_max_new_tokens_and_eos_none(models):
    ours, _ = models
    ids = torch.tensor([prompts((4,))[0]])
    out = generate(ours, ids, max_new_tokens=9, eos_token_id=None)
    assert out.shape == (1, 13)
    first = int(out[0, 4])
    stopped = generate(ours, ids, max_new_tokens=9, eos_token_id=first)
    assert stopped.shape == (1, 5) and int(stopped[0, -1]) == first
    assert generate(ours, ids[0], max_new_tokens=3).shape == (7,)  # 1-D in, 1-D out


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_cached_decode_logits_equal_full_recompute(models, fixed_shape):
    ours, _ = models
    ids, mask = left_pad(prompts((8, 3, 5)), PAD)
    T, steps = ids.size(1), 6
    decoder = Decoder(ours, ids.size(0), T + steps, fixed_shape=fixed_shape)
    g = torch.Generator().manual_seed(1)
    fed = torch.randint(0, 500, (ids.size(0), steps), generator=g)
    with torch.no_grad():
        logits = [decoder.prefill(ids, mask)]
        for i in range(steps - 1):
            logits.append(decoder.step(fed[:, i], T + i))
        full_ids = torch.cat([ids, fed], 1)
        full_mask = torch.cat([mask, torch.ones_like(fed)], 1)
        full = ours(full_ids, attention_mask=full_mask).logits
    for i, step_logits in enumerate(logits):
        assert max_diff(step_logits, full[:, T - 1 + i]) <= 1e-5  # measured 5e-6 (logits up to ~6: init range 0.2)


def test_fixed_shape_and_compile_flag_give_the_same_tokens_on_cpu(models, monkeypatch):
    import gpt2_ascend.generation as generation
    ours, _ = models
    built = []  # the cache mode of each decoder generate() builds

    class Recorded(generation.Decoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.fixed_shape)
    monkeypatch.setattr(generation, "Decoder", Recorded)
    ids, mask = left_pad(prompts(), PAD)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile=True")  # none asked for: no word about it
        base = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
        fixed = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, fixed_shape=True)
    assert torch.equal(base, fixed)
    # a CPU without a C++ compiler: compile=True says so and runs the fixed-shape step uncompiled
    monkeypatch.setattr(generation.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="needs a CUDA device, or a CPU with a C\\+\\+ compiler") as record:
        compiled = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, compile=True)
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=None, compile=True)
    assert torch.equal(base, compiled)
    assert built == [False, True, True, True]  # fixed_shape=True and compile=True each run the fixed-shape cache
    # the warning points at the caller's line, through generate() and model.generate() alike
    assert [w.filename for w in record] == [__file__, __file__]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_graph_decode_equals_eager_on_gpu(models):
    """--compile on CUDA: the decode step compiled with mode='reduce-overhead' (a CUDA graph over the
    fixed-shape cache) gives the eager tokens, for a left-padded batch, on a second call too (graph replay)."""
    from torch._dynamo.utils import counters
    ours = models[0].cuda()
    try:
        ids, mask = left_pad(prompts(), PAD)
        ids, mask = ids.cuda(), mask.cuda()
        base = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
        counters.clear()
        first = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, compile=True)
        second = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, compile=True)
        assert torch.equal(first, base) and torch.equal(second, base)
        assert counters["inductor"]["cudagraph_skips"] == 0  # the step really runs as a CUDA graph
    finally:
        ours._compiled_decoder = None
        ours.cpu()
        torch._dynamo.reset()


def test_sampling_is_reproducible_with_a_seed(models):
    ours, _ = models
    ids, mask = left_pad(prompts(), PAD)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.5, eos_token_id=None)
    a = generate(ours, ids, seed=7, **kw)
    b = generate(ours, ids, seed=7, **kw)
    c = generate(ours, ids, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(0)  # the seed's generator is private: the global RNG does not change the result
    assert torch.equal(generate(ours, ids, seed=7, **kw), a)
    # top_k=0 filters nothing (as top_k=vocab): a sample, not the greedy tokens
    unfiltered = generate(ours, ids, seed=7, top_k=0, **kw)
    assert torch.equal(unfiltered, generate(ours, ids, seed=7, top_k=512, **kw))
    assert not torch.equal(unfiltered, generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None))


def test_sampling_scores_are_transformers_warpers():
    """temperature, then top-k, then top-p, each as transformers' warper computes it (at any temperature, 2.0
    included: no value is skipped as if it were 1)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper
    from gpt2_ascend.generation import SamplingSettings, process_logits
    scores = torch.randn(2, 40, generator=torch.Generator().manual_seed(0)) * 3
    for temperature in (2.0, 0.5):
        for top_k in (0, 5):
            theirs = TemperatureLogitsWarper(temperature)(None, scores.clone())
            if top_k:
                theirs = TopKLogitsWarper(top_k)(None, theirs)
            settings = SamplingSettings(5, 0, True, temperature, top_k, 1.0, 1.0)
            assert torch.equal(process_logits(scores, settings, 0), theirs), (temperature, top_k)


def allowed_tokens(logits, temperature, top_k, top_p):
    """The support of the filtered distribution, computed from scratch (probabilities, not HF's code)."""
    probs = torch.softmax(logits / temperature, -1)
    allowed = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        kth = probs.sort(descending=True).values[top_k - 1]
        allowed &= probs >= kth
    if top_p < 1.0:
        p = torch.where(allowed, probs, torch.zeros_like(probs))
        p = p / p.sum()
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]  # mass of the strictly more likely tokens
        keep = torch.zeros_like(allowed)
        keep[order[before < top_p]] = True  # the smallest prefix that reaches top_p
        allowed &= keep
    return allowed


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_top_p_keeps_exactly_the_smallest_prefix_that_reaches_p(top_p):
    """The nucleus filter's kept set itself, row by row, against the definition in float64 (sampling only sees a
    filter that keeps too many tokens, and a threshold at p instead of 1 - p agrees at p = 0.5). Rows whose
    boundary lies within 1e-5 of p are skipped: there another CPU's last bits may decide."""
    from gpt2_ascend.generation import top_p_filter
    rows = torch.arange(64, dtype=torch.float64)[:, None]
    scores = (3 * torch.sin(0.37 * (rows + 1) * torch.arange(1, 51, dtype=torch.float64))).float()  # no RNG
    kept = torch.isfinite(top_p_filter(scores, top_p))
    probs = torch.softmax(scores.double(), -1)
    checked = 0
    for row in range(scores.size(0)):
        order = probs[row].argsort(descending=True)
        before = probs[row][order].cumsum(0) - probs[row][order]  # mass of the more likely tokens
        if (before - top_p).abs().min() < 1e-5:
            continue
        expected = torch.zeros(50, dtype=torch.bool)
        expected[order[before < top_p]] = True  # the smallest prefix whose mass reaches top_p
        assert torch.equal(kept[row], expected), row
        checked += 1
    assert checked >= 60
    assert 1 < kept.sum(1).float().mean() < 49  # the filter really keeps some and removes some


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.3), (10, 0.5)])
def test_top_k_top_p_never_emit_a_filtered_token(models, top_k, top_p):
    ours, _ = models
    ids = torch.tensor([prompts((5,))[0]])
    sizes = []
    for seed in range(4):
        out = generate(ours, ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p,
                       eos_token_id=None, seed=seed)
        with torch.no_grad():
            logits = ours(out).logits[0]
        for t in range(ids.size(1), out.size(1)):
            allowed = allowed_tokens(logits[t - 1], 0.7, top_k, top_p)
            sizes.append(int(allowed.sum()))
            assert allowed[out[0, t]], f"token {int(out[0, t])} outside the filtered set at step {t}"
    assert max(sizes) < 512  # the filter really removed tokens
    # top_k=1 sampling is greedy
    greedy = generate(ours, ids, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(generate(ours, ids, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=None, seed=3),
                       greedy)


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_receives_prompt_then_exactly_the_new_tokens(models):
    ours, _ = models
    ids = torch.tensor([prompts((5,))[0]])
    streamer = RecordingStreamer()
    out = generate(ours, ids, max_new_tokens=7, eos_token_id=None, streamer=streamer)
    assert torch.equal(streamer.puts[0], ids)
    assert torch.equal(torch.cat([p.reshape(-1) for p in streamer.puts[1:]]), out[0, 5:])
    assert streamer.ended == 1


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    from gpt2_ascend import GPT2LMHeadModel
    return GPT2LMHeadModel(tiny_config(vocab_size=50257, n_embd=32, pad_token_id=50256, eos_token_id=50256,
                                       bos_token_id=50256)).eval()


def test_text_streamer_and_generate_text(text_model, data_dir, capsys):
    from transformers import TextStreamer
    from gpt2_ascend import load_tokenizer
    tok = load_tokenizer()
    texts = ["The meaning of life is", "Hello", ""]
    batched = generate_text(text_model, tok, texts, batch_size=3, max_new_tokens=6, eos_token_id=None)
    singles = [generate_text(text_model, tok, t, max_new_tokens=6, eos_token_id=None) for t in texts]
    assert batched == singles
    ids = torch.tensor([tok(texts[0]).input_ids])
    out = generate(text_model, ids, max_new_tokens=6, eos_token_id=None,
                   streamer=TextStreamer(tok, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tok.decode(out[0, ids.size(1):]).rstrip("\n")
    assert tok.decode(out[0, ids.size(1):]) == singles[0]


def test_peft_wrapped_model_generates_like_the_merged_one(models):
    from gpt2_ascend.lora import apply_lora
    ours, _ = models
    wrapped = apply_lora(ours_from_hf(hf_model(tiny_config(), seed=11), tiny_config()), rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(2)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-trivial adapter
    ids = torch.tensor([prompts((5,))[0]])
    adapted = generate(wrapped, ids, max_new_tokens=8, eos_token_id=None)
    merged = generate(wrapped.merge_and_unload(), ids, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(adapted, merged)
    assert not torch.equal(adapted, generate(ours, ids, max_new_tokens=8, eos_token_id=None))


def test_context_overflow_and_bad_arguments_fail_with_one_line(models):
    ours, _ = models
    ids = torch.randint(0, 500, (1, 60))
    with pytest.raises(ValueError, match="^prompt of 60 tokens plus max_new_tokens=10 exceeds the model's context "
                                         "n_positions=64"):
        generate(ours, ids, max_new_tokens=10)
    with pytest.raises(ValueError, match="^max_new_tokens=64 leaves no room for a prompt in n_positions=64$"):
        generate(ours, ids, max_new_tokens=64, truncate_prompt=True)
    truncated = generate(ours, ids, max_new_tokens=10, truncate_prompt=True, eos_token_id=None)
    assert torch.equal(truncated, generate(ours, ids[:, -54:], max_new_tokens=10, eos_token_id=None))
    small = ids[:, :5]
    for kw, msg in [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(max_new_tokens=0), "max_new_tokens"),
                    (dict(min_new_tokens=30), "min_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
                    (dict(eos_token_id=9999), "eos_token_id")]:
        with pytest.raises(ValueError, match=msg) as err:
            generate(ours, small, **kw)
        assert "\n" not in str(err.value)
    for bad_mask in ([[1, 1, 1, 0, 0]], [[1, 0, 1, 1, 1]], [[0, 1, 0, 1, 1]], [[0, 0, 0, 0, 0]]):  # right, holed, empty
        with pytest.raises(ValueError, match="left-padded"):
            generate(ours, small, attention_mask=torch.tensor(bad_mask))
    assert torch.equal(generate(ours, small[0], attention_mask=torch.ones(5, dtype=torch.long), eos_token_id=None),
                       generate(ours, small[0], eos_token_id=None))  # a 1-D mask with a 1-D prompt
    with pytest.raises(TypeError, match="generate needs a gpt2_ascend GPT2LMHeadModel, got GPT2LMHeadModel"):
        generate(models[1], small)  # transformers' own model: its generate() is transformers
    with pytest.raises(ValueError, match=r"^token ids must be in \[0, 512\), found 1\.\.600$"):  # the prompt's
        generate(ours, torch.tensor([[1, 600]]))  # own check, before any forward (the model's says more)
    with pytest.raises(ValueError, match=r"^token ids must be in \[0, 512\), found 1\.\.512$"):
        generate(ours, torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match=r"^token ids must be in \[0, 512\), found -1\.\.3$"):
        generate(ours, torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"eos_token_id must be a token id in \[0, 512\) or None, got 512"):
        generate(ours, small, eos_token_id=512)
    assert generate(ours, small, max_new_tokens=2, eos_token_id=0, pad_token_id=0).size(1) >= 6  # id 0 is an id
    with pytest.raises(ValueError, match=r"eos_token_id must be a token id in \[0, 512\) or None, got -1"):
        generate(ours, small, eos_token_id=-1)
    with pytest.raises(ValueError, match=r"non-empty \(batch, length\) tensor of token ids, got shape \(2, 0\)"):
        generate(ours, torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"non-empty \(batch, length\) tensor of token ids, got shape \(0, 5\)"):
        generate(ours, torch.zeros(0, 5, dtype=torch.long))
    # a model whose generation config sets no length: transformers' 20 new tokens
    assert ours.generation_config.max_new_tokens is None and ours.generation_config.max_length is None
    assert generate(ours, small, eos_token_id=None).shape == (1, 5 + 20)
    # the longest answer truncation allows: one prompt token kept, n_positions - 1 new ones
    longest = generate(ours, ids, max_new_tokens=63, truncate_prompt=True, eos_token_id=None)
    assert longest.shape == (1, 64) and torch.equal(longest, generate(ours, ids[:, -1:], max_new_tokens=63,
                                                                      eos_token_id=None))


def test_compiled_decode_step_traces_whole_and_is_reused_across_calls(models, monkeypatch):
    """The --compile path's tracing on CPU: dynamo with a counting eager backend in place of inductor (whose C++
    build takes minutes here: test_inductor_decode_on_cpu_gives_transformers_tokens runs it)."""
    import gpt2_ascend.generation as generation
    ours, _ = models
    graphs = []
    torch._dynamo.reset()
    step = torch.compile(generation._forward_last, backend=counting_backend(graphs), dynamic=False)
    monkeypatch.setattr(generation, "compiled_step", lambda *_: step)
    ids, mask = left_pad(prompts(), PAD)
    base = generate(ours, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    first = generate(ours, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, compile=True)
    kept = ours._compiled_decoder[1]
    for t in kept.cache.keys + kept.cache.values:  # what a NaN left by an earlier call in a masked slot would do:
        t.fill_(float("nan"))                      # the kept cache is cleared before it is used again
    second = generate(ours, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, compile=True)
    assert torch.equal(first, base) and torch.equal(second, base)
    assert len(graphs) == 1  # one graph (no graph break), not recompiled for a second call of the same shape
    # the second call reuses the buffers the CUDA graph was recorded on (static addresses)
    assert ours._compiled_decoder[1] is kept
    other = generate(ours, ids[:2], attention_mask=mask[:2], max_new_tokens=6, eos_token_id=None, compile=True)
    assert torch.equal(other, base[:2]) and ours._compiled_decoder[1] is not kept
    del ours._compiled_decoder
    torch._dynamo.reset()


def test_compile_on_cpu_is_inductor_without_cuda_graphs(monkeypatch):
    """compile=True on a CPU with a C++ compiler compiles the step (inductor's default mode: no CUDA graph, so
    no cudagraph step marker), once per device type."""
    import gpt2_ascend.generation as generation
    calls = []
    monkeypatch.setattr(generation, "_COMPILED_STEPS", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    monkeypatch.setattr(generation.shutil, "which", lambda name: "/usr/bin/" + name)
    assert generation.compile_supported(torch.device("cpu"))
    assert generation.compiled_step("cpu") is generation.compiled_step("cpu") is generation._forward_last
    assert calls == [dict(mode=None, dynamic=False)]
    generation.compiled_step("cuda")
    assert calls[1] == dict(mode="reduce-overhead", dynamic=False)


@pytest.mark.skipif(os.environ.get("GPT2_SLOW_TESTS") != "1",
                    reason="inductor's C++ build takes 1-2 minutes on 2 loaded cores: GPT2_SLOW_TESTS=1 runs it")
def test_inductor_decode_on_cpu_gives_transformers_tokens():
    """The real CPU compiled decode (inductor's C++ kernels, the fixed-shape cache): transformers' greedy tokens
    for a left-padded batch, on a second call too (the kept decoder)."""
    from gpt2_ascend.generation import compile_supported
    if not compile_supported(torch.device("cpu")):
        pytest.skip("no C++ compiler for inductor")
    config = tiny_config(n_layer=1, n_embd=32, n_head=2, initializer_range=0.2)
    hf = hf_model(config, seed=3)
    ours = ours_from_hf(hf, config)
    ids, mask = left_pad(prompts((6, 3)), PAD)
    want = hf_generate(hf, ids, mask, max_new_tokens=6)
    for _ in range(2):
        got = generate(ours, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, compile=True)
        assert torch.equal(got, want)
    torch._dynamo.reset()


def test_generate_text_with_a_truncated_prompt_returns_the_new_tokens():
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    from gpt2_ascend.generation import generate_text

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=30, embd_pdrop=0.0,
                        attn_pdrop=0.0, resid_pdrop=0.0, eos_token_id=29, pad_token_id=29, bos_token_id=29)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    long_prompt, short_prompt = "abcdefghijklmnopqrst", "abc"  # 20 tokens > 16 positions
    texts = generate_text(model, Chars(), [long_prompt, short_prompt], max_new_tokens=4, truncate_prompt=True,
                          eos_token_id=None)
    assert [len(t) for t in texts] == [4, 4]
    alone = generate_text(model, Chars(), long_prompt[-12:], max_new_tokens=4, eos_token_id=None)
    assert texts[0] == alone  # the kept prompt is the last 16 - 4 tokens


class Chars:
    """A tokenizer of single characters: ids 0..25 are a..z, any other id decodes to '?'."""

    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [ord(c) - 97 for c in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 97) if i < 26 else "?" for i in ids)


def test_max_length_of_the_generation_config_counts_the_prompt(models):
    """Without max_new_tokens, the generation config's max_length bounds prompt + new tokens, as in transformers: a
    batch of two prompts of 5 tokens with max_length 12 gets 7 new tokens each (the prompt's length, not the batch
    size, is taken off); generate_text takes its batch's padded width off."""
    import copy
    ours, _ = models
    saved = ours.generation_config
    try:
        changed = copy.deepcopy(saved)  # transformers' GenerationConfig, set as transformers users do
        changed.max_length, changed.max_new_tokens = 12, None
        ours.generation_config = changed
        out = generate(ours, torch.tensor(prompts((5, 5))), eos_token_id=None)
        assert out.shape == (2, 12)
        assert generate(ours, torch.tensor(prompts((5, 5))), eos_token_id=None, max_length=9).shape == (2, 9)
        texts = generate_text(ours, Chars(), ["abcde", "ab", "abc"], batch_size=2, eos_token_id=None)
        assert [len(t) for t in texts] == [7, 7, 9]  # batches of widths 5 and 3
    finally:
        ours.generation_config = saved


def test_check_sampling_args_accepts_its_defaults_and_names_the_bound():
    """The CLI's up-front check: its defaults are the valid 'off' values (greedy, no filter, no penalty), so any one
    argument can be given alone; a bad min_new_tokens names the bound it was checked against (max_new_tokens
    decided later: only its own range)."""
    from gpt2_ascend.config import MIN_TEMPERATURE
    from gpt2_ascend.generation import check_sampling_args
    check_sampling_args()
    check_sampling_args(max_new_tokens=1)
    check_sampling_args(temperature=0.0)  # greedy: a temperature is not used
    check_sampling_args(do_sample=True)
    with pytest.raises(ValueError) as err:
        check_sampling_args(min_new_tokens=2.5)  # not an integer: the schema's range names the argument
    assert str(err.value) == ("bad value 2.5 for 'min_new_tokens' in the sampling arguments: expected an integer "
                              "in [0, 16777216]")
    for name in ("min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        with pytest.raises(ValueError, match=f"bad value None for '{name}'"):
            check_sampling_args(**{name: None})  # None is generate()'s 'from the config', not a value here
    check_sampling_args(min_new_tokens=2, max_new_tokens=2)  # the bounds are allowed
    check_sampling_args(do_sample=True, temperature=MIN_TEMPERATURE)
    with pytest.raises(ValueError) as err:
        check_sampling_args(min_new_tokens=3, max_new_tokens=2)
    assert str(err.value) == "min_new_tokens must be an integer in [0, max_new_tokens=2], got 3"


def test_a_setting_is_set_when_it_differs_from_transformers_blank_config(monkeypatch):
    """transformers 4.x stores its defaults in every GenerationConfig (max_length 20), 5.x leaves them None: a
    config sets a value only where it is not None and not the blank config's own (a 4.x blank stands in here)."""
    import types
    import gpt2_ascend.generation as generation
    monkeypatch.setattr(generation, "blank_generation_config", lambda: types.SimpleNamespace(max_length=20))
    config = lambda **kw: types.SimpleNamespace(**kw)  # noqa: E731
    assert not generation.is_set(config(max_length=20), "max_length")  # 4.x's stored default: not set
    assert generation.is_set(config(max_length=30), "max_length")
    assert not generation.is_set(config(max_length=None), "max_length") and not generation.is_set(config(), "top_k")


def test_only_transformers_defaults_and_zero_like_values_leave_a_setting_off():
    """What routes a call to transformers' generate(): a setting counts as off at its default, or when it and its
    default are both 'nothing' (None, False, 0, 0.0, empty); -1, 1 or True ask for something."""
    from gpt2_ascend.generation import is_default
    for name, value in [("min_length", 0), ("min_length", 0.0), ("min_length", None), ("no_repeat_ngram_size", 0),
                        ("bad_words_ids", None), ("bad_words_ids", []), ("output_scores", False), ("num_beams", 1)]:
        assert is_default(name, value), (name, value)
    for name, value in [("min_length", -1), ("min_length", -1.0), ("min_length", 1), ("output_scores", True),
                        ("no_repeat_ngram_size", 1.0), ("bad_words_ids", [[3]]), ("num_beams", 2)]:
        assert not is_default(name, value), (name, value)


@pytest.mark.parametrize("top_p, kept", [(0.5, 2), (0.75, 3), (0.25, 1), (1.0, 4)])
def test_top_p_boundary_is_transformers(top_p, kept):
    """Four equally likely tokens (0.25 each, exact in binary): a token whose ascending cumulative probability equals
    1 - top_p exactly is dropped (transformers' `<=`), so top_p = 0.5 keeps 2 and 0.75 keeps 3. transformers'
    own warper is the oracle."""
    from transformers.generation.logits_process import TopPLogitsWarper
    from gpt2_ascend.generation import top_p_filter
    scores = torch.zeros(1, 4)
    ours = torch.isfinite(top_p_filter(scores, top_p))
    if top_p < 1.0:  # transformers refuses nothing at 1.0 but its warper is not applied there
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, scores.clone()))
        assert torch.equal(ours, theirs)
    assert int(ours.sum()) == kept


def test_a_cpu_compile_that_fails_to_build_falls_back_with_one_warning(models, monkeypatch):
    """A CPU with g++ but without what inductor's build needs (Python headers, a recent compiler): compile=True
    warns once naming the cause, decodes the same tokens uncompiled, and does not try again in this process."""
    import gpt2_ascend.generation as generation
    ours, _ = models

    def failing_step(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(failing_step, RuntimeError(cause), None)
    cause = "fatal error: Python.h: No such file or directory" + " and more" * 40 + "\nthe compiler's next line"

    def no_cuda_graphs():
        raise AssertionError("a CPU step marked a CUDA graph step")
    supported = generation.compile_supported
    monkeypatch.setattr(generation, "_COMPILE_FAILED", set())
    monkeypatch.setattr(generation, "compile_supported", lambda device: "cpu" not in generation._COMPILE_FAILED)
    monkeypatch.setattr(generation, "compiled_step", lambda *_: failing_step)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", no_cuda_graphs)
    ids, mask = left_pad(prompts(), PAD)
    base = generate(ours, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    with pytest.warns(UserWarning, match=r"did not compile on this CPU \(fatal error: Python.h: No such") as record:
        fell_back = generate(ours, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, compile=True)
    assert torch.equal(fell_back, base) and generation._COMPILE_FAILED == {"cpu"}
    assert len(record) == 1 and record[0].filename == __file__  # the caller's line
    assert f"({cause[:200]}); running it uncompiled" in str(record[0].message)  # its first 200 characters
    assert not supported(torch.device("cpu"))  # the next compile=True says so up front
    ours.__dict__.pop("_compiled_decoder", None)


def test_a_compile_failure_off_the_cpu_is_raised(models, monkeypatch):
    """Only a CPU's build failure falls back to the uncompiled step (a missing toolchain there is common); on an
    accelerator it is a real error and reaches the caller (tokens on the meta device stand in for one)."""
    import gpt2_ascend.generation as generation
    ours, _ = models

    def failing_step(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(failing_step, RuntimeError("inductor failed"), None)
    monkeypatch.setattr(generation, "_COMPILE_FAILED", set())
    decoder = generation.Decoder(ours, 1, 8, fixed_shape=True)
    decoder.step_fn = failing_step
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        decoder.step(torch.zeros(1, dtype=torch.long, device="meta"), 0)
    assert generation._COMPILE_FAILED == set()


def test_generate_text_returns_text_without_special_tokens_and_batches_eight_prompts(models, monkeypatch):
    """A row that finishes early is filled with the pad token (a special token, here the eos id): its text is what
    it gets alone, the pad never decoded; prompts go to generate() eight at a time unless batch_size says."""
    import gpt2_ascend.generation as generation
    from gpt2_ascend.generation import generate_text

    class SpecialChars(Chars):
        def decode(self, ids, skip_special_tokens=False):  # transformers' default: special tokens kept
            return "".join("<pad>" if i == PAD else chr(i + 97) if i < 26 else "?" for i in ids
                           if not (skip_special_tokens and i == PAD))
    ours, _ = models
    tok = SpecialChars()
    rows = [generate(ours, torch.tensor(tok(p).input_ids), max_new_tokens=6, eos_token_id=None)[-6:].tolist()
            for p in ("abc", "xyz")]
    eos = rows[0][1]  # the first row stops at its second new token; the second never emits it
    assert eos not in rows[1] and eos != rows[0][0] and PAD not in rows[0] + rows[1]
    texts = generate_text(ours, tok, ["abc", "xyz"], max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD)
    assert texts == [tok.decode(rows[0][:2]), tok.decode(rows[1])]
    batches = []
    real_generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda model, ids, **kw: batches.append(len(ids)) or
                        real_generate(model, ids, **kw))
    generate_text(ours, tok, ["ab"] * 9, max_new_tokens=1)
    assert batches == [8, 1]


def test_generate_text_takes_batches_of_one_and_streams_a_lone_prompt_at_any_batch_size():
    """batch_size=1 is a batch size (each prompt alone gives the batched texts); a streamer with one prompt needs
    no batch_size=1 (only several prompts in one batch would interleave)."""
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    from gpt2_ascend.generation import generate_text

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=30, embd_pdrop=0.0,
                        attn_pdrop=0.0, resid_pdrop=0.0, eos_token_id=29, pad_token_id=29, bos_token_id=29)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    kw = dict(max_new_tokens=4, eos_token_id=None)
    assert generate_text(model, Chars(), ["abc", "de"], batch_size=1, **kw) == \
        generate_text(model, Chars(), ["abc", "de"], batch_size=2, **kw)

    for batch_size in (2, 8):
        with pytest.raises(ValueError, match="a streamer follows one sequence: use batch_size=1"):
            generate_text(model, Chars(), ["abc", "de"], streamer=RecordingStreamer(), batch_size=batch_size, **kw)
    generate_text(model, Chars(), ["abc", "de"], streamer=RecordingStreamer(), batch_size=1, **kw)
    streamed = RecordingStreamer()
    text = generate_text(model, Chars(), ["abc"], streamer=streamed, **kw)  # batch_size left at its default
    assert streamed.puts[0].flatten().tolist() == [0, 1, 2] and len(streamed.puts) == 1 + 4 and streamed.ended == 1
    assert text == generate_text(model, Chars(), ["abc"], **kw)
    # max_decode_length counts the prompt: 8 - 3 (and 3 leaves none); so does transformers' max_length
    assert len(generate_text(model, Chars(), "abc", max_decode_length=8, eos_token_id=None)) == 5
    assert len(generate_text(model, Chars(), "abc", max_length=7, eos_token_id=None)) == 4
    with pytest.raises(ValueError, match="a prompt of 3 tokens leaves no room under max_decode_length=3"):
        generate_text(model, Chars(), "abc", max_decode_length=3)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad!r}"):
            generate_text(model, Chars(), ["abc", "de"], batch_size=bad, **kw)
    # a length from the generation config, and a prompt longer than the context truncated
    model.generation_config.max_new_tokens = 4
    assert len(generate_text(model, Chars(), "abcdefghijklmnopqrst", truncate_prompt=True, eos_token_id=None)) == 4
    model.generation_config.max_new_tokens = None
    model.config.pad_token_id = None  # GPT-2's own config: prompts are padded with the bos/eos id
    assert generate_text(model, Chars(), ["abc", "de"], **kw) == generate_text(model, Chars(), ["abc", "de"],
                                                                               batch_size=1, **kw)
    # an empty prompt starts from the bos token, else from eos
    model.config.bos_token_id = 27
    from_bos = generate(model, torch.tensor([[27]]), **kw)[0, 1:].tolist()
    assert generate_text(model, Chars(), "", **kw) == Chars().decode(from_bos)
    model.config.bos_token_id = None
    from_eos = generate(model, torch.tensor([[29]]), **kw)[0, 1:].tolist()
    assert from_eos != from_bos and generate_text(model, Chars(), "", **kw) == Chars().decode(from_eos)


@pytest.mark.parametrize("interval", [3, 8])
def test_checking_for_the_stop_every_few_steps_gives_the_every_step_output(models, monkeypatch, interval):
    """On an accelerator the stop check (a device sync) runs every few steps and the output is trimmed to the step
    where the last row finished: the same tokens and length as checking every step (CPU's way), here on CPU with the
    interval forced; a NaN model is still refused at its first new token."""
    import gpt2_ascend.generation as generation
    ours, _ = models
    ids, mask = left_pad(prompts(), PAD)
    ids, mask = ids[:1], mask[:1]  # one row: the whole batch finishes when it does
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, ids.size(1) + 4])  # the row ends at its 5th new token (or earlier, if it emits it before)
    every_step = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert every_step.size(1) <= ids.size(1) + 5 < free.size(1)  # it stopped early
    streamed = RecordingStreamer()
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos,
                                streamer=streamed), every_step)
    assert len(streamed.puts) == 1 + (every_step.size(1) - ids.size(1)) and streamed.ended == 1  # prompt, new tokens
    finished = every_step.size(1) - ids.size(1)  # new tokens, the eos included
    last_window = generate(ours, ids, attention_mask=mask, max_new_tokens=finished + 1, eos_token_id=eos)
    monkeypatch.setattr(generation, "stop_check_interval", lambda device, streamer: interval)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos), every_step)
    # the end is a check too: a stop after the last regular check is found there (interval 8: no regular check)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=finished + 1, eos_token_id=eos),
                       last_window)
    broken = type(ours)(ours.config).eval()
    with torch.no_grad():
        broken.transformer.ln_f.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="became NaN/inf by new token 1:"):
        generate(broken, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)


def test_the_stop_check_interval_is_one_on_cpu_and_when_streaming():
    from gpt2_ascend.generation import ACCELERATOR_STOP_CHECK, stop_check_interval
    assert stop_check_interval(torch.device("cpu"), None) == 1
    assert stop_check_interval(torch.device("cpu"), RecordingStreamer()) == 1
    assert stop_check_interval(torch.device("cuda"), RecordingStreamer()) == 1  # no token streamed unchecked
    assert stop_check_interval(torch.device("cuda"), None) == ACCELERATOR_STOP_CHECK > 1
    from gpt2_ascend.generation import compile_supported
    assert compile_supported(torch.device("cuda"))  # CUDA graphs need no host compiler


@pytest.mark.parametrize("interval, nan_from, max_new, reported", [(None, 2, 6, 3), (3, 4, 12, 6), (3, 3, 5, 5)])
def test_nan_logits_are_reported_at_the_first_check_after_them(models, monkeypatch, interval, nan_from, max_new,
                                                               reported):
    """Logits turning NaN at new token `nan_from` (1 = the first after the prompt's) are refused at the first check
    at or after it: every token on CPU; with checks every 3 steps at step 3, 6, ..., or at the end."""
    import gpt2_ascend.generation as generation
    ours, _ = models
    real_step = generation.Decoder.step
    steps = []

    def step(self, tokens, slot):  # the k-th step's logits choose new token k + 1 (0-based: k)
        steps.append(slot)
        logits = real_step(self, tokens, slot)
        return logits.fill_(float("nan")) if len(steps) >= nan_from else logits
    monkeypatch.setattr(generation.Decoder, "step", step)
    if interval is not None:
        monkeypatch.setattr(generation, "stop_check_interval", lambda device, streamer: interval)
    with pytest.raises(ValueError, match=f"became NaN/inf by new token {reported}:"):
        generate(ours, torch.tensor(prompts((5,))), max_new_tokens=max_new, eos_token_id=None)
