"""HF habits on our model, each done the way an HF user does it and compared with transformers' GPT-2 holding the same
weights: transformers.Trainer (language model and classifier), pipeline("text-generation", model=<our object>),
generate() with transformers' options (token for token, score for score), from_pretrained's loading options (peak
memory measured), save_pretrained(safe_serialization=False), and the exported generation_config.json (what
transformers writes; no "Both max_new_tokens and max_length" warning). transformers 4.45's side of the same habits is
in tests/compat/hf_round_trip.py."""
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import HANG_GUARD_S, REPO, hf_model, max_diff, ours_from_hf, tiny_config
from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.config import GenerationConfig

# Two fp32 implementations of the same arithmetic on the same machine differ by ~1e-6 (measured 1e-6 here in scores,
# logits and Trainer losses alike); 1e-4 leaves a margin for other CPUs' kernels, far below what a wrong processor,
# a missing token or a wrong loss normalisation changes (0.05 and more).
TOL = 1e-4
PROMPT = "The city of"
# A vocabulary of GPT-2's first 2048 tokens: the prompts' tokens are among them, and the logits are 25x smaller than
# GPT-2's 50257 (transformers' processors sort and scan them at every step: the tests' main cost)
VOCAB = 2048
PAD = VOCAB - 1


@pytest.fixture(scope="module")
def pair():
    """transformers' GPT-2 and ours with the same random weights, over the first VOCAB tokens of GPT-2's tokenizer
    (the pipeline's prompts are among them, and stop strings decode what comes out)."""
    config = tiny_config(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=PAD, bos_token_id=PAD)
    hf = hf_model(config)
    return hf, ours_from_hf(hf, config)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, PAD, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 left-padded
    return ids.masked_fill(mask == 0, PAD), mask


# ---------------------------------------------------------------------------------------------
# generate(): transformers' options, transformers' meaning
# ---------------------------------------------------------------------------------------------
def processors_and_criteria():
    """A custom logits processor (forbids a token) and stopping criterion (after 3 new tokens), as users write them."""
    import transformers

    class Forbid(transformers.LogitsProcessor):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([self.token]), -float("inf"))

    class StopAfter(transformers.StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.size(0),), input_ids.size(1) >= self.length, dtype=torch.bool)

    return Forbid, StopAfter


GENERATE_OPTIONS = {
    "max_length": dict(max_length=11),
    "num_beams=1": dict(max_new_tokens=6, num_beams=1),
    "num_beams=3": dict(max_new_tokens=6, num_beams=3),
    "num_return_sequences (beams)": dict(max_new_tokens=6, num_beams=3, num_return_sequences=2),
    "num_return_sequences (sampling)": dict(max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=2),
    "use_cache=False": dict(max_new_tokens=6, use_cache=False),
    "no_repeat_ngram_size": dict(max_new_tokens=8, no_repeat_ngram_size=1, repetition_penalty=1.0),
    "typical_p": dict(max_new_tokens=6, do_sample=True, typical_p=0.5),
    "min_p": dict(max_new_tokens=6, do_sample=True, min_p=0.05),
    "output_scores": dict(max_new_tokens=6, output_scores=True, output_logits=True, return_dict_in_generate=True),
    "output_scores (beams)": dict(max_new_tokens=6, num_beams=2, output_scores=True, return_dict_in_generate=True),
    "output_scores (sampling)": dict(max_new_tokens=6, do_sample=True, temperature=0.7, output_scores=True,
                                     return_dict_in_generate=True),
}


