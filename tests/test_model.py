"""Cache, classification, attention kernels, init, meta device and config validation."""
import re

import pytest
import torch

from gpt2_ascend import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model, KVCache
from gpt2_ascend.model import build_attention_mask, last_token_index, positions_from_mask
from conftest import hf_model, max_diff, ours_from_hf, tiny_config

TOL = 1e-6  # measured fp32 differences on these tiny shapes: at most 3e-7


def set_attn(model, impl):
    for m in model.modules():
        if hasattr(m, "attn_implementation"):
            m.attn_implementation = impl


@pytest.mark.parametrize("static", [False, True])
def test_incremental_decoding_equals_full_forward(static):
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.static(config, 2, 32) if static else None
        out = model(ids[:, :6], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(6, 20):
            # every other step passes the cache back without use_cache (transformers' loop, whose use_cache
            # defaults to config.use_cache): a cache passed in is returned either way
            kw = dict(use_cache=True) if t % 2 else {}
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, **kw)
            steps.append(out.logits)
    assert out.past_key_values.length == 20
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL
    assert model(ids[:, :3]).past_key_values is None  # no cache asked for, none passed: none returned


def test_every_prefix_sees_only_its_past_and_the_chunked_loss_answers_in_either_form():
    """A prompt of any length (1, 2, 3 ... tokens, no mask) gives the logits of the same positions of a longer
    one: causal at every length, two tokens included. The chunked-loss path (loss_chunk_size, training) returns
    a ModelOutput, or a tuple with return_dict=False, as the logits path does."""
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 6))
    with torch.no_grad():
        full = model(ids).logits
        for length in range(1, 6):
            assert max_diff(model(ids[:, :length]).logits, full[:, :length]) <= TOL
    model.config.loss_chunk_size = 4
    out = model(ids, targets=ids)
    as_tuple = model(ids, targets=ids, return_dict=False)
    assert out.loss is not None and isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss)
    assert not isinstance(model(ids, targets=ids, return_dict=True), tuple)


def test_a_forward_with_labels_compiles_into_one_graph():
    """check_labels reads labels only in eager mode: under torch.compile its data-dependent indexing would
    break the graph (fullgraph=True raises) and sync the device every step."""
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True)(ids, labels=ids).loss
        assert max_diff(compiled, model(ids, labels=ids).loss) <= TOL
    torch._dynamo.reset()


def test_incremental_decoding_with_left_padding_matches_hf():
    config = tiny_config()
    hf = hf_model(config)
    ours = ours_from_hf(hf, config)
    ids = torch.randint(0, config.vocab_size - 1, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    with torch.no_grad():
        out = ours(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        logits = [out.logits]
        for t in range(8, 12):
            out = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
        full = ours(ids, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    assert max_diff(torch.cat(logits, 1)[real], full[real]) <= TOL
    assert max_diff(full[real], ref[real]) <= TOL


def test_fixed_shape_cache_equals_dynamic():
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 10))
    cache = KVCache.static(config, 2, 16, fixed_shape=True)
    slots = torch.zeros(2, 16, dtype=torch.long)
    with torch.no_grad():
        full = model(ids).logits
        for t in range(10):
            cache.positions = torch.tensor([t])
            slots[:, t] = 1
            step = model(ids[:, t:t + 1], attention_mask=slots, past_key_values=cache).logits
            assert max_diff(step[:, 0], full[:, t]) <= TOL


def test_classification_matches_hf_on_padded_batches():
    config = tiny_config(num_labels=3)
    hf = hf_model(config, kind="cls")
    ours = ours_from_hf(hf, config, kind="cls")
    ids = torch.randint(0, config.vocab_size - 1, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 3:] = 0
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
        out_no_mask = ours(ids, labels=labels)  # pad id rule, as HF
    assert out.logits.shape == (4, 3)
    assert max_diff(out.logits, ref.logits) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert max_diff(out_no_mask.logits, ref.logits) <= TOL
    assert ours.score.bias is None


def test_classification_left_padded_batch_matches_hf_and_each_row_alone():
    """Left padding (what batched generation-style tokenization gives): each row pools its last token, at
    positions that start at 0 on its first real token; the same logits as transformers (given those
    positions) and as the row alone, unpadded."""
    config = tiny_config(num_labels=3)
    hf = hf_model(config, kind="cls")
    ours = ours_from_hf(hf, config, kind="cls")
    lengths = [16, 9, 3, 12]
    ids = torch.randint(0, config.vocab_size - 1, (4, 16), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(16)[None] >= 16 - torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, labels=labels)
        ref = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=labels)
        alone = torch.cat([ours(ids[row:row + 1, 16 - n:]).logits for row, n in enumerate(lengths)])
    assert max_diff(out.logits, ref.logits) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert max_diff(out.logits, alone) <= TOL
    assert max_diff(alone[1], alone[2]) > 1e-2  # rows differ: pooling the wrong token would show


