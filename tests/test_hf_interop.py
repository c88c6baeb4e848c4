"""HF interop, both ways: forward arguments with transformers' meaning, PEFT adapters trained on transformers'
GPT-2 (task types CAUSAL_LM, SEQ_CLS, none) in every place that takes an adapter, ours in peft on transformers,
and generation_config.json read the same way by transformers' pipeline and our generate. fp32, 1e-5."""
import json
import os
import warnings

import pytest
import torch

from conftest import (assert_generate_cli_continues_like, hf_model, load_script, max_diff, ours_from_hf,
                      randomize_lora_b, tiny_config)
from gpt2_ascend import GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.config import GenerationConfig
from gpt2_ascend.model import positions_from_mask

TOL = 1e-5
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"])


def ids_for(vocab=500, B=2, T=9, seed=3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# forward arguments
# ---------------------------------------------------------------------------------------------
def test_forward_arguments_have_transformers_meaning():
    config = tiny_config()
    hf = hf_model(config, attn="eager")
    ours = ours_from_hf(hf, config)
    ids = ids_for()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    with torch.no_grad():
        kw = dict(attention_mask=mask, output_hidden_states=True, output_attentions=True)
        # our default positions follow the mask, as transformers' generate() passes them
        want, got = hf(ids, use_cache=False, position_ids=positions_from_mask(mask), **kw), ours(ids, **kw)
        assert len(got.hidden_states) == config.n_layer + 1 and len(got.attentions) == config.n_layer
        real = mask.bool()  # padded positions see no key at all: their values are never used, and differ
        for a, b in zip(got.hidden_states, want.hidden_states):
            assert max_diff(a[real], b[real]) <= TOL
        for a, b in zip(got.attentions, want.attentions):
            assert a.shape == b.shape and max_diff(a[0], b[0]) <= TOL and max_diff(a[1, :, 3:], b[1, :, 3:]) <= TOL
        assert max_diff(got.logits[real], want.logits[real]) <= TOL

        # return_dict=False: HF's tuple, in HF's order (loss, logits, hidden_states)
        t_ours = ours(ids, labels=ids, output_hidden_states=True, return_dict=False)
        t_hf = hf(ids, labels=ids, output_hidden_states=True, use_cache=False, return_dict=False)
        assert isinstance(t_ours, tuple) and len(t_ours) == len(t_hf) == 3
        assert max_diff(t_ours[0], t_hf[0]) <= TOL and max_diff(t_ours[1], t_hf[1]) <= TOL
        assert all(max_diff(a, b) <= TOL for a, b in zip(t_ours[2], t_hf[2]))
        base = ours.transformer(ids, return_dict=False)
        assert isinstance(base, tuple) and max_diff(base[0], hf.transformer(ids, use_cache=False)[0]) <= TOL

        # inputs_embeds, position_ids, token_type_ids (through wte), logits_to_keep
        embeds = torch.randn(2, 9, config.n_embd, generator=torch.Generator().manual_seed(4))
        assert max_diff(ours(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds, use_cache=False).logits) <= TOL
        # consecutive offsets (transformers 5 reads a position that does not step by one as the start of a
        # packed sequence and masks across it; 4.x does not: that is not a GPT-2 feature, and not ours)
        positions = torch.stack([torch.arange(5, 14), torch.arange(20, 29)])
        types = ids_for(seed=5)
        kw = dict(position_ids=positions, token_type_ids=types)
        assert max_diff(ours(ids, **kw).logits, hf(ids, use_cache=False, **kw).logits) <= TOL
        assert max_diff(ours(ids, **kw).logits, ours(ids).logits) > 1e-2  # they do change the output
        assert max_diff(ours(ids, logits_to_keep=2).logits, hf(ids, use_cache=False, logits_to_keep=2).logits) <= TOL


def test_classifier_forward_arguments_have_transformers_meaning():
    config = tiny_config(num_labels=3)
    hf = hf_model(config, kind="cls", attn="eager")
    ours = ours_from_hf(hf, config, kind="cls")
    ids = ids_for()
    embeds = torch.randn(2, 9, config.n_embd, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours(ids, token_type_ids=ids_for(seed=6), output_hidden_states=True, output_attentions=True)
        want = hf(ids, token_type_ids=ids_for(seed=6), output_hidden_states=True, output_attentions=True)
        assert max_diff(got.logits, want.logits) <= TOL
        assert all(max_diff(a, b) <= TOL for a, b in zip(got.hidden_states + got.attentions,
                                                        want.hidden_states + want.attentions))
        assert max_diff(ours(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits) <= TOL  # last position
        labels = torch.tensor([0, 2])
        t = ours(ids, labels=labels, return_dict=False)
        assert isinstance(t, tuple) and max_diff(t[0], hf(ids, labels=labels).loss) <= TOL


def test_unsupported_arguments_raise_type_error_naming_them():
    ours = GPT2LMHeadModel(tiny_config()).eval()
    ids = ids_for()
    with pytest.raises(TypeError, match="head_mask is not supported"):
        ours(ids, head_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="encoder_hidden_states is not supported"):
        ours(ids, encoder_hidden_states=torch.zeros(2, 3, 64))
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_scores'"):
        ours(ids, output_scores=True)
    with pytest.raises(TypeError, match="GPT2ForSequenceClassification.forward.*past_key_values is not supported"):
        GPT2ForSequenceClassification(tiny_config())(ids, past_key_values=object())
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours()
    with torch.no_grad():  # None (or False) means "not asked for", as peft and HF code pass them
        assert torch.equal(ours(ids, head_mask=None, cache_position=None).logits, ours(ids).logits)
        classifier = GPT2ForSequenceClassification(tiny_config()).eval()
        assert torch.equal(classifier(ids, use_cache=False).logits, classifier(ids).logits)
    with pytest.raises(TypeError, match="GPT2ForSequenceClassification.forward.*use_cache is not supported"):
        classifier(ids, use_cache=True)


# ---------------------------------------------------------------------------------------------
# PEFT adapters trained on transformers' GPT-2 -> ours
# ---------------------------------------------------------------------------------------------
def hf_adapter(tmp_path, config, task_type, kind="lm"):
    """As an HF user trains one: transformers' GPT-2 saved as a base, loaded back (a classifier gets a new
    `score` head), and a peft LoRA adapter trained on it (B made non-zero). Returns the peft model."""
    import transformers
    from peft import LoraConfig, get_peft_model
    hf_model(config, kind="lm").save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    cls = transformers.GPT2LMHeadModel if kind == "lm" else transformers.GPT2ForSequenceClassification
    hf = cls.from_pretrained(tmp_path / "base", num_labels=config.num_labels, attn_implementation="eager")
    peft_model = get_peft_model(hf, LoraConfig(task_type=task_type, **LORA))
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == task_type and saved["base_model_name_or_path"] == str(tmp_path / "base")
    return peft_model.eval()


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_hf_causal_lm_adapter_in_load_adapter_merge_lora_and_generate(tmp_path, task_type, capsys):
    from gpt2_ascend.lora import load_adapter
    config = tiny_config(vocab_size=50257, pad_token_id=50256, eos_token_id=50256, bos_token_id=50256)
    theirs = hf_adapter(tmp_path, config, task_type)
    ids = ids_for()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        adapted = load_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter"),
                               merge=False)
        assert max_diff(adapted(input_ids=ids).logits, want) <= TOL
        merged = adapted.merge_and_unload()
        assert max_diff(merged(ids).logits, want) <= TOL
    # convert/merge_lora.py without --base: the adapter names its base (base_model_name_or_path)
    assert load_script("convert/merge_lora.py").main(["--adapter", str(tmp_path / "adapter"),
                                                      "--output_dir", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert max_diff(GPT2LMHeadModel.from_pretrained(tmp_path / "merged")(ids).logits, want) <= TOL
    # evaluate.py --adapter: the perplexity of peft + transformers on the same blocks
    text = tmp_path / "text.txt"
    text.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 4)
    result = tmp_path / "ppl.json"
    assert load_script("evaluate.py").main(["--task", "perplexity", "--model", str(tmp_path / "base"), "--adapter",
                                            str(tmp_path / "adapter"), "--eval_dataset_dir", str(text),
                                            "--seq_length", "16", "--device", "cpu", "--no_progress",
                                            "--output_json", str(result)]) == 0
    from gpt2_ascend.eval.runner import load_eval_tokens
    from gpt2_ascend.data.tokenizer import default_tokenizer_dir
    blocks = torch.as_tensor(load_eval_tokens(str(text), 16, tokenizer=default_tokenizer_dir()), dtype=torch.long)
    with torch.no_grad():
        losses = [theirs(input_ids=b[None], labels=b[None]).loss for b in blocks]  # each block's mean over 15
    assert abs(json.loads(result.read_text())["loss"] - torch.stack(losses).mean().item()) <= 1e-5
    # generate.py --adapter: the greedy continuation peft + transformers produce
    assert_generate_cli_continues_like(theirs, tmp_path / "base", tmp_path / "adapter", tmp_path / "out.json", capsys)


def test_hf_seq_cls_adapter_in_evaluate_and_merge_lora(tmp_path):
    """A SEQ_CLS adapter carries its trained `score` head (peft's modules_to_save): on an LM base it makes a
    classifier with that head, in evaluate's loader and in merge_lora, as AutoPeftModelForSequenceClassification."""
    from gpt2_ascend.loading import load_model
    config = tiny_config(num_labels=3)
    theirs = hf_adapter(tmp_path, config, "SEQ_CLS", kind="cls")
    ids = ids_for()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        model = load_model(str(tmp_path / "base"), "GPT2ForSequenceClassification", adapter=str(tmp_path / "adapter"),
                           device="cpu")
        assert max_diff(model(ids).logits, want) <= TOL
    summary = load_script("convert/merge_lora.py").main(["--adapter", str(tmp_path / "adapter"),
                                                         "--output_dir", str(tmp_path / "merged")])
    assert summary == 0
    merged = GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert max_diff(merged(ids).logits, want) <= TOL
    with pytest.raises(ValueError, match="SEQ_CLS adapter: load it on a text-classification model"):
        load_model(str(tmp_path / "base"), "GPT2LMHeadModel", adapter=str(tmp_path / "adapter"), device="cpu")


# ---------------------------------------------------------------------------------------------
# ours -> peft on transformers' GPT-2
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_our_adapters_load_in_peft_on_plain_transformers(tmp_path, kind):
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel
    from gpt2_ascend.lora import apply_lora, save_adapter
    cls = GPT2LMHeadModel if kind == "lm" else GPT2ForSequenceClassification
    config = tiny_config(num_labels=3)
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "base")
    ours = apply_lora(cls.from_pretrained(tmp_path / "base"), rank=4, alpha=8, dropout=0.0,
                      target_modules=("c_attn", "c_proj"))
    randomize_lora_b(ours)
    save_adapter(ours, str(tmp_path / "adapter"), str(tmp_path / "base"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    task = "CAUSAL_LM" if kind == "lm" else "SEQ_CLS"
    assert saved["task_type"] == task and saved["base_model_name_or_path"] == str(tmp_path / "base")
    assert saved["auto_mapping"] == {"base_model_class": cls.hf_architecture,
                                     "parent_library": "transformers.models.gpt2.modeling_gpt2"}
    ids = ids_for()
    auto = AutoPeftModelForCausalLM if kind == "lm" else AutoPeftModelForSequenceClassification
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on Conv1D's fan_in_fan_out
        want = ours.eval()(input_ids=ids).logits
        with ours.disable_adapter():
            assert max_diff(ours(input_ids=ids).logits, want) > 1e-2  # the adapter matters
        theirs = auto.from_pretrained(str(tmp_path / "adapter")).eval()
        assert max_diff(theirs(input_ids=ids).logits, want) <= TOL
        base = hf_model(config, kind=kind)
        base.load_state_dict(type(base).from_pretrained(tmp_path / "base").state_dict())
        by_hand = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        assert max_diff(by_hand(input_ids=ids).logits, want) <= TOL


# ---------------------------------------------------------------------------------------------
# train.py --load_checkpoint ADAPTER continues training it
# ---------------------------------------------------------------------------------------------
def test_training_continues_an_hf_adapter(tmp_path):
    import numpy as np
    from gpt2_ascend.lora import load_adapter
    from gpt2_ascend.train.recipe import load_recipe
    from gpt2_ascend.train import run_training
    config = tiny_config(n_positions=16)
    theirs = hf_adapter(tmp_path, config, "CAUSAL_LM")
    data = tmp_path / "train.npy"
    np.save(data, np.random.default_rng(1).integers(0, 512, (16, 17)).astype(np.uint16))

    def run(name, lr):
        recipe = load_recipe(None, [f"lr_schedule.learning_rate={lr}", "lr_schedule.lr_end=0"], base=dict(
            output_dir=str(tmp_path / name), device="cpu", run_mode="finetune",
            load_checkpoint=str(tmp_path / "adapter"),
            runner_config=dict(batch_size=4, max_steps=2, progress_bar=False),
            model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                                         eos_token_id=511, pad_token_id=511, do_sample=True, top_k=7)),
            train_dataset=dict(data_loader=dict(dataset_dir=str(data)))))
        run_training(recipe, log=lambda *_: None)
        return tmp_path / name / "final"

    ids = ids_for()
    frozen = run("lr0", 1e-30)  # (a learning rate must be > 0) no visible update: the exports are the HF adapter
    saved = json.loads((frozen / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["base_model_name_or_path"] == str(tmp_path / "base")
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["c_attn", "c_fc"]  # the adapter's, not a new one
    written = json.loads((frozen / "generation_config.json").read_text())  # the recipe's generation defaults
    assert {k: written.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "top_k")} == dict(
        bos_token_id=511, eos_token_id=511, pad_token_id=511, do_sample=True, top_k=7)
    assert "max_length" not in written  # (transformers writes no length for GPT-2)
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert max_diff(GPT2LMHeadModel.from_pretrained(frozen)(ids).logits, want) <= TOL
        again = load_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), str(frozen / "adapter"))
        assert max_diff(again(ids).logits, want) <= TOL
    trained = run("lr", 1e-2)  # and it does train
    with torch.no_grad():
        assert max_diff(GPT2LMHeadModel.from_pretrained(trained)(ids).logits, want) > 1e-3


# ---------------------------------------------------------------------------------------------
# generation_config.json
# ---------------------------------------------------------------------------------------------
def test_generation_config_is_shared_with_transformers_pipeline(tmp_path, data_dir):
    import transformers
    from gpt2_ascend.generation import generate, generate_text
    from gpt2_ascend.data.tokenizer import load_tokenizer, save_tokenizer
    config = tiny_config(vocab_size=50257, pad_token_id=50256, eos_token_id=50256, bos_token_id=50256)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig.from_model_config(config, do_sample=True, temperature=0.7, top_k=20,
                                                                 top_p=0.9, max_new_tokens=8)
    model.save_pretrained(tmp_path / "m")
    tok = load_tokenizer()
    save_tokenizer(tok, str(tmp_path / "m"), source_dir=os.path.join(data_dir, "gpt2"))
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "m"), device="cpu")
    assert pipe.model.generation_config.top_k == 20 and pipe.model.generation_config.do_sample
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert ours.generation_config.top_k == 20 and ours.generation_config.max_new_tokens == 8
    for seed in (0, 1):
        torch.manual_seed(seed)  # transformers samples from the global generator; ours from one seeded alike
        theirs = pipe("The city of", return_full_text=False)[0]["generated_text"]
        assert generate_text(ours, tok, "The city of", seed=seed) == theirs
        assert load_script("generate.py").main(["--model", str(tmp_path / "m"), "--prompt", "The city of",
                                                "--seed", str(seed), "--device", "cpu",
                                                "--output_json", str(tmp_path / "o.json")]) == 0
        assert json.loads((tmp_path / "o.json").read_text())["results"][0]["text"] == theirs
    # explicit arguments win over the file: greedy here and in transformers
    ids = torch.tensor([tok("The city of").input_ids])
    with torch.no_grad():
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
        greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5)
    assert torch.equal(generate(ours, ids, do_sample=False, max_new_tokens=5), greedy)
    # a greedy file leaves the sampling keys out (transformers warns otherwise); both read top_k 50 then
    model.generation_config = GenerationConfig.from_model_config(config, top_k=5)
    model.save_pretrained(tmp_path / "g")
    written = json.loads((tmp_path / "g" / "generation_config.json").read_text())
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict())).save_pretrained(tmp_path / "t")
    assert written == json.loads((tmp_path / "t" / "generation_config.json").read_text())  # what transformers writes
    greedy_folder = GPT2LMHeadModel.from_pretrained(tmp_path / "g")
    theirs_folder = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "g").generation_config
    assert greedy_folder.generation_config.to_diff_dict() == theirs_folder.to_diff_dict()  # top_k: the default
    greedy_folder.save_pretrained(tmp_path / "g2")  # saved again: the same file
    assert json.loads((tmp_path / "g2" / "generation_config.json").read_text()) == written
    tok.save_pretrained(tmp_path / "g")
    torch.manual_seed(2)  # sampling asked for at call time: the same top_k (50) on both sides
    theirs = transformers.pipeline("text-generation", model=str(tmp_path / "g"), device="cpu")(
        "The city of", do_sample=True, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    assert generate_text(greedy_folder, tok, "The city of", do_sample=True, max_new_tokens=6, seed=2) == theirs
    # any other setting of the file is honoured as transformers honours it (beam search here), not ignored
    (tmp_path / "g" / "generation_config.json").write_text(json.dumps(dict(written, num_beams=4)))
    with torch.no_grad():
        beams = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "g").generate(ids, max_new_tokens=4)
    assert not torch.equal(beams, generate(GPT2LMHeadModel.from_pretrained(tmp_path / "m"), ids, max_new_tokens=4,
                                           do_sample=False))  # (beam search differs from greedy here)
    assert torch.equal(generate(GPT2LMHeadModel.from_pretrained(tmp_path / "g"), ids, max_new_tokens=4), beams)