def generate_both(hf, ours, ids, mask, seed=0, **options):
    """transformers' generate() and ours on the same prompts (sampling seeded alike: transformers draws from the
    global generator, ours from the seed)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, **options)
    return theirs, ours.generate(ids, attention_mask=mask, seed=seed, **options)


def assert_same_generation(theirs, mine):
    if isinstance(theirs, torch.Tensor):
        assert isinstance(mine, torch.Tensor) and torch.equal(mine, theirs)
        return
    assert type(mine).__name__ == type(theirs).__name__  # GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput
    assert torch.equal(mine.sequences, theirs.sequences)
    for name in ("scores", "logits"):
        if getattr(theirs, name) is not None:
            assert len(getattr(mine, name)) == len(getattr(theirs, name))
            for a, b in zip(getattr(mine, name), getattr(theirs, name)):
                finite = torch.isfinite(b)
                assert torch.equal(torch.isfinite(a), finite) and max_diff(a[finite], b[finite]) <= TOL, name
    if getattr(theirs, "sequences_scores", None) is not None:
        assert max_diff(mine.sequences_scores, theirs.sequences_scores) <= TOL


@pytest.mark.parametrize("case", list(GENERATE_OPTIONS))
def test_generate_options_match_transformers(pair, prompts, case):
    hf, ours = pair
    theirs, mine = generate_both(hf, ours, *prompts, **GENERATE_OPTIONS[case])
    assert_same_generation(theirs, mine)
    sequences = theirs if isinstance(theirs, torch.Tensor) else theirs.sequences
    greedy = ours.generate(prompts[0], attention_mask=prompts[1], max_new_tokens=sequences.size(1) - 7,
                           do_sample=False)
    if case not in ("max_length", "num_beams=1", "use_cache=False", "output_scores"):  # (these are greedy)
        assert not torch.equal(sequences[:greedy.size(0)], greedy)  # the option changed the output


def test_generate_takes_processors_criteria_stop_strings_and_generation_config(pair, prompts, data_dir):
    import transformers
    from gpt2_ascend import load_tokenizer
    hf, ours = pair
    ids, mask = prompts
    Forbid, StopAfter = processors_and_criteria()
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    # a logits processor that forbids greedy's first choice of row 0
    theirs, mine = generate_both(hf, ours, ids, mask, max_new_tokens=6,
                                 logits_processor=transformers.LogitsProcessorList([Forbid(int(greedy[0, 7]))]))
    assert_same_generation(theirs, mine)
    assert int(mine[0, 7]) != int(greedy[0, 7])
    # bad words: greedy's first choice of row 0, and a two-token sequence of row 1
    theirs, mine = generate_both(hf, ours, ids, mask, max_new_tokens=6,
                                 bad_words_ids=[[int(greedy[0, 7])], greedy[1, 7:9].tolist()])
    assert_same_generation(theirs, mine)
    assert int(mine[0, 7]) != int(greedy[0, 7])
    # a stopping criterion: after 3 new tokens
    theirs, mine = generate_both(hf, ours, ids, mask, max_new_tokens=6,
                                 stopping_criteria=transformers.StoppingCriteriaList([StopAfter(10)]))
    assert_same_generation(theirs, mine)
    assert mine.size(1) == 10
    # stop strings: the text of greedy's last new token of row 0; generation stops where that text first ends
    tok = load_tokenizer()
    stop = tok.decode(greedy[0, -1:])
    first = next(n for n in range(8, greedy.size(1) + 1) if tok.decode(greedy[0, 7:n]).endswith(stop))
    theirs, mine = generate_both(hf, ours, ids[:1], mask[:1], max_new_tokens=6, stop_strings=[stop], tokenizer=tok)
    assert_same_generation(theirs, mine)
    assert mine.size(1) == first < greedy.size(1)
    # a generation_config object (here beam search), and kwargs over it
    config = transformers.GenerationConfig(max_new_tokens=5, num_beams=2, bos_token_id=PAD, eos_token_id=PAD,
                                           pad_token_id=PAD)
    assert_same_generation(*generate_both(hf, ours, ids, mask, generation_config=config))
    assert_same_generation(*generate_both(hf, ours, ids, mask, generation_config=config, num_beams=3))
    # HF's way of passing the prompt (a dict of tensors as keywords), and a typo named as transformers names it
    assert torch.equal(ours.generate(**dict(input_ids=ids, attention_mask=mask), max_new_tokens=6, do_sample=False),
                       greedy)
    with pytest.raises(ValueError, match="max_new_token"):
        ours.generate(ids, attention_mask=mask, max_new_token=6)


def test_the_fast_decoder_serves_greedy_and_sampling_and_transformers_the_rest(pair, prompts, monkeypatch):
    """Chosen automatically: the project's static-cache decoder for what it implements (whatever the arguments'
    spelling), transformers' generation code for the rest; the model's generation_config.json counts too."""
    import transformers
    from gpt2_ascend import generation, hf_generation
    hf, ours = pair
    ids, mask = prompts
    calls = []
    real_decoder, real_transformers = generation.Decoder, hf_generation.transformers_generate
    monkeypatch.setattr(generation, "Decoder", lambda *a, **k: calls.append("ours") or real_decoder(*a, **k))
    monkeypatch.setattr(hf_generation, "transformers_generate",
                        lambda *a, **k: calls.append("transformers") or real_transformers(*a, **k))
    for options, path in ((dict(max_new_tokens=4), "ours"), (dict(max_length=10, do_sample=True, top_p=0.9), "ours"),
                          (dict(max_new_tokens=4, num_beams=1, use_cache=True, output_scores=False), "ours"),
                          (dict(max_new_tokens=4, logits_processor=transformers.LogitsProcessorList()), "ours"),
                          (dict(max_new_tokens=4, num_beams=2), "transformers"),
                          (dict(max_new_tokens=4, return_dict_in_generate=True), "transformers")):
        calls.clear()
        ours.generate(ids, attention_mask=mask, **options)
        assert calls == [path], options
    saved = ours.generation_config
    try:
        ours.generation_config = GenerationConfig.from_model_config(ours.config, extra=dict(num_beams=2))
        calls.clear()
        beams = ours.generate(ids, attention_mask=mask, max_new_tokens=4)
        assert calls == ["transformers"]
        with torch.no_grad():
            assert torch.equal(beams, hf.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2))
    finally:
        ours.generation_config = saved


def test_generate_keeps_its_own_options_on_transformers_path(pair, prompts):
    """seed (reproducible without touching the caller's generator), truncate_prompt and a 1-D prompt work with
    transformers' options too; the caller's random state is left as it was."""
    hf, ours = pair
    ids, mask = prompts
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, num_return_sequences=2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True,
                                        num_return_sequences=2, seed=7))
    # the fast path samples the same tokens from the same seed
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, seed=7),
                       ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, seed=7, use_cache=False))
    one = ours.generate(ids[0], max_new_tokens=4, num_beams=2)
    with torch.no_grad():
        assert torch.equal(one, hf.generate(ids[:1], max_new_tokens=4, num_beams=2)[0])
    long = torch.randint(0, PAD, (1, 62), generator=torch.Generator().manual_seed(1))  # context: 64
    kept = ours.generate(long, max_new_tokens=4, num_beams=2, truncate_prompt=True)
    with torch.no_grad():
        assert torch.equal(kept, hf.generate(long[:, -60:], max_new_tokens=4, num_beams=2))
    # the room for new tokens read from the call's own generation config; compile says it does not apply here,
    # at the caller's line
    import transformers
    config = transformers.GenerationConfig(max_new_tokens=4, num_beams=2, pad_token_id=PAD)
    with pytest.warns(UserWarning, match="runs transformers' generation code, uncompiled") as record:
        assert torch.equal(kept, ours.generate(long, generation_config=config, truncate_prompt=True, compile=True))
    assert [w.filename for w in record] == [__file__]


def test_what_the_generation_config_holds_picks_the_decoder(pair, prompts, monkeypatch):
    """transformers' bookkeeping in a generation config (its version, _from_model_config) asks for nothing: the
    decoder here runs (fixed_shape applies: no word about transformers' path); several eos ids are transformers'
    (the output is transformers' own); a 1-D prompt with several sequences gives them all."""
    import copy
    hf, ours = pair
    ids, mask = prompts
    two = ours.generate(ids[1], max_new_tokens=4, do_sample=True, num_return_sequences=2, seed=3)
    assert two.shape == (2, ids.size(1) + 4)
    # an option after max_length is still read (beam search here)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=ids.size(1) + 4, num_beams=2),
                           hf.generate(ids, attention_mask=mask, max_length=ids.size(1) + 4, num_beams=2))
    config = copy.deepcopy(ours.generation_config)
    monkeypatch.setattr(ours, "generation_config", config)
    config._from_model_config, config.transformers_version = True, "4.45.0"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile / fixed_shape")
        ours.generate(ids, attention_mask=mask, max_new_tokens=3, fixed_shape=True)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    config.eos_token_id = [int(free[0, ids.size(1) + 2]), int(free[1, ids.size(1) + 4])]
    hf_config = copy.deepcopy(hf.generation_config)
    hf_config.eos_token_id = config.eos_token_id
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, generation_config=hf_config)
    assert theirs.shape != free.shape  # it stopped early
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD), theirs)