@pytest.mark.parametrize("side", ["right", "left"])
def test_classification_pools_the_masks_last_token_whatever_the_padding_id(side):
    """The attention mask decides which token is pooled, not the pad id: a batch padded with another id (a
    tokenizer's own pad token, here 7) and a row whose last real token is the pad id (GPT-2's eos = pad, a sentence
    ending in <|endoftext|>) give each row's logits alone. (HF pools by the pad id only, so it is no oracle here.)"""
    config = tiny_config(num_labels=3)
    ours = ours_from_hf(hf_model(config, kind="cls"), config, kind="cls")
    lengths = torch.tensor([16, 9, 3, 12])
    ids = torch.randint(0, config.vocab_size - 1, (4, 16), generator=torch.Generator().manual_seed(3))
    at = torch.arange(16)[None]
    mask = (at < lengths[:, None]) if side == "right" else (at >= 16 - lengths[:, None])
    ids = ids.masked_fill(~mask, 7)
    last = (at * mask).argmax(-1)
    ids[1, last[1]] = config.pad_token_id
    with torch.no_grad():
        out = ours(ids, attention_mask=mask.long()).logits
        # each row alone, unpadded, its last token's hidden state through the head: pooling by definition
        alone = torch.cat([ours.score(ours.transformer(ids[row:row + 1][:, mask[row]]).last_hidden_state[:, -1])
                           for row in range(4)])
    assert max_diff(out, alone) <= TOL
    assert max_diff(alone[1], alone[2]) > 1e-2  # rows differ: pooling the wrong token would show


