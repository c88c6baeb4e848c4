"""The export/import round trip against whatever transformers and peft this interpreter has (the oldest ones
setup.cfg allows, in the environment tests/helpers/compat_env.py builds): model + tokenizer + pipeline + peft
adapter, both directions, the forward arguments, and generate()'s transformers options and pipeline() on our model
object, and transformers.Trainer on our model (tests/test_hf_habits.py's habits, with this transformers). Prints one JSON object of measurements on its last line;
tests/test_transformers4_compat.py asserts on it.

    python tests/compat/hf_round_trip.py WORK_DIR [EXPORT_DIR]

EXPORT_DIR: an export made by the newer environment (model, tokenizer, generation_config.json, adapter/ and
expected.pt with the numbers it gave there), loaded here as a user of the older transformers would.
"""
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(2)

import peft  # noqa: E402
import transformers  # noqa: E402

from gpt2_ascend import GPT2Config, GPT2LMHeadModel, load_tokenizer  # noqa: E402
from gpt2_ascend.config import GenerationConfig  # noqa: E402
from gpt2_ascend.generation import generate, generate_text  # noqa: E402
from gpt2_ascend.data.tokenizer import default_tokenizer_dir, save_tokenizer  # noqa: E402
from gpt2_ascend.lora import apply_lora, load_adapter, save_adapter  # noqa: E402

TEXT = "Hello world , it is 1912 in the city of Paris .\n<|endoftext|> next"
PROMPT = "The city of"


def diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def ours_to_transformers(work: str, ids) -> dict:
    """Our export (weights, generation_config.json, tokenizer, adapter) loaded by this transformers / peft."""
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, embd_pdrop=0.0, attn_pdrop=0.0,
                        resid_pdrop=0.0)
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(config).eval()
    ours.generation_config = GenerationConfig.from_model_config(config, do_sample=True, temperature=0.8, top_k=20,
                                                                top_p=0.9, max_new_tokens=6)
    final = os.path.join(work, "ours")
    ours.save_pretrained(final)
    tok = load_tokenizer()
    save_tokenizer(tok, final, source_dir=default_tokenizer_dir())
    out = {}
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
        out["ours_to_hf_logits"] = diff(theirs(ids).logits, ours(ids).logits)
    fast = transformers.AutoTokenizer.from_pretrained(final)
    slow = transformers.AutoTokenizer.from_pretrained(final, use_fast=False)
    out["tokenizer_classes"] = [type(fast).__name__, type(slow).__name__]
    want = tok(TEXT).input_ids
    out["tokenizer_ids_equal"] = fast(TEXT).input_ids == want and slow(TEXT).input_ids == want
    out["tokenizer_decode_equal"] = fast.decode(want) == slow.decode(want) == tok.decode(want) == TEXT
    out["tokenizer_pad_eos"] = [fast.pad_token_id, fast.eos_token_id, fast.model_max_length]
    pipe = transformers.pipeline("text-generation", model=final, device="cpu")
    torch.manual_seed(0)
    sampled = pipe(PROMPT, return_full_text=False)[0]["generated_text"]  # generation_config.json: sampling
    out["pipeline_sampled_equal"] = sampled == generate_text(ours, tok, PROMPT, seed=0)
    greedy = pipe(PROMPT, do_sample=False, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    out["pipeline_greedy_equal"] = greedy == generate_text(ours, tok, PROMPT, do_sample=False, max_new_tokens=6)

    adapted = apply_lora(GPT2LMHeadModel.from_pretrained(final), rank=4, alpha=8, dropout=0.0,
                         target_modules=("c_attn", "c_fc"))
    randomize_lora_b(adapted)
    save_adapter(adapted, os.path.join(work, "ours_adapter"), final)
    with torch.no_grad():
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(os.path.join(work, "ours_adapter")).eval()
        out["ours_adapter_in_peft_logits"] = diff(theirs(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits)
    return out


def transformers_to_ours(work: str, ids) -> dict:
    """A model, tokenizer and CAUSAL_LM adapter saved by this transformers / peft, loaded by ours."""
    hf_config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, embd_pdrop=0.0,
                                        attn_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(1)
    base = os.path.join(work, "hf")
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(base)
    transformers.GPT2TokenizerFast.from_pretrained(default_tokenizer_dir()).save_pretrained(base)
    hf = transformers.GPT2LMHeadModel.from_pretrained(base, attn_implementation="eager").eval()
    out = {"hf_files": sorted(os.listdir(base))}
    with torch.no_grad():
        out["hf_to_ours_logits"] = diff(GPT2LMHeadModel.from_pretrained(base)(ids).logits, hf(ids).logits)
    out["hf_tokenizer_in_ours"] = load_tokenizer(base)(TEXT).input_ids == load_tokenizer()(TEXT).input_ids
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["c_attn", "c_proj"]))
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(os.path.join(work, "hf_adapter"))
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        ours = load_adapter(GPT2LMHeadModel.from_pretrained(base), os.path.join(work, "hf_adapter"), merge=True)
        out["hf_adapter_in_ours_logits"] = diff(ours(ids).logits, want)
        greedy = peft_model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5,
                                     do_sample=False, pad_token_id=50256)
        out["hf_adapter_greedy_equal"] = torch.equal(generate(ours, ids[:1], do_sample=False, max_new_tokens=5),
                                                     greedy)
    return out