def test_eos_token_id_is_kept_on_transformers_path(pair, prompts, monkeypatch):
    """A call that runs transformers' generate() (beam search here) stops at the eos id it is given, as transformers
    does, and eos_token_id=None never stops, whatever the generation config says."""
    import copy
    hf, ours = pair
    ids, mask = prompts
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=2)
    free = ours.generate(ids, eos_token_id=None, **kw)
    eos = int(free[0, ids.size(1) + 2])  # the first row's third new token
    with torch.no_grad():
        theirs = hf.generate(ids, eos_token_id=eos, pad_token_id=PAD, **kw)
    assert theirs.shape != free.shape or not torch.equal(theirs, free)  # it stops there
    assert torch.equal(ours.generate(ids, eos_token_id=eos, pad_token_id=PAD, **kw), theirs)
    monkeypatch.setattr(ours, "generation_config", copy.deepcopy(ours.generation_config))
    ours.generation_config.eos_token_id = eos
    assert torch.equal(ours.generate(ids, eos_token_id=None, **kw), free)


def test_a_prompt_filling_the_context_gets_its_one_token_on_transformers_path(pair):
    """transformers' generate() needs no position past the prompt for one new token: a prompt of n_positions tokens
    gets it, as from transformers' own model (more would pass the context: the model says so)."""
    hf, ours = pair
    full = torch.randint(0, PAD, (1, ours.config.n_positions), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours.generate(full, max_new_tokens=1, num_beams=2),
                           hf.generate(full, max_new_tokens=1, num_beams=2))
    longer = torch.cat([full, full[:, :1]], dim=1)  # the prompt alone past the context: our one line
    with pytest.raises(ValueError, match=f"^prompt of {longer.size(1)} tokens plus max_new_tokens=0 exceeds"):
        ours.generate(longer, max_new_tokens=1, num_beams=2)