def test_pipeline_stages_split_the_layers_contiguously_the_first_taking_the_extra_ones():
    from gpt2_ascend.parallel.pipeline import split_layers
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(48, 5) == [range(0, 10), range(10, 20), range(20, 30), range(30, 39), range(39, 48)]


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2ForSequenceClassification])
def test_pipeline_stages_chained_in_one_process_give_the_whole_models_logits(cls):
    """A pipeline's stages (first, middle, last; parallel/pipeline.py) are the model in its tensors-in,
    tensors-out mode: a stage before the last hands on its hidden states (and the mask, when there is one), the
    last gives logits. Chained by hand they are the whole model (torchrun runs them: test_parallel.py)."""
    from gpt2_ascend.parallel.pipeline import pipeline_stage
    config = tiny_config(n_layer=3, num_labels=3)
    torch.manual_seed(0)
    model = cls(config).eval()
    ids = torch.randint(0, config.vocab_size - 1, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    stages = [pipeline_stage(model, s, 3) for s in range(3)]
    with torch.no_grad():
        for inputs, kw in (((ids, mask), dict(attention_mask=mask)), ((ids,), {})):
            x = inputs
            for stage in stages[:-1]:
                x = stage(*x)
                x = x if isinstance(x, tuple) else (x,)
                assert len(x) == len(inputs) and x[0].shape == (2, 10, config.n_embd)
            assert max_diff(stages[-1](*x), model(ids, **kw).logits) <= TOL
    if cls is GPT2LMHeadModel:  # the tied head of a last stage is its own copy of the embedding (the ranks keep the
        head, embedding = stages[-1].lm_head, model.transformer.wte  # two equal by summing their gradients)
        assert head.weight is not embedding.weight and torch.equal(head.weight, embedding.weight)
        assert head is not model.lm_head and model.lm_head.weight is embedding.weight  # the model stays as it was


def test_eager_and_sdpa_agree_and_dropout_is_off_in_eval():
    config = tiny_config(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        set_attn(model, "eager")
        a = model(ids, attention_mask=mask).logits
        a2 = model(ids, attention_mask=mask).logits
        set_attn(model, "sdpa")
        b = model(ids, attention_mask=mask).logits
    assert torch.equal(a, a2)
    assert max_diff(a, b) <= TOL
    model.train()
    with torch.no_grad():
        assert max_diff(model(ids).logits, model(ids).logits) > 1e-4  # dropout active in train mode


def test_gradient_checkpointing_same_loss_and_grads():
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing  # (transformers' property)
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert max_diff(p.grad, grads[n]) <= 1e-6, n
    # transformers' GPT2Model attribute, which its Trainer and peft read and set
    body = model.transformer
    assert body.gradient_checkpointing is True and body.recompute == "full"
    body.gradient_checkpointing = False
    assert body.gradient_checkpointing is False and body.recompute == "none"


def test_init_and_tied_head():
    config = GPT2Config.from_preset("tiny", n_layer=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.wpe.weight.std().item() - 0.02) < 2e-3
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    proj_std = 0.02 / (2 * config.n_layer) ** 0.5
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - proj_std) < 1e-3
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0.0
    torch.manual_seed(0)  # a bare body is initialised the same way: the LM's body under the same seed (but wte,
    body = GPT2Model(config)  # which the LM's tied head draws again last)
    ours, lms = body.state_dict(), model.transformer.state_dict()
    assert list(ours) == list(lms) and all(torch.equal(ours[k], lms[k]) for k in ours if k != "wte.weight")
    assert abs(body.wte.weight.std().item() - 0.02) < 2e-3
    # transformers' question to its pipelines: only the language model generates
    assert GPT2LMHeadModel.can_generate() and not GPT2Model.can_generate()
    assert not GPT2ForSequenceClassification.can_generate()


def test_meta_device_presets_and_parameter_counts():
    expected = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}
    for name in ("small", "medium", "large", "xl", "13b", "52b"):
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config.from_preset(name))
        assert model.device.type == "meta"
        if name in expected:
            assert model.num_parameters() == expected[name]
    assert model.num_parameters() > 50e9  # 52b


def test_padded_vocab_is_invisible():
    config = tiny_config(vocab_size=500, pad_vocab_size_multiple=64)
    assert config.padded_vocab_size == 512
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    assert model.transformer.wte.weight.shape[0] == 512
    ids = torch.randint(0, 500, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.shape[-1] == 500
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 500), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - ref.item()) < 1e-6
    assert model.num_parameters() == GPT2LMHeadModel(config.replace(pad_vocab_size_multiple=1)).num_parameters()
    untied = config.replace(tie_word_embeddings=False)  # both the embedding and the head carry the padding rows
    assert GPT2LMHeadModel(untied).num_parameters() == \
        GPT2LMHeadModel(untied.replace(pad_vocab_size_multiple=1)).num_parameters()


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_embd=100, n_head=3), "divisible"),
    (dict(activation="relu"), "'activation' in GPT2Config: expected one of gelu_new"),
    (dict(attn_implementation="flash"), "attn_implementation"),
    (dict(n_layer=0), r"'n_layer' in GPT2Config: expected an integer in \[1, "),
    (dict(attn_pdrop=1.5), "attn_pdrop"),
])
def test_bad_config_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        GPT2Config(**kwargs)
    assert "\n" not in str(e.value)


def test_config_presets_and_unknown_keys():
    assert GPT2Config.from_preset("xl").activation == "fast_gelu"
    assert GPT2Config.from_preset("13b", n_positions=1024).n_positions == 1024
    with pytest.raises(ValueError, match="unknown preset"):
        GPT2Config.from_preset("huge")
    with pytest.raises(ValueError, match="unknown GPT2Config key 'n_embed'"):
        GPT2Config.from_dict({"n_embed": 10})


