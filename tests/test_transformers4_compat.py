"""The lowest transformers 4.x that setup.cfg allows, as a real install: the export/import round trip (model +
tokenizer + pipeline + peft adapter, both ways, and the forward arguments) runs in a second environment with
that transformers and a peft of its time (tests/helpers/compat_env.py: built once under .compat/, ~15 MB from
PyPI in 10-30 s; torch and the rest are shared with this environment). GPT2_SKIP_COMPAT=1 skips it offline."""
import json
import os
import subprocess

import pytest

from conftest import REPO
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


def test_round_trip_with_the_oldest_transformers_4(oldest_env, tmp_path, data_dir):
    pins, python = oldest_env
    env = dict(os.environ, PYTHONPATH=REPO, GPT2_DATA_DIR=data_dir, OMP_NUM_THREADS="2")
    proc = subprocess.run([python, os.path.join(REPO, "tests", "compat", "hf_round_trip.py"), str(tmp_path)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # really the old versions, and really this checkout's code
    assert r["transformers"].split(".")[:2] == pins["transformers"].split(".")[:2]
    assert r["peft"] == pins["peft"] and r["transformers_file"].startswith(os.path.join(REPO, ".compat"))
    assert r["gpt2_ascend_file"] == os.path.join(REPO, "gpt2_ascend", "__init__.py")
    # ours -> transformers 4 / peft: weights, tokenizer (fast and slow), pipeline under generation_config.json
    assert r["ours_to_hf_logits"] <= TOL and r["ours_adapter_in_peft_logits"] <= TOL
    assert r["tokenizer_classes"] == ["GPT2TokenizerFast", "GPT2Tokenizer"]
    assert r["tokenizer_ids_equal"] and r["tokenizer_decode_equal"] and r["tokenizer_pad_eos"] == [50256, 50256, 1024]
    assert r["pipeline_sampled_equal"] and r["pipeline_greedy_equal"]
    # transformers 4 / peft -> ours
    assert r["hf_to_ours_logits"] <= TOL and r["hf_adapter_in_ours_logits"] <= TOL
    assert r["hf_tokenizer_in_ours"] and r["hf_adapter_greedy_equal"]
    # forward arguments with transformers 4's meaning
    assert r["forward_counts"] == [3, 3, 2, 2]
    for key in ("forward_logits", "forward_hidden_states", "forward_attentions", "forward_tuple",
                "forward_inputs_embeds"):
        assert r[key] <= TOL, key