# ---------------------------------------------------------------------------------------------
# pipeline("text-generation", model=<our model object>)
# ---------------------------------------------------------------------------------------------
def test_pipeline_takes_our_model_object(pair, data_dir):
    import transformers
    from gpt2_ascend import load_tokenizer
    hf, ours = pair
    tok = load_tokenizer()
    theirs = transformers.pipeline("text-generation", model=hf, tokenizer=tok, device="cpu")
    mine = transformers.pipeline("text-generation", model=ours, tokenizer=tok, device="cpu")
    assert mine.model is ours
    # sampling (the project's decoder; the pipeline's default is do_sample=True) and beam sampling (transformers')
    for kw in (dict(top_k=20, max_new_tokens=8), dict(num_beams=2, max_new_tokens=6, num_return_sequences=2)):
        outputs = []
        for pipe in (theirs, mine):
            torch.manual_seed(0)
            outputs.append(pipe([PROMPT, "It was the"], **kw))
        assert outputs[0] == outputs[1], kw
        assert all(o["generated_text"].startswith(PROMPT) for o in outputs[1][0])


# ---------------------------------------------------------------------------------------------
# transformers.Trainer
# ---------------------------------------------------------------------------------------------
def trainer_rows(kind: str, n=16, T=12, pad=511):
    """Rows as a tokenizer + collator hand them to Trainer: right-padded with the pad id, labels -100 on padding
    (language model) or a class id (classifier)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        mask = torch.ones(T, dtype=torch.long)
        mask[int(torch.randint(6, T + 1, (1,), generator=g)):] = 0
        ids = torch.randint(0, pad, (T,), generator=g).masked_fill(mask == 0, pad)
        labels = ids.masked_fill(mask == 0, -100) if kind == "lm" else torch.randint(0, 2, (), generator=g)
        rows.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return rows


def train_with_trainer(model, rows, out, batch: int, accumulation: int, steps=3):
    """Per-step losses and gradient norms of transformers.Trainer on `model` (seeded: the same batches each time)."""
    import transformers
    args = transformers.TrainingArguments(str(out), per_device_train_batch_size=batch, max_steps=steps,
                                          gradient_accumulation_steps=accumulation, learning_rate=1e-2,
                                          logging_steps=1, report_to=[], seed=0, use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logged], [h["grad_norm"] for h in logged]


def test_transformers_trainer_trains_the_language_model_as_transformers_gpt2(tmp_path):
    """Gradient accumulation: Trainer passes num_items_in_batch (the accumulated batch's label count); the loss is
    the micro-batch's sum over it, as transformers' GPT-2 computes it."""
    config = tiny_config()
    hf = hf_model(config)
    ours = ours_from_hf(hf, config)
    rows = trainer_rows("lm")
    want = train_with_trainer(hf, rows, tmp_path / "hf", batch=2, accumulation=2)
    got = train_with_trainer(ours, rows, tmp_path / "ours", batch=2, accumulation=2)
    assert max(abs(a - b) for a, b in zip(got[0], want[0])) <= TOL  # losses, measured 1e-6 apart
    assert max(abs(a - b) / b for a, b in zip(got[1], want[1])) <= TOL  # gradient norms
    with torch.no_grad():
        assert max_diff(ours(rows[0]["input_ids"][None]).logits, hf(rows[0]["input_ids"][None]).logits) <= TOL


def test_transformers_trainer_trains_the_classifier(tmp_path):
    """The classifier's steps equal transformers' GPT2ForSequenceClassification's: ours under gradient accumulation
    (two micro-batches of 2, num_items_in_batch honoured) trains as transformers' on one batch of 4 (transformers'
    own GPT-2 classifier takes the count and ignores it: its loss under accumulation is twice the batch's mean)."""
    config = tiny_config()
    hf = hf_model(config, kind="cls")
    rows = trainer_rows("cls")
    want = train_with_trainer(hf, rows, tmp_path / "hf", batch=4, accumulation=1)
    accumulated = train_with_trainer(ours_from_hf(hf_model(config, kind="cls"), config, kind="cls"), rows,
                                     tmp_path / "o2", batch=2, accumulation=2)
    assert max(abs(a - b) for a, b in zip(accumulated[0], want[0])) <= TOL
    assert max(abs(a - b) / b for a, b in zip(accumulated[1], want[1])) <= TOL  # gradient norms


def test_num_items_in_batch_in_the_chunked_loss():
    """The chunked loss (config.loss_chunk_size, the trainer's targets) honours the count as the full-logits loss does:
    this batch's sum over it."""
    torch.manual_seed(0)
    chunked = GPT2LMHeadModel(tiny_config(loss_chunk_size=8))
    whole = GPT2LMHeadModel(tiny_config())
    whole.load_state_dict(chunked.state_dict())
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1).index_fill(1, torch.tensor([11]), -100)
    targets[0, 4:] = -100  # 15 predicted tokens in this micro-batch, 40 in the accumulated batch
    with torch.no_grad():
        want = float(whole(ids, targets=targets, num_items_in_batch=40).loss)
        assert abs(want - float(whole(ids, targets=targets).loss) * 15 / 40) <= 1e-5
    assert abs(float(chunked(ids, targets=targets, num_items_in_batch=40).loss.detach()) - want) <= 1e-5