def test_hf_config_mapping_round_trip():
    import transformers
    config = GPT2Config.from_preset("xl")
    hf_dict = config.to_hf_dict()
    assert hf_dict["activation_function"] == "quick_gelu" and hf_dict["n_embd"] == 1600
    hf_cfg = transformers.GPT2Config(**hf_dict)
    assert GPT2Config.from_hf_dict(hf_cfg.to_dict()) == config
    with pytest.raises(ValueError, match="activation_function"):
        GPT2Config.from_hf_dict({**hf_dict, "activation_function": "swish"})
    with pytest.raises(ValueError, match="unknown key 'n_embed' in config.json: did you mean n_embd"):
        GPT2Config.from_hf_dict({**hf_dict, "n_embed": 3})


def test_hf_config_with_transformers_4_generation_defaults_loads():
    """transformers 4.x's GPT2Config.to_dict() carries every legacy generation default; they mean nothing
    for the model and are ignored like the other generation keys."""
    hf_dict = GPT2Config.from_preset("small").to_hf_dict()
    legacy = dict(num_beams=1, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, min_length=0,
                  bad_words_ids=None, no_repeat_ngram_size=0, length_penalty=1.0, typical_p=1.0)
    assert GPT2Config.from_hf_dict({**hf_dict, **legacy}) == GPT2Config.from_preset("small")


def test_classification_from_embeddings_pools_the_last_position_and_return_dict_is_transformers():
    """inputs_embeds without a mask: there is no pad id to look for, so the last position is pooled (transformers
    does the same, with a warning), on a batch whose size differs from its length; return_dict=True gives the
    output object and False its tuple, as transformers' classifier."""
    import warnings
    config = tiny_config(num_labels=3)
    hf = hf_model(config, kind="cls")
    ours = ours_from_hf(hf, config, kind="cls")
    embeds = torch.randn(3, 7, config.n_embd, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "Results may be unexpected" without a pad id to look for
        ref = hf(inputs_embeds=embeds, labels=labels)
        out = ours(inputs_embeds=embeds, labels=labels, return_dict=True)
        as_tuple = ours(inputs_embeds=embeds, labels=labels, return_dict=False)
    assert out.logits.shape == (3, 3)
    assert max_diff(out.logits, ref.logits) <= TOL
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.logits) and torch.equal(as_tuple[0], out.loss)


def test_plain_causal_attention_builds_no_mask_and_a_chunk_after_the_cache_sees_it_all():
    """No mask tensor where SDPA's causal kernel (or none at all) does the work: a prompt without padding, and each
    one-token step after the cache. A chunk of 3 tokens after 5 cached ones gets its causal mask by cache slot."""
    assert build_attention_mask(None, q_len=7, past=0, device="cpu") is None
    assert build_attention_mask(None, q_len=1, past=5, device="cpu") is None
    mask = build_attention_mask(None, q_len=3, past=5, device="cpu")
    assert mask.shape == (1, 1, 3, 8)
    assert mask[0, 0].tolist() == [[k <= 5 + q for k in range(8)] for q in range(3)]


def test_last_token_without_a_mask_or_pad_id_is_the_last_column_and_generation_feeds_unseen_tokens():
    """A model with no pad id pools each row's last column (a batch of 3 rows of 7 tokens: index 6 for each); for a
    generation step transformers' hook passes the whole prompt before the cache holds anything, and only the
    tokens the cache has not seen after."""
    ids = torch.randint(0, 100, (3, 7))
    assert last_token_index(ids, None, None).tolist() == [6, 6, 6]
    model = GPT2LMHeadModel(tiny_config()).eval()
    assert torch.equal(model.prepare_inputs_for_generation(ids)["input_ids"], ids)
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).past_key_values
    assert torch.equal(model.prepare_inputs_for_generation(ids, past_key_values=cache)["input_ids"], ids[:, 4:])
    with torch.no_grad():  # the first step's forward starts the cache the next steps continue
        assert model(**model.prepare_inputs_for_generation(ids)).past_key_values.length == 7


