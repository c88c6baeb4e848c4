"""Speed features keep the numbers: the fast path's losses over 20 steps equal the plain path's (fp32, CPU).
The speed itself is measured on a GPU by bench/train.py (docs/performance.md), never in a test."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from conftest import counting_backend, max_diff
from gpt2_ascend.train.recipe import load_recipe
from gpt2_ascend.train import run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    rows = np.random.default_rng(0).integers(0, 500, size=(10, 33), dtype=np.uint16)
    np.save(root / "train.npy", np.tile(rows, (20, 1)))  # ten sequences, learnable in a few steps
    with open(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_tiny.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe.update(do_eval=False, data_cache_dir=str(root / "cache"))
    recipe["model"]["model_config"].update(seq_length=32, vocab_size=500, hidden_size=64, num_layers=2,
                                           num_heads=4, eos_token_id=499, pad_token_id=499, max_decode_length=32)
    recipe["runner_config"].update(batch_size=4, max_steps=20, progress_bar=False)
    recipe["train_dataset"]["data_loader"]["dataset_dir"] = str(root / "train.npy")
    recipe["eval_dataset"]["data_loader"]["dataset_dir"] = ""
    recipe["callbacks"] = [dict(type="MFLossMonitor", per_print_times=5)]
    path = root / "recipe.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def _losses(recipe_path, out, *overrides):
    run_training(load_recipe(str(recipe_path), [f"output_dir='{out}'", *overrides]), overwrite=True,
                 log=lambda *a, **k: None)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_fast_path_losses_equal_the_plain_path(recipe_path, tmp_path):
    plain = _losses(recipe_path, tmp_path / "plain")
    fast = _losses(recipe_path, tmp_path / "fast", "model.model_config.pad_vocab_size_multiple=64",
                   "runner_config.loss_chunk_size=24")
    assert len(plain) == len(fast) == 20
    assert max(abs(a - b) for a, b in zip(plain, fast)) <= 1e-5
    assert plain[-1] < plain[0]  # it did train


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_gpu_in_bf16_stays_close(recipe_path, tmp_path):
    common = ["device=cuda", "model.model_config.compute_dtype=bfloat16"]
    plain = _losses(recipe_path, tmp_path / "plain", *common)
    fast = _losses(recipe_path, tmp_path / "fast", *common, "model.model_config.pad_vocab_size_multiple=64",
                   "runner_config.loss_chunk_size=64", "runner_config.compile=true")
    assert max(abs(a - b) for a, b in zip(plain, fast)) <= 2e-2  # bf16 tolerance


@pytest.mark.parametrize("setup", ["plain", "padded_vocab_chunked_loss", "selective", "lora_full_recompute"])
def test_compiled_train_step_is_one_graph_that_is_not_recompiled(setup):
    """A graph break or a recompile every step is what makes a compiled step slow on a GPU; dynamo's
    tracing is the same on CPU, so count graphs with an eager backend over a few real trainer steps."""
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    from gpt2_ascend.data.loader import causal_lm_inputs
    from gpt2_ascend.lora import apply_lora
    from gpt2_ascend.train import Trainer, TrainSettings
    from gpt2_ascend.train.optim import build_optimizer, build_schedule

    config = GPT2Config.from_preset("tiny", vocab_size=500, n_positions=32,
                                    pad_vocab_size_multiple=64 if setup != "plain" else 1)
    torch.manual_seed(0)  # the "it trains" check below must not depend on the draw
    model = GPT2LMHeadModel(config)
    model.config.loss_chunk_size = 24 if setup == "padded_vocab_chunked_loss" else 0
    model.set_recompute({"selective": "selective", "lora_full_recompute": "full"}.get(setup, "none"))
    if setup == "lora_full_recompute":
        model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=("c_attn", "c_proj", "c_fc"))
    graphs = []
    torch._dynamo.reset()
    # lr 1e-3: LoRA's B starts at zero, and the default 1e-4 moved the loss less than its noise in 4 steps
    schedule = build_schedule(load_recipe(None, ["lr_schedule.learning_rate=0.001"]).lr_schedule, 100)
    trainer = Trainer(torch.compile(model, backend=counting_backend(graphs)), build_optimizer(model, schedule(0)),
                      schedule, loader=None, device=torch.device("cpu"),
                      settings=TrainSettings(total_steps=100, precision="fp32", max_grad_norm=1.0, progress=False),
                      raw_model=model, log=lambda *a, **k: None)
    first_block_adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".h.0." in n and "lora_B" in n}
    batch = torch.randint(0, 500, (2, 17))
    losses = [trainer.train_step([causal_lm_inputs(batch)])["loss"] for _ in range(4)]
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break or a recompile per step"
    assert losses[-1] < losses[0]  # and it trains
    if setup == "lora_full_recompute":  # gradients reach the first block's adapters without an input hook
        now = dict(model.named_parameters())
        assert len(first_block_adapters) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
        assert all(not torch.equal(now[n], before) for n, before in first_block_adapters.items())
    torch._dynamo.reset()


def test_compile_scopes():
    """runner_config.compile_scope: the whole model in one graph, or the per-block step compiled once (the
    model object and its parameter names unchanged)."""
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel
    from gpt2_ascend.lora import apply_lora
    from gpt2_ascend.parallel.parallelize import compile_model

    model = GPT2LMHeadModel(GPT2Config.from_preset("tiny"))
    names = [n for n, _ in model.named_parameters()]
    assert isinstance(compile_model(model, "model"), torch._dynamo.eval_frame.OptimizedModule)
    lora = apply_lora(model, rank=2, alpha=4, dropout=0.0)
    assert compile_model(lora, "blocks") is lora
    assert model.transformer._compiled_block_step is not None
    assert [n.replace("base_model.model.", "") for n, _ in lora.named_parameters() if "lora_" not in n] == \
        [n.replace("c_attn.", "c_attn.base_layer.") for n in names]
    with pytest.raises(ValueError, match="unknown compile scope 'layers': use model or blocks"):
        compile_model(model, "layers")
    assert load_recipe(None, ["runner_config.compile_scope=blocks"]).runner_config.compile_scope == "blocks"
    with pytest.raises(ValueError, match="compile_scope"):
        load_recipe(None, ["runner_config.compile_scope=layers"])


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_compiled_blocks_keep_recompute_and_dropout_exact(recompute):
    """compile_blocks puts the recompute inside the compiled per-block step: the same losses and gradients
    as eager (dropout on: its masks are saved, never drawn again in the backward), one graph for all blocks."""
    from gpt2_ascend import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("tiny", n_layer=3, vocab_size=500, n_positions=32))
    model.set_recompute(recompute)
    ids = torch.randint(0, 500, (2, 17))

    def loss_and_grads():
        torch.manual_seed(5)
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return grads

    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: the compiled step must honour the mask

    def evaluate_and_generate():  # evaluation (recompute off) through the per-block step, and the KV-cache path
        model.eval()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            tokens = model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=4, eos_token_id=None,
                                    pad_token_id=None)
        model.train()
        return logits, tokens

    eager = loss_and_grads()
    eager_logits, eager_tokens = evaluate_and_generate()
    graphs = []
    torch._dynamo.reset()
    model.transformer.compile_blocks(backend=counting_backend(graphs, aot=True))
    compiled = loss_and_grads()
    assert all(torch.equal(compiled[n], eager[n]) for n in eager)
    assert len(graphs) == 1  # three blocks, one compilation
    if recompute != "none":
        assert "tag_activation_checkpoint" in str(graphs[0].graph)  # the recompute is inside the graph
    logits, tokens = evaluate_and_generate()
    assert len(graphs) == 2  # evaluation ran through the compiled step: one more graph (no grad), for all blocks
    assert logits.shape == (2, 17, 500) and tokens.shape == (2, 12)
    assert max_diff(logits, eager_logits) <= 1e-6
    assert torch.equal(tokens, eager_tokens)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# CPU fast paths (issue 26): each computes what the plain path computes; bench/cpu_session.py times them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["torch", "mindspore"])
def test_cpu_optimizer_is_the_fused_kernel_and_trains_like_the_for_loop(rule):
    """ops.adamw picks torch's fused CPU kernel, under either update rule; eight clipped trainer steps with it
    give the per-step losses, gradient norms and weights of torch's single-tensor loop (its CPU default)."""
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.data.loader import causal_lm_inputs
    from gpt2_ascend.train import Trainer, TrainSettings
    from gpt2_ascend.train.optim import LRSchedule, build_optimizer, use_mindspore_rule
    from conftest import tiny_config

    torch.manual_seed(0)
    start = GPT2LMHeadModel(tiny_config()).state_dict()
    batches = [torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(i % 2)) for i in range(8)]
    runs = {}
    for kernel in ("fused", "for-loop"):
        model = GPT2LMHeadModel(tiny_config())
        model.load_state_dict(start)
        optimizer = build_optimizer(model, 1e-3, update_rule=rule)
        if kernel == "for-loop":  # the same groups in torch's plain loop
            groups = [dict(params=g["params"], weight_decay=g["weight_decay"]) for g in optimizer.param_groups]
            optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
            if rule == "mindspore":
                use_mindspore_rule(optimizer)
        else:
            assert optimizer.defaults["fused"] is True and not optimizer._step_supports_amp_scaling
        trainer = Trainer(model, optimizer, LRSchedule("polynomial", 1e-3, 1e-4, 2, 8), None, torch.device("cpu"),
                          TrainSettings(total_steps=8, precision="fp32", max_grad_norm=0.5, progress=False,
                                        step_rule=rule), log=lambda *a, **k: None)
        records = [trainer.train_step([causal_lm_inputs(b)]) for b in batches]
        runs[kernel] = ([r["loss"].item() for r in records], [r["grad_norm"].item() for r in records],
                        model.state_dict())
    (fused_loss, fused_norm, fused_w), (loop_loss, loop_norm, loop_w) = runs["fused"], runs["for-loop"]
    assert fused_loss[-1] < fused_loss[0] - 0.3  # it trains (by 0.5-0.6 in 8 steps)
    # measured: losses within 5e-7, norms 1e-7 relative, weights 7e-7 (rounding: the kernels order the ops
    # differently); a swapped beta pair is off by 0.016 in the losses (and stops the training)
    assert max(abs(a - b) for a, b in zip(fused_loss, loop_loss)) <= 1e-5
    assert max(abs(a - b) / b for a, b in zip(fused_norm, loop_norm)) <= 1e-6
    assert max(max_diff(fused_w[k], loop_w[k]) for k in start) <= 1e-5