def forward_arguments(ids) -> dict:
    """output_hidden_states / output_attentions / return_dict / inputs_embeds / token_type_ids against this
    transformers' eager GPT-2."""
    hf_config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=50257)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(os.path.join(WORK, "fwd"))
    ours = GPT2LMHeadModel.from_pretrained(os.path.join(WORK, "fwd"))
    embeds = torch.randn(2, ids.size(1), 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        kw = dict(output_hidden_states=True, output_attentions=True, token_type_ids=ids.flip(1))
        a, b = ours(ids, **kw), hf(ids, use_cache=False, **kw)
        t_ours = ours(ids, labels=ids, return_dict=False)
        t_hf = hf(ids, labels=ids, use_cache=False, return_dict=False)
        return {"forward_logits": diff(a.logits, b.logits),
                "forward_hidden_states": max(diff(x, y) for x, y in zip(a.hidden_states, b.hidden_states)),
                "forward_attentions": max(diff(x, y) for x, y in zip(a.attentions, b.attentions)),
                "forward_counts": [len(a.hidden_states), len(b.hidden_states), len(a.attentions), len(b.attentions)],
                "forward_tuple": max(diff(x, y) for x, y in zip(t_ours, t_hf)) if len(t_ours) == len(t_hf) else 1.0,
                "forward_inputs_embeds": diff(ours(inputs_embeds=embeds).logits,
                                              hf(inputs_embeds=embeds, use_cache=False).logits)}


# generate()'s transformers options, against this transformers' generate on the same weights (as tests/test_hf_habits.py
# does with the newer transformers)
GENERATE_OPTIONS = [dict(max_length=11), dict(max_new_tokens=5, num_beams=3, num_return_sequences=2),
                    dict(max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=2),
                    dict(max_new_tokens=6, no_repeat_ngram_size=1), dict(max_new_tokens=5, do_sample=True, min_p=0.05),
                    dict(max_new_tokens=5, num_beams=2, output_scores=True, return_dict_in_generate=True)]


def generate_habits(ids) -> dict:
    """Our generate() with transformers' options, and pipeline("text-generation", model=<our object>), against this
    transformers' GPT-2 holding the same weights."""
    ours = GPT2LMHeadModel.from_pretrained(os.path.join(WORK, "hf")).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(WORK, "hf")).eval()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 left-padded
    ids = ids.masked_fill(mask == 0, 50256)
    equal, scores = [], 0.0
    for options in GENERATE_OPTIONS:
        torch.manual_seed(0)
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=mask, pad_token_id=50256, **options)
        mine = ours.generate(ids, attention_mask=mask, pad_token_id=50256, seed=0, **options)
        if isinstance(theirs, torch.Tensor):
            equal.append(isinstance(mine, torch.Tensor) and torch.equal(mine, theirs))
        else:
            equal.append(torch.equal(mine.sequences, theirs.sequences))
            scores = max([scores, diff(mine.sequences_scores, theirs.sequences_scores)] +
                         [diff(a, b) for a, b in zip(mine.scores, theirs.scores)])
    texts = []
    for model in (hf, ours):
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=load_tokenizer(), device="cpu")
        torch.manual_seed(0)
        texts.append(pipe([PROMPT, "Once upon a time"], do_sample=True, top_k=20, max_new_tokens=6))
    return {"generate_options_equal": equal, "generate_scores": scores, "pipeline_model_object_equal":
            texts[0] == texts[1] and pipe.model is ours}