# ---------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained options
# ---------------------------------------------------------------------------------------------
def test_from_pretrained_takes_transformers_loading_options(tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "fp16", dtype="fp16")
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", torch_dtype="auto").dtype == torch.float16
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype=.* and torch_dtype=.* disagree"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", dtype="fp32", torch_dtype="bf16")
    for device_map in ("auto", "cpu", torch.device("cpu"), {"": "cpu"}, {"transformer": "cpu", "lm_head": "cpu"}):
        model = GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", device_map=device_map, low_cpu_mem_usage=True)
        assert model.device == torch.device("cpu") and model.hf_device_map == {"": "cpu"}
    assert not hasattr(GPT2LMHeadModel.from_pretrained(tmp_path / "fp16"), "hf_device_map")
    with pytest.raises(ValueError, match="device_map places modules on 2 devices"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", device_map={"transformer": "cpu", "lm_head": "cuda:0"})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", device_map=0)
    # a revision / local_files_only mean nothing for a local folder, as in transformers; config fields override
    clf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "fp16", revision="main", local_files_only=True,
                                                        trust_remote_code=False, num_labels=3)
    assert clf.score.out_features == 3
    with pytest.raises(TypeError, match=r"^from_pretrained\(\) got an unknown option 'use_safetensors': loading "
                                        r"options are dtype, torch_dtype, device, device_map, low_cpu_mem_usage"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", use_safetensors=True)
    with pytest.raises(TypeError, match="low_cpu_mem_usage must be True or False"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", low_cpu_mem_usage="yes")


def test_hub_revision_and_local_files_only(tmp_path, monkeypatch):
    from helpers.fake_hub import FakeHub
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    model.save_pretrained(tmp_path / "repo")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with FakeHub({"someone/tiny": str(tmp_path / "repo")}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        GPT2LMHeadModel.from_pretrained("someone/tiny", revision="v1.0")
        assert any("/revision/v1.0" in request for request in hub.requests)  # asked the hub for that revision
        # the weights come from the cache the next time, unless force_download says otherwise
        assert hub.downloads.count("model.safetensors") == 1
        GPT2LMHeadModel.from_pretrained("someone/tiny", revision="v1.0")
        assert hub.downloads.count("model.safetensors") == 1
        GPT2LMHeadModel.from_pretrained("someone/tiny", revision="v1.0", force_download=True)
        assert hub.downloads.count("model.safetensors") == 2
    # the server is gone: the cache serves the revision fetched, and nothing else
    loaded = GPT2LMHeadModel.from_pretrained("someone/tiny", revision="v1.0", local_files_only=True)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    with pytest.raises(OSError, match=r"could not fetch 'someone/tiny@main' in the hub cache \(local_files_only\)"):
        GPT2LMHeadModel.from_pretrained("someone/tiny", revision="main", local_files_only=True)
    with pytest.raises(OSError, match=r"could not fetch 'someone/other' in the hub cache \(local_files_only\)"):
        GPT2LMHeadModel.from_pretrained("someone/other", local_files_only=True)


PEAK_MEMORY_SCRIPT = r"""
import json, os, sys, torch
from gpt2_ascend import GPT2Config, GPT2LMHeadModel

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

GPT2LMHeadModel.from_pretrained(sys.argv[2])  # imports and first-use costs, on a tiny model
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the present
base = rss("VmRSS")
model = GPT2LMHeadModel.from_pretrained(sys.argv[1], low_cpu_mem_usage=True)
total = sum(float(p.detach().sum()) for p in model.parameters())  # every weight resident
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(peak=rss("VmHWM") - base, size=size, finite=total == total)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-memory reset")
def test_low_cpu_mem_usage_loads_without_a_second_copy(tmp_path):
    """The peak memory of from_pretrained (every weight touched after) stays near one copy of the weights: each tensor
    is read into its own memory and converted before the next (measured 1.03x for this 40 MB model; a loader that
    holds the file's tensors and the converted ones, or memory-maps the file beside the copies, peaks at 1.3x)."""
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config(vocab_size=20000, n_embd=256, n_head=4, n_layer=4)).save_pretrained(tmp_path / "big")
    GPT2LMHeadModel(tiny_config()).save_pretrained(tmp_path / "small")
    # glibc's default returns freed blocks to the system by a moving threshold: fix it, so that the peak is the
    # loader's own and the same on every machine
    env = dict(os.environ, PYTHONPATH=REPO, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tmp_path / "big"), str(tmp_path / "small")],
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["finite"] and r["size"] > 30e6
    assert r["peak"] <= 1.15 * r["size"], f"peak {r['peak'] / r['size']:.2f}x the weights"


def test_save_pretrained_safe_serialization_false_writes_pytorch_model_bin(tmp_path):
    import transformers
    config = tiny_config()
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(config).eval()
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert {"pytorch_model.bin", "config.json", "generation_config.json"} == set(os.listdir(tmp_path / "bin"))
    ours.save_pretrained(tmp_path / "shards", safe_serialization=False, max_shard_size="100KB")
    shards = {f for f in os.listdir(tmp_path / "shards") if f.endswith(".bin")}
    index = json.loads((tmp_path / "shards" / "pytorch_model.bin.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards
    assert f"pytorch_model-00001-of-{len(shards):05d}.bin" in shards
    ids = torch.arange(10)[None]
    with torch.no_grad():
        want = ours(ids).logits
        for folder in ("bin", "shards"):
            theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / folder).eval()
            assert max_diff(theirs(ids).logits, want) <= 1e-5
            assert torch.equal(GPT2LMHeadModel.from_pretrained(tmp_path / folder)(ids).logits, want)
    with pytest.raises(TypeError, match="unexpected keyword argument 'push_to_hub'"):
        ours.save_pretrained(tmp_path / "x", push_to_hub=True)


# ---------------------------------------------------------------------------------------------
# generation_config.json of an export
# ---------------------------------------------------------------------------------------------
def test_exported_generation_config_is_what_transformers_writes(tmp_path, data_dir):
    """A training run's final/ carries the recipe's sampling settings in the generation_config.json transformers
    would write for them (no max_length), so transformers' generate(max_new_tokens=...) on it warns nothing."""
    import numpy as np
    import transformers
    from gpt2_ascend.train import run_training
    from gpt2_ascend.train.recipe import load_recipe
    data = tmp_path / "train.npy"
    np.save(data, np.random.default_rng(1).integers(0, 512, (8, 17)).astype(np.uint16))
    recipe = load_recipe(None, [], base=dict(
        output_dir=str(tmp_path / "run"), device="cpu", runner_config=dict(batch_size=4, max_steps=1, progress_bar=False),
        model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                                     eos_token_id=511, pad_token_id=511, do_sample=True, top_k=7, top_p=0.9,
                                     max_decode_length=16)),
        train_dataset=dict(data_loader=dict(dataset_dir=str(data)))))
    run_training(recipe, log=lambda *_: None)
    final = tmp_path / "run" / "final"
    written = json.loads((final / "generation_config.json").read_text())
    theirs = transformers.GPT2LMHeadModel.from_pretrained(final)
    theirs.generation_config = transformers.GenerationConfig(bos_token_id=511, eos_token_id=511, pad_token_id=511,
                                                             do_sample=True, temperature=1.0, top_k=7, top_p=0.9)
    theirs.save_pretrained(tmp_path / "theirs")
    assert written == json.loads((tmp_path / "theirs" / "generation_config.json").read_text())
    assert "max_length" not in written and written["top_k"] == 7
    model = transformers.GPT2LMHeadModel.from_pretrained(final)
    # transformers logs that warning on its own logger, which does not propagate to the root (pytest's caplog)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.addHandler(handler)
    hf_logger.setLevel(logging.WARNING)  # (whatever verbosity another test left)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
            model.generate(torch.tensor([[1, 2, 3]]), max_length=9)
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(level)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [s for s in said if "max_length" in s or "max_new_tokens" in s], said