def _plain_token_nll(model, ids):
    logits = model(ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                             reduction="none").view(ids.size(0), -1)


def test_chunked_eval_head_gives_the_plain_logits_losses():
    """Perplexity's head (losses.chunked_token_nll: blocks of tokens x words, an online log-sum-exp) scores every
    token as the plain (tokens x vocab) logits + cross-entropy do: a padded vocabulary, blocks that divide neither
    the tokens nor the vocabulary, a workspace reused by batches of other sizes."""
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.losses import chunked_token_nll
    from conftest import tiny_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(vocab_size=500, pad_vocab_size_multiple=64)).eval()
    with torch.no_grad():
        model.lm_head.weight[500:] = 5.0  # padding rows that would dominate every softmax if they were scored
        workspace = {}
        for batch in (3, 2):
            ids = torch.randint(0, 500, (batch, 17))
            hidden = model.transformer(ids).last_hidden_state[:, :-1]
            chunked = chunked_token_nll(hidden, model.lm_head.weight, ids[:, 1:], 500, chunk_size=7,
                                        workspace=workspace, vocab_block=128)  # 3 blocks of 128 and one of 116
            assert chunked.shape == (batch, 16) and max_diff(chunked, _plain_token_nll(model, ids)) <= 1e-6
        assert workspace["buffer"].shape == (7, 128)  # one (chunk x block) buffer, reused
        # logits hundreds apart between blocks (the first block's words scaled up): the running sum must be
        # rescaled to the running max, or exp() overflows / underflows to a wrong or infinite loss
        model.lm_head.weight[:128] *= 400.0
        hidden = model.transformer(ids).last_hidden_state[:, :-1]
        plain = _plain_token_nll(model, ids)
        chunked = chunked_token_nll(hidden, model.lm_head.weight, ids[:, 1:], 500, chunk_size=7, vocab_block=128)
        assert plain.abs().max() > 100 and max_diff(chunked, plain) <= 1e-6 * plain.abs().max()