def trainer_habit() -> dict:
    """transformers.Trainer (4.45 passes no num_items_in_batch) trains our model as this transformers' GPT-2: the
    logged losses and gradient norms of two steps with gradient accumulation, same weights, same rows."""
    # the shared environment's `datasets` is newer than transformers 4.45's huggingface_hub allows; Trainer needs it
    # only for datasets.Dataset inputs, and the rows here are a list
    transformers.utils.import_utils._datasets_available = False
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, 50000, (10,), generator=g)
        mask = (torch.arange(10) < int(torch.randint(5, 11, (1,), generator=g))).long()
        rows.append(dict(input_ids=ids.masked_fill(mask == 0, 50256), attention_mask=mask,
                         labels=ids.masked_fill(mask == 0, -100)))
    logged = []
    for model in (transformers.GPT2LMHeadModel.from_pretrained(os.path.join(WORK, "hf")),
                  GPT2LMHeadModel.from_pretrained(os.path.join(WORK, "hf"))):
        args = transformers.TrainingArguments(os.path.join(WORK, "trainer"), per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                                              logging_steps=1, report_to=[], seed=0, use_cpu=True,
                                              save_strategy="no", disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        logged.append([(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h])
    return {"trainer_steps": [len(steps) for steps in logged],
            "trainer_loss": max(abs(a[0] - b[0]) for a, b in zip(*logged)),
            "trainer_grad_norm": max(abs(a[1] - b[1]) / b[1] for a, b in zip(*logged))}


def newer_export(export: str) -> dict:
    """What the newer environment exported, loaded with this transformers / peft and compared with the numbers
    it measured there."""
    expected = torch.load(os.path.join(export, "expected.pt"), weights_only=True)
    ids = expected["ids"]
    out = {}
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        out["newer_export_logits"] = diff(model(ids).logits, expected["logits"])
        adapted = peft.AutoPeftModelForCausalLM.from_pretrained(os.path.join(export, "adapter")).eval()
        out["newer_adapter_logits"] = diff(adapted(input_ids=ids).logits, expected["adapted_logits"])
    tok = transformers.AutoTokenizer.from_pretrained(export)
    out["newer_tokenizer_ids_equal"] = tok(TEXT).input_ids == expected["text_ids"].tolist()
    pipe = transformers.pipeline("text-generation", model=export, device="cpu")
    greedy = pipe(PROMPT, do_sample=False, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    out["newer_pipeline_greedy_equal"] = tok(greedy).input_ids == expected["greedy_ids"].tolist()
    return out


if __name__ == "__main__":
    WORK = sys.argv[1]
    ids = torch.randint(0, 50000, (2, 9), generator=torch.Generator().manual_seed(3))
    result = {"transformers": transformers.__version__, "peft": peft.__version__,
              "transformers_file": transformers.__file__, "gpt2_ascend_file": sys.modules["gpt2_ascend"].__file__}
    result.update(ours_to_transformers(WORK, ids))
    result.update(transformers_to_ours(WORK, ids))
    result.update(forward_arguments(ids))
    result.update(generate_habits(ids[:, :7]))
    result.update(trainer_habit())
    if len(sys.argv) > 2:
        result.update(newer_export(sys.argv[2]))
    print(json.dumps(result))
