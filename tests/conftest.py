import importlib.util
import os
import sys

import pytest

# Bit-exact comparisons between processes on this machine (kill -9 + resume vs a run that never stopped) need every
# process to split its work over the same threads: MKL may otherwise use fewer than asked (MKL_DYNAMIC defaults to
# TRUE) and so may an OpenMP runtime told OMP_DYNAMIC. Set before torch loads them; the test processes' children
# inherit it. (Once, under a busy loop on each core, a resumed run's losses differed from step 42 in the last bit;
# a varying thread count is the known cause of that, not a proven one.)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

import torch  # noqa: E402

from gpt2_ascend import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2_ascend.hf import hf_to_ours
from gpt2_ascend.data.download import default_data_dir

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The one timeout of the suite: a last guard against a hang, never a measure of speed. Tests wait on events (a file
# appears, a line is printed, a process ends); a subprocess or a wait still going after this long is stuck. Every
# wait in the suite takes under 2 minutes alone on 2 cores and under 10 at load 10 (docs/testing.md).
HANG_GUARD_S = 1800


def load_script(path: str):
    """One of the checkout's scripts ("bench/train.py", "convert/merge_lora.py", "evaluate.py") as a freshly
    run module, named after its path (bench_train, convert_merge_lora) so it cannot shadow another import."""
    name = os.path.splitext(path)[0].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """GPT2_CACHE for the session (data/download.py cache_home): the tiny recipes cache their data there, and a test
    run never writes into the user's own cache; one folder for the session, so WikiText-2 is tokenized once."""
    path = str(tmp_path_factory.mktemp("gpt2_cache"))
    previous = os.environ.get("GPT2_CACHE")
    os.environ["GPT2_CACHE"] = path
    yield path
    if previous is None:
        os.environ.pop("GPT2_CACHE", None)
    else:
        os.environ["GPT2_CACHE"] = previous


@pytest.fixture(scope="session")
def data_dir():
    path = default_data_dir()
    if not os.path.isfile(os.path.join(path, "gpt2", "vocab.json")):
        pytest.fail(f"GPT-2 data not found in {path}: set GPT2_DATA_DIR to the shared data folder")
    return path


def tiny_config(**overrides):
    base = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=512, embd_pdrop=0.0,
                attn_pdrop=0.0, resid_pdrop=0.0, pad_token_id=511, eos_token_id=511, bos_token_id=511)
    base.update(overrides)
    return GPT2Config(**base)


def hf_model(config: GPT2Config, kind="lm", attn="eager", seed=0):
    """A transformers GPT-2 with its own random init, in eval mode."""
    import transformers
    torch.manual_seed(seed)
    arch = "GPT2LMHeadModel" if kind == "lm" else "GPT2ForSequenceClassification"
    hf_cfg = transformers.GPT2Config(**config.to_hf_dict(arch))
    hf_cfg._attn_implementation = attn
    cls = transformers.GPT2LMHeadModel if kind == "lm" else transformers.GPT2ForSequenceClassification
    return cls(hf_cfg).eval()


def ours_from_hf(hf, config: GPT2Config, kind="lm"):
    cls = GPT2LMHeadModel if kind == "lm" else GPT2ForSequenceClassification
    model = cls(config).eval()
    state = hf_to_ours(hf.state_dict(), config)
    if config.tie_word_embeddings and kind == "lm":
        state["lm_head.weight"] = state["transformer.wte.weight"]
    state = {k: v for k, v in state.items() if not (kind != "lm" and k == "lm_head.weight")}
    model.load_state_dict(state, strict=True)
    return model


def randomize_lora_b(model, seed=1):
    """Non-zero LoRA B matrices (and trained-head copies), as after training: peft starts B at zero, which would
    hide an adapter that got lost on the way."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def counting_backend(graphs: list, aot: bool = False):
    """A torch.compile backend that records each graph dynamo hands it (a graph break or a recompile adds one)
    and runs it eagerly; aot=True goes through AOT autograd's partitioner first, as inductor does."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        if not aot:
            return gm.forward
        from torch._dynamo.backends.common import aot_autograd
        eager = lambda g, _: g.forward  # noqa: E731
        return aot_autograd(fw_compiler=eager, bw_compiler=eager)(gm, example_inputs)
    return backend


def assert_generate_cli_continues_like(theirs, model_dir, adapter_dir, out_json, capsys):
    """generate.py --adapter on model_dir gives, for "Hello world", the greedy 6 tokens of `theirs` (peft on
    transformers' GPT-2 with the same adapter)."""
    import json
    from gpt2_ascend.data.tokenizer import load_tokenizer
    code = load_script("generate.py").main(["--model", str(model_dir), "--adapter", str(adapter_dir), "--prompt",
                                            "Hello world", "--max_new_tokens", "6", "--ignore_eos", "--output_json",
                                            str(out_json), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    tok = load_tokenizer()
    prompt = torch.tensor([tok("Hello world").input_ids])
    with torch.no_grad():
        expected = theirs.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                   do_sample=False, pad_token_id=50256)
    with open(out_json) as f:
        text = json.load(f)["results"][0]["text"]
    assert tok(text).input_ids == expected[0, prompt.size(1):].tolist()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()