def test_perplexity_takes_the_chunked_head_and_keeps_its_number():
    """perplexity() on our model runs the chunked head (no (B, T, vocab) logits: the head's forward never runs)
    and gives the loss of the plain path, which a forward hook forces (a hooked model is scored through its
    forward); through peft the same."""
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.eval import perplexity
    from gpt2_ascend.lora import apply_lora
    from conftest import tiny_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    blocks = torch.randint(0, 512, (11, 33))
    head_calls = []
    model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    fast = perplexity(model, blocks, 33, batch_size=4, precision="fp32")
    assert head_calls == []
    model.register_forward_hook(lambda *_: None)  # a hook the fast path would skip: the plain path runs
    plain = perplexity(model, blocks, 33, batch_size=4, precision="fp32")
    assert len(head_calls) == 3 and plain["tokens"] == fast["tokens"] == 11 * 32
    assert abs(fast["loss"] - plain["loss"]) <= 1e-6
    model._forward_hooks.clear()
    head_calls.clear()
    lora = apply_lora(model, rank=2, alpha=4, dropout=0.0)
    assert abs(perplexity(lora, blocks, 33, batch_size=4, precision="fp32")["loss"] - plain["loss"]) <= 1e-6
    assert head_calls == []


def test_a_decoding_step_compiled_for_the_cpu_takes_the_explicit_attention(monkeypatch):
    """In a graph compiled for the CPU, one query per row (a decoding step) runs the explicit attention, which
    inductor fuses into the graph, not SDPA's separate kernel; the same numbers (1e-6), and everywhere else
    (eager, several queries) SDPA as before."""
    from gpt2_ascend import ops
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 4, 9, 16, generator=g)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, :, :, :3] = False  # a left-padded row
    q = torch.randn(2, 4, 1, 16, generator=g)
    eager = ops.attention(q, k, v, mask=mask)
    assert len(calls) == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled = ops.attention(q, k, v, mask=mask)
    assert len(calls) == 1 and max_diff(compiled, eager) <= 1e-6
    ops.attention(torch.randn(2, 4, 9, 16, generator=g), k, v, is_causal=True)  # a prompt: SDPA
    assert len(calls) == 2
