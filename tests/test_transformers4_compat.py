"""The lowest transformers 4.x and peft that setup.cfg allows, as a real install: the export/import round trip
(model + tokenizer + pipeline + peft adapter, both ways, and the forward arguments) runs in a second environment
with those versions (tests/helpers/compat_env.py: built once under .compat/, ~15 MB from PyPI in 10-30 s; torch
and the rest are shared with this environment), and loads an export made here with the newer versions.
GPT2_SKIP_COMPAT=1 skips it offline."""
import json
import os
import subprocess

import pytest

from conftest import HANG_GUARD_S, REPO
from helpers.compat_env import compat_pins, ensure_env

TOL = 1e-5


@pytest.fixture(scope="module")
def oldest_env():
    if os.environ.get("GPT2_SKIP_COMPAT") == "1":
        pytest.skip("GPT2_SKIP_COMPAT=1: the transformers 4.x environment needs PyPI once")
    pins = compat_pins()
    if pins["transformers"] is None or not pins["transformers"].startswith("4."):
        pytest.skip(f"setup.cfg allows no transformers 4.x (floor {pins['transformers']})")
    return pins, ensure_env(pins)


def export_here(folder, data_dir):
    """An export made with this environment's (newer) transformers and peft, with the numbers it gives here."""
    import torch
    from gpt2_ascend import GPT2LMHeadModel, load_tokenizer
    from gpt2_ascend.generation import generate_text
    from gpt2_ascend.data.tokenizer import save_tokenizer
    from gpt2_ascend.lora import apply_lora, save_adapter
    from conftest import randomize_lora_b, tiny_config
    torch.manual_seed(5)
    model = GPT2LMHeadModel(tiny_config(vocab_size=50257, pad_token_id=50256, eos_token_id=50256,
                                        bos_token_id=50256)).eval()
    model.save_pretrained(folder)
    tok_dir = os.path.join(data_dir, "gpt2")
    tok = load_tokenizer(tok_dir)
    save_tokenizer(tok, str(folder), source_dir=tok_dir)
    adapted = apply_lora(GPT2LMHeadModel.from_pretrained(folder), rank=4, alpha=8, dropout=0.0)
    randomize_lora_b(adapted)
    save_adapter(adapted, str(folder / "adapter"), str(folder))
    ids = torch.randint(0, 50000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text = "Hello world , it is 1912 in the city of Paris .\n<|endoftext|> next"  # hf_round_trip.TEXT
        greedy = generate_text(model, tok, "The city of", do_sample=False, max_new_tokens=6)
        torch.save(dict(ids=ids, logits=model(ids).logits, adapted_logits=adapted.eval()(input_ids=ids).logits,
                        text_ids=torch.tensor(tok(text).input_ids), greedy_ids=torch.tensor(tok(greedy).input_ids)),
                   folder / "expected.pt")


def test_round_trip_with_the_oldest_transformers_4(oldest_env, tmp_path, data_dir):
    pins, python = oldest_env
    export_here(tmp_path / "newer", data_dir)
    env = dict(os.environ, PYTHONPATH=REPO, GPT2_DATA_DIR=data_dir, OMP_NUM_THREADS="2")
    proc = subprocess.run([python, os.path.join(REPO, "tests", "compat", "hf_round_trip.py"), str(tmp_path),
                           str(tmp_path / "newer")], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # really the old versions, and really this checkout's code
    from packaging.version import Version
    assert Version(r["transformers"]) == Version(pins["transformers"]) and Version(r["peft"]) == Version(pins["peft"])
    assert r["transformers_file"].startswith(os.path.join(REPO, ".compat"))
    assert r["gpt2_ascend_file"] == os.path.join(REPO, "gpt2_ascend", "__init__.py")
    # ours -> transformers 4 / peft: weights, tokenizer (fast and slow), pipeline under generation_config.json
    assert r["ours_to_hf_logits"] <= TOL and r["ours_adapter_in_peft_logits"] <= TOL
    assert r["tokenizer_classes"] == ["GPT2TokenizerFast", "GPT2Tokenizer"]
    assert r["tokenizer_ids_equal"] and r["tokenizer_decode_equal"] and r["tokenizer_pad_eos"] == [50256, 50256, 1024]
    assert r["pipeline_sampled_equal"] and r["pipeline_greedy_equal"]
    # transformers 4 / peft -> ours
    assert r["hf_to_ours_logits"] <= TOL and r["hf_adapter_in_ours_logits"] <= TOL
    assert r["hf_tokenizer_in_ours"] and r["hf_adapter_greedy_equal"]
    # an export made with transformers 5 / peft 0.2x (this environment) loads there with the same numbers
    assert r["newer_export_logits"] <= TOL and r["newer_adapter_logits"] <= TOL
    assert r["newer_tokenizer_ids_equal"] and r["newer_pipeline_greedy_equal"]
    # generate()'s transformers options and pipeline(model=<our object>) with transformers 4's generation code
    assert r["generate_options_equal"] == [True] * 6 and r["generate_scores"] <= TOL
    assert r["pipeline_model_object_equal"]
    # transformers 4's Trainer (it logs losses rounded to 4 decimals)
    assert r["trainer_steps"] == [2, 2] and r["trainer_loss"] <= 1e-4 and r["trainer_grad_norm"] <= 1e-4
    # forward arguments with transformers 4's meaning
    assert r["forward_counts"] == [3, 3, 2, 2]
    for key in ("forward_logits", "forward_hidden_states", "forward_attentions", "forward_tuple",
                "forward_inputs_embeds"):
        assert r[key] <= TOL, key