def test_labels_at_num_labels_are_refused_and_embeddings_are_counted_out_as_transformers():
    """A label equal to num_labels is one past the last class: refused in one line. num_parameters(exclude_embeddings)
    leaves out wte and wpe, as transformers' does."""
    config = tiny_config(num_labels=3)
    model = GPT2ForSequenceClassification(config)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), found 0..3"):
        model(torch.zeros(2, 4, dtype=torch.long), labels=torch.tensor([0, 3]))
    hf = hf_model(tiny_config())
    ours = GPT2LMHeadModel(tiny_config())
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    assert ours.num_parameters() == hf.num_parameters()


def test_from_pretrained_refuses_dtype_and_torch_dtype_that_disagree(tmp_path):
    GPT2LMHeadModel(tiny_config()).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="disagree: pass one of them"):
        GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float32, torch_dtype=torch.bfloat16)
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16, torch_dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16


def test_context_overflow_is_clear():
    config = tiny_config(n_positions=16)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match=r"^sequence of 17 tokens is longer than the model's context n_positions=16;"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model(torch.zeros(1, 10, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"^sequence of 17 tokens is longer"):  # 10 cached + 7 new
        model(torch.zeros(1, 7, dtype=torch.long), past_key_values=cache)
    # a preallocated cache shorter than the context: filled exactly, then one position too many
    cache = KVCache.static(config, 1, 9)
    model(torch.zeros(1, 6, dtype=torch.long), past_key_values=cache)
    model(torch.zeros(1, 3, dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match=r"^KV cache holds 9 positions but 10 are needed"):
        model(torch.zeros(1, 1, dtype=torch.long), past_key_values=cache)


@pytest.mark.parametrize("shape", [(2, 5), (5, 64, 1), (2, 5, 63)])
def test_inputs_embeds_of_another_shape_is_one_line(shape):
    model = GPT2LMHeadModel(tiny_config())
    message = rf"^inputs_embeds must have shape \(batch, length, 64\), got {re.escape(str(shape))}$"
    with pytest.raises(ValueError, match=message):
        model(inputs_embeds=torch.zeros(shape))


def test_which_head_pools_one_position_and_a_bare_body_keeps_no_cache():
    """The classifier pools one position (tensor parallel then hands its head the whole sequence), the language
    model scores every position (its head stays sharded over the vocabulary: test_parallel's tp_sp layout fails
    with a mixed Tensor / DTensor product otherwise); a bare GPT2Model returns no cache unless asked, as the LM."""
    assert GPT2ForSequenceClassification.pools_last_token and not GPT2LMHeadModel.pools_last_token
    body = GPT2Model(tiny_config()).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert body(ids).past_key_values is None and body(ids, use_cache=True).past_key_values.length == 4


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_modes_same_loss_and_grads_with_dropout(mode):
    config = tiny_config(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    torch.manual_seed(5)
    ref_loss = model(ids, labels=ids).loss
    ref_loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_recompute(mode)
    torch.manual_seed(5)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert loss.item() == ref_loss.item()
    for n, p in model.named_parameters():
        assert max_diff(p.grad, grads[n]) <= 1e-6, n


@pytest.mark.parametrize("mode, reruns_products", [("none", False), ("full", True), ("selective", False)])
def test_what_the_backward_pass_recomputes(mode, reruns_products):
    """Full recompute runs each block's forward again in the backward pass (its linear layers and attention);
    selective keeps the products and attention (the expensive part, on CPU as on accelerators) and reruns only
    the cheap element-wise ops (GELU here); none reruns nothing. Counted op by op as the backward dispatches."""
    import collections
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    config = tiny_config(n_layer=3)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    model.set_recompute(mode)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    loss = model(ids, labels=ids).loss
    with Count() as backward:
        loss.backward()
    attention = sum(n for op, n in backward.calls.items() if op.startswith("_scaled_dot_product") and
                    not op.endswith("backward"))
    linear = backward.calls["addmm"]  # linear layers' forward (a linear's backward is mm)
    assert (linear > 0, attention) == ((True, 3) if reruns_products else (False, 0))
    assert (backward.calls["gelu"] > 0) == (mode != "none")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputed_blocks_pass_gradients_to_adapters_of_a_frozen_model(mode):
    """LoRA on a frozen model: the first block's input (the embeddings) needs no gradient, yet its adapters get
    theirs under recompute, without transformers' enable_input_require_grads hook (non-reentrant checkpointing;
    the reentrant kind would give them none)."""
    from gpt2_ascend.lora import apply_lora
    torch.manual_seed(0)
    model = apply_lora(GPT2LMHeadModel(tiny_config()), rank=2, alpha=4, dropout=0.0)
    model.get_base_model().set_recompute(mode)
    ids = torch.randint(0, 500, (2, 8))
    model(ids, labels=ids).loss.backward()
    first = {n: p.grad for n, p in model.named_parameters() if ".h.0." in n and "lora_B" in n}  # (A: 0 at B = 0)
    assert first and all(g is not None and g.abs().sum() > 0 for g in first.values())


def test_per_head_qkv_layout_gives_same_output():
    from gpt2_ascend.parallel.tensor_parallel import to_per_head_qkv
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        for block in model.transformer.h:  # a fresh init's biases are zero: the bias's permutation would not show
            block.attn.c_attn.bias.normal_(std=0.5)
        ref = model(ids).logits
        to_per_head_qkv(model)
        assert max_diff(model(ids).logits, ref) <= TOL


def test_vocab_padding_does_not_change_the_initial_weights():
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(tiny_config(vocab_size=500))
    torch.manual_seed(0)
    padded = GPT2LMHeadModel(tiny_config(vocab_size=500, pad_vocab_size_multiple=64))
    for (name, a), (_, b) in zip(plain.state_dict().items(), padded.state_dict().items()):
        assert torch.equal(a, b[: a.size(0)]), name
    assert padded.transformer.wte.weight[500:].abs().max().item() == 0.0


def test_chunked_head_cross_entropy_equals_the_plain_loss_and_gradients():
    config = tiny_config(vocab_size=500, pad_vocab_size_multiple=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 500, (3, 33))  # 96 tokens: more than the hidden width (64), each chunked
    targets = ids[:, 1:].clone()
    targets[1, 5:] = -100  # ignored positions count in neither
    targets[0, 3] = targets[2, 0] = 0  # token 0 is a target like any other (ignored ones are read at 0)
    plain = model(ids[:, :-1], targets=targets)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.loss_chunk_size = 7  # does not divide the 96 tokens: a short last chunk
    fused = model(ids[:, :-1], targets=targets)
    assert fused.logits is None
    fused.loss.backward()
    assert abs(fused.loss.item() - plain.loss.item()) <= 1e-6
    for n, p in model.named_parameters():
        assert max_diff(p.grad, grads[n]) <= 1e-6, n
    with torch.no_grad():  # evaluation keeps the logits
        assert model(ids[:, :-1], targets=targets).logits.shape == (3, 32, 500)


def test_chunked_head_averages_over_the_targets_it_has():
    """One target left: the chunked loss is that token's cross-entropy, as the plain one; none left: 0 with zero
    gradients (the plain path's mean over nothing is NaN; a chunk of padding must not stop a run)."""
    config = tiny_config(vocab_size=500, pad_vocab_size_multiple=64, loss_chunk_size=4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 500, (2, 9))
    targets = torch.full((2, 8), -100)
    targets[1, 6] = 17
    one = model(ids[:, :-1], targets=targets).loss
    with torch.no_grad():
        logits = model.logits(model.transformer(ids[:, :-1]).last_hidden_state)
    assert abs(one.item() - torch.nn.functional.cross_entropy(logits[1, 6:7], targets[1, 6:7]).item()) <= 1e-6
    none = model(ids[:, :-1], targets=torch.full((2, 8), -100)).loss
    none.backward()
    assert none.item() == 0.0 and all(p.grad.abs().max().item() == 0.0 for p in model.parameters())


def test_chunked_head_with_a_frozen_head_skips_its_gradient():
    """LoRA freezes the (tied) head: the chunked loss then computes no weight gradient, and every other
    gradient is the plain path's."""
    config = tiny_config(vocab_size=500, pad_vocab_size_multiple=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    model.lm_head.weight.requires_grad_(False)
    ids = torch.randint(0, 500, (2, 13))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.config.loss_chunk_size = 5
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    assert model.lm_head.weight.grad is None
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert max_diff(p.grad, grads[n]) <= 1e-6, n
