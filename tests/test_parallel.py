"""Distributed training through real torchrun processes (gloo, CPU, fp32, tiny shapes).

Every layout must reproduce a single-process run with the same global batch: per-step losses, per-step
gradient norms (before clipping: the norm over all shards and stages, each element counted once) and the
merged final weights to 1e-5.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from helpers.goldens import assert_golden, run_record
from conftest import HANG_GUARD_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
STEPS = 5


def _port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    rng = np.random.default_rng(0)
    np.save(root / "train.npy", rng.integers(0, 512, size=(96, 17), dtype=np.uint16))
    eight_rows = np.random.default_rng(1).integers(0, 499, size=(8, 17), dtype=np.uint16)
    np.save(root / "learnable.npy", np.tile(eight_rows, (12, 1)))  # seen over and over: learnt in a few steps
    ids = rng.integers(0, 511, size=(64, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, length in enumerate(rng.integers(4, 13, size=64)):
        ids[row, length:], mask[row, length:] = 511, 0  # right padding with the pad id
    np.savez(root / "cls.npz", input_ids=ids, attention_mask=mask, labels=rng.integers(0, 2, size=64))
    with open(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_tiny.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe.update(do_eval=False, data_cache_dir=str(root / "cache"))
    recipe["model"]["model_config"].update(seq_length=16, vocab_size=512, hidden_size=64, num_layers=4,
                                           num_heads=4, eos_token_id=511, pad_token_id=511, max_decode_length=16)
    recipe["runner_config"].update(batch_size=8, max_steps=STEPS, progress_bar=False)
    recipe["lr_schedule"].update(learning_rate=1e-4, lr_end=1e-5, warmup_steps=0)
    recipe["train_dataset"]["data_loader"]["dataset_dir"] = str(root / "train.npy")
    recipe["eval_dataset"]["data_loader"]["dataset_dir"] = ""
    recipe["callbacks"] = [dict(type="MFLossMonitor", per_print_times=1),
                           dict(type="CheckpointMonitor", prefix="t", save_checkpoint_steps=STEPS,
                                keep_checkpoint_max=3)]
    with open(root / "lm.yaml", "w") as f:
        yaml.safe_dump(recipe, f)
    recipe["model"]["arch"]["type"] = "GPT2ForSequenceClassification"
    recipe["model"]["model_config"].update(seq_length=12, num_labels=2)
    recipe["train_dataset"]["data_loader"]["dataset_dir"] = str(root / "cls.npz")
    with open(root / "cls.yaml", "w") as f:
        yaml.safe_dump(recipe, f)
    return root


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def run(workdir, name, nproc, *overrides, recipe="lm.yaml", check=True, wait=True):
    out = workdir / name
    args = ["--config", str(workdir / recipe), "--output_dir", str(out), *overrides]
    if nproc == 1:
        cmd = [sys.executable, os.path.join(REPO, "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), os.path.join(REPO, "train.py"), "--use_parallel", "True", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    if check:
        assert proc.returncode == 0, stderr[-3000:]
    return out


def records(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r["step"], r["loss"]) for r in records(out)]


def weights(directory):
    from gpt2_ascend.hf import read_state_dict
    return read_state_dict(str(directory))


def assert_same_run(out, reference, max_grad_norm=1.0):
    got, want = records(out), records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    mine, theirs = weights(out / "final"), weights(reference / "final")
    assert mine.keys() == theirs.keys()
    diff = dict(loss=max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)),
                grad_norm=max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(got, want)),
                weights=max((mine[k] - theirs[k]).abs().max().item() for k in mine))
    assert max(diff.values()) <= TOL, diff
    # the clipping threshold is below these norms (~2, ~0.75 from the biased model): a wrong norm also changes
    # every update
    assert min(r["grad_norm"] for r in want) > 1.5 * max_grad_norm


@pytest.fixture(scope="module")
def single(workdir):
    return run(workdir, "single", 1)


@pytest.fixture(scope="module")
def single_cls(workdir):
    return run(workdir, "single_cls", 1, recipe="cls.yaml")


def asked_layout(overrides) -> dict:
    """The parallel degrees a run's overrides ask for (the others are 1)."""
    layout = dict(data_parallel=1, model_parallel=1, pipeline_stage=1)
    for override in overrides:
        key, value = override.split("=")
        if key.removeprefix("parallel.") in layout:
            layout[key.removeprefix("parallel.")] = int(value)
    return layout


LAYOUTS = [
    ("dp", 2, ["parallel.data_parallel=2", "runner_config.batch_size=4"]),
    ("fsdp", 2, ["parallel.data_parallel=2", "parallel.optimizer_shard=true", "runner_config.batch_size=4"]),
    ("tp", 2, ["parallel.model_parallel=2", "parallel.recompute=full"]),
    ("tp_sp", 2, ["parallel.model_parallel=2", "parallel.sequence_parallel=true"]),
    ("pp_gpipe", 2, ["parallel.pipeline_stage=2", "parallel.micro_batch_num=2", "parallel.pipeline_schedule=gpipe"]),
    ("pp_1f1b", 2, ["parallel.pipeline_stage=2", "parallel.micro_batch_num=4", "parallel.recompute=selective"]),
    ("dp_tp", 4, ["parallel.data_parallel=2", "parallel.model_parallel=2", "runner_config.batch_size=4"]),
    ("tp_pp", 4, ["parallel.model_parallel=2", "parallel.pipeline_stage=2", "parallel.micro_batch_num=2"]),
    # gradient accumulation on top of a layout: two optimizer micro-steps of half the batch each
    ("pp_accum", 2, ["parallel.pipeline_stage=2", "parallel.micro_batch_num=2", "runner_config.batch_size=4",
                     "runner_config.gradient_accumulation_steps=2"]),
    ("tp_accum", 2, ["parallel.model_parallel=2", "runner_config.batch_size=4",
                     "runner_config.gradient_accumulation_steps=2"]),
]  # FSDP x accumulation: test_global_batch_is_kept_by_accumulation_on_fewer_processes


@pytest.mark.parametrize("name, nproc, layout", LAYOUTS)
def test_layout_matches_one_process(workdir, single, name, nproc, layout):
    out = run(workdir, name, nproc, *layout)
    assert_same_run(out, single)
    with open(out / "checkpoint" / f"step_{STEPS:07d}" / "config.json") as f:
        recorded = json.load(f)["layout"]  # what a resume on another layout reads
    assert recorded == asked_layout(layout)


@pytest.mark.parametrize("name", ["single", "tp", "pp_1f1b", "fsdp"])
def test_runs_reproduce_their_goldens(workdir, single, name):
    """The layouts above agree with one process to 1e-5; each also reproduces its own recorded numbers to the
    tolerances another CPU needs (tests/helpers/goldens.py). The runs are the ones the test above made."""
    out = workdir / name
    if not (out / "final").is_dir():
        nproc, layout = next((n, layout) for key, n, layout in LAYOUTS if key == name)
        out = run(workdir, name, nproc, *layout)
    assert_golden(f"torchrun_{name}", run_record(out))


def test_global_batch_is_kept_by_accumulation_on_fewer_processes(workdir):
    """runner_config.global_batch_size: one process accumulating 2 micro-batches of 4 trains exactly like 2 processes
    (here sharded, FSDP2) accumulating 2 of 2 each, with MindSpore's optimizer rule and MindFormers' init."""
    common = ["runner_config.global_batch_size=8", "optimizer.type=FusedAdamWeightDecay",
              "model.model_config.init_style=mindformers"]
    one = run(workdir, "global_batch_1", 1, "runner_config.batch_size=4", *common)
    two = run(workdir, "global_batch_2", 2, "parallel.data_parallel=2", "parallel.optimizer_shard=true",
              "runner_config.batch_size=2", *common)
    assert_same_run(two, one)


@pytest.mark.parametrize("name, layout", [
    ("cls_pp", ["parallel.pipeline_stage=2", "parallel.micro_batch_num=2"]),
    ("cls_dp", ["parallel.data_parallel=2", "runner_config.batch_size=4"]),
    # the pooled head under sequence parallel takes the whole sequence back (ln_f's gather before pooling)
    ("cls_tp_sp", ["parallel.model_parallel=2", "parallel.sequence_parallel=true"]),
])
def test_classifier_layouts_match_one_process(workdir, single_cls, name, layout):
    assert_same_run(run(workdir, name, 2, *layout, recipe="cls.yaml"), single_cls)


def test_distributed_clip_scales_by_exactly_max_norm_over_norm():
    """parallel.clip.clip_grad_norm on one rank's plain tensors (the DTensor and pipeline sums are checked
    against one process by every layout's grad_norm above): the norm counts a duplicate (a pipeline's tied
    head copy) once, and every gradient, the duplicate's too, is multiplied by max_norm / norm."""
    from gpt2_ascend.parallel.clip import clip_grad_norm
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((16, 8), (8,), (5, 8))]
    natural = [torch.randn(p.shape, generator=g) for p in params]
    copy = torch.nn.Parameter(torch.zeros(5, 8))
    for p, grad in zip(params + [copy], natural + [natural[-1]]):
        p.grad = grad.clone()
    norm = torch.cat([n.flatten() for n in natural]).norm().item()
    assert clip_grad_norm(params + [copy], norm / 4, duplicates=[copy]).item() == pytest.approx(norm, rel=1e-6)
    for p, grad in zip(params + [copy], natural + [natural[-1]]):
        assert (p.grad.flatten() @ grad.flatten() / grad.pow(2).sum()).item() == pytest.approx(0.25, rel=1e-5)
        assert torch.allclose(p.grad, grad * 0.25, rtol=1e-5, atol=0)
    clipped = [p.grad.clone() for p in params]
    clip_grad_norm(params, norm)  # a threshold above the norm: nothing changes
    assert all(torch.equal(p.grad, c) for p, c in zip(params, clipped))


@pytest.mark.parametrize("max_norm", [0.0, None, -0.5])
def test_a_max_norm_that_is_not_positive_clips_nothing_on_either_path(max_norm):
    """0 (a recipe's "no clipping"), None (TrainSettings') and a negative value (the Python API does not refuse one)
    leave every gradient as it is and still return the norm, on one device and distributed; a negative threshold
    once made the one-device coefficient negative, turning the step into gradient ascent."""
    from gpt2_ascend.parallel.clip import clip_by_global_norm, clip_grad_norm
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((16, 8), (8,))]
    natural = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.cat([n.flatten() for n in natural]).norm().item()
    for clip in (clip_by_global_norm, clip_grad_norm):
        for p, grad in zip(params, natural):
            p.grad = grad.clone()
        assert clip(params, max_norm).item() == pytest.approx(norm, rel=1e-6)
        assert all(torch.equal(p.grad, grad) for p, grad in zip(params, natural)), clip.__name__


def test_one_parameter_is_clipped_on_either_path():
    """A model part with a single gradient (a LoRA pair's one trainable tensor, a head alone): both clips scale it
    by max_norm / norm (each once read grads[0] for the device; any other index fails on one gradient)."""
    from gpt2_ascend.parallel.clip import clip_by_global_norm, clip_grad_norm
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    for clip in (clip_by_global_norm, clip_grad_norm):
        param = torch.nn.Parameter(torch.zeros(6, 4))
        param.grad = grad.clone()
        assert clip([param], grad.norm().item() / 2).item() == pytest.approx(grad.norm().item(), rel=1e-6)
        assert torch.allclose(param.grad, grad / 2, rtol=1e-5, atol=0), clip.__name__


def test_merged_sharded_checkpoint_loads_in_transformers(workdir, single):
    import transformers
    out = workdir / "tp"
    if not (out / "checkpoint").is_dir():
        out = run(workdir, "tp", 2, "parallel.model_parallel=2")
    merged = workdir / "merged_tp"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "convert/merge_checkpoint.py"), "--src_ckpt_dir",
                           str(out / "checkpoint" / f"step_{STEPS:07d}"), "--dst_dir", str(merged)],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    theirs = transformers.GPT2LMHeadModel.from_pretrained(merged).eval()
    from gpt2_ascend import GPT2LMHeadModel
    running = GPT2LMHeadModel.from_pretrained(single / "final").eval()  # the same run on one process
    ids = torch.randint(0, 511, (2, 16), generator=torch.Generator().manual_seed(0))
    from gpt2_ascend.loading import load_model  # what evaluate.py / generate.py --model STEP_DIR use
    direct = load_model(str(out / "checkpoint" / f"step_{STEPS:07d}"), device="cpu")
    with torch.no_grad():
        assert (theirs(ids).logits - running(ids).logits).abs().max().item() <= TOL
        assert (direct(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-6


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int):
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_resume_after_kill_on_two_processes(workdir):
    """The victim runs for ever (the schedule spans a fixed 60 steps), so it is still running when its step-40
    checkpoint appears, however fast or slow the machine; killed then and resumed to 20 steps past where it died,
    it writes the losses of a run to that step that never stopped."""
    steps = ["lr_schedule.total_steps=60", "callbacks.CheckpointMonitor.save_checkpoint_steps=20",
             "parallel.data_parallel=2", "runner_config.batch_size=2"]
    proc = run(workdir, "kill_victim", 2, *steps, "--max_steps", "100000", wait=False)
    victim = workdir / "kill_victim"
    marker = victim / "checkpoint" / "step_0000040" / "manifest.json"
    deadline = time.monotonic() + HANG_GUARD_S
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, f"no checkpoint at step 40 after {HANG_GUARD_S} s: a hang"
        time.sleep(0.005)
    kill_tree(proc.pid)  # torchrun and its workers (which run in sessions of their own)
    proc.communicate()
    end = str(max(60, len(losses(victim)) + 20))
    reference = run(workdir, "kill_reference", 2, *steps, "--max_steps", end)
    run(workdir, "kill_victim", 2, *steps, "--max_steps", end, "--resume", "auto")
    assert losses(victim) == losses(reference)  # the same per-step losses, bit for bit on CPU
    assert len(losses(reference)) == int(end)


def test_resume_on_a_different_layout(workdir):
    # MindSpore's optimizer rule: its step count lives in the optimizer's param_groups, which DCP must carry over
    six = ["--max_steps", "6", "callbacks.CheckpointMonitor.save_checkpoint_steps=3", "optimizer.type=FusedAdamWeightDecay"]
    tp = run(workdir, "relayout_tp", 2, *six, "parallel.model_parallel=2")
    moved = workdir / "relayout_dp"
    shutil.copytree(tp, moved)
    shutil.rmtree(moved / "checkpoint" / "step_0000006")
    shutil.rmtree(moved / "final")
    run(workdir, "relayout_dp", 2, *six, "parallel.data_parallel=2", "runner_config.batch_size=4",
        "--resume", "auto")
    got, want = losses(moved), losses(tp)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 7))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= TOL


@pytest.mark.parametrize("env_world, layout, message", [
    ("4", ["parallel.data_parallel=3"], "3 x 1 x 1 = 3, but the world size is 4"),
    ("3", ["parallel.model_parallel=3"], "model_parallel=3 does not divide n_head=4"),
    ("8", ["parallel.pipeline_stage=8"], "pipeline_stage=8 is more than n_layer=4"),
])
def test_bad_layouts_are_one_line(workdir, monkeypatch, capsys, env_world, layout, message):
    import train
    monkeypatch.setenv("WORLD_SIZE", env_world)
    code = train.main(["--config", str(workdir / "lm.yaml"), "--output_dir", str(workdir / "bad"),
                       "--use_parallel", "True", *layout])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    monkeypatch.setenv("RANK", "1")  # under torchrun the other ranks fail the same way, silently
    code = train.main(["--config", str(workdir / "lm.yaml"), "--output_dir", str(workdir / "bad"),
                       "--use_parallel", "True", *layout])
    assert code == 2 and capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def biased(workdir, single):
    """The single run's exported model with every bias and LayerNorm parameter moved far from its init: a fresh
    init's biases are all zero, so a layout that permutes or splits a bias wrongly is invisible from one."""
    from gpt2_ascend import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(single / "final")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    model.save_pretrained(str(workdir / "biased"))
    return workdir / "biased"


@pytest.fixture(scope="module")
def finetune_single(workdir, biased):
    """One process, finetuning the biased model for a few more steps."""
    return run(workdir, "finetune_single", 1, *finetune(biased))


def finetune(biased) -> list[str]:
    """Finetune the biased model, clipping below its gradient norm (~0.75)."""
    return ["--run_mode", "finetune", "--load_checkpoint", str(biased), f"runner_wrapper.max_grad_norm={FINETUNE_CLIP}"]


FINETUNE_CLIP = 0.4


@pytest.mark.parametrize("name, nproc, layout", [
    ("meta_dp", 2, ["parallel.data_parallel=2", "runner_config.batch_size=4"]),  # filled before DDP wraps it
    ("meta_tp", 2, ["parallel.model_parallel=2"]),
    ("meta_fsdp", 2, ["parallel.data_parallel=2", "parallel.optimizer_shard=true", "runner_config.batch_size=4"]),
    ("meta_tp_pp", 4, ["parallel.model_parallel=2", "parallel.pipeline_stage=2", "parallel.micro_batch_num=2"]),
])
def test_meta_init_loads_each_rank_only_its_shards(workdir, biased, finetune_single, name, nproc, layout):
    """The large-model path (build on meta, fill shards tensor by tensor) finetunes exactly like one process, from a
    model with nonzero biases (each c_attn bias permuted to the per-head layout as its weight is)."""
    out = run(workdir, name, nproc, *finetune(biased), "parallel.meta_init=true", *layout)
    assert_same_run(out, finetune_single, FINETUNE_CLIP)


def test_tensor_parallel_finetunes_nonzero_biases_like_one_process(workdir, biased, finetune_single):
    """The loaded model's path (a whole model on each rank, permuted to the per-head c_attn layout, then split; with
    sequence parallel, the norms on sequence shards): every bias is nonzero, so a c_attn bias left in HF's
    [q | k | v] order mixes the heads' q, k and v."""
    out = run(workdir, "finetune_tp", 2, *finetune(biased), "parallel.model_parallel=2",
              "parallel.sequence_parallel=true")
    assert_same_run(out, finetune_single, FINETUNE_CLIP)


def test_meta_init_fresh_model_trains(workdir):
    """A fresh meta-device init in the 13B recipe's layout (data x tensor parallel with optimizer_shard: DTensor
    draws on FSDP-over-TP shards) starts like a fresh GPT-2 and learns. An all-zero init would start at
    log(vocab) exactly, with a zero gradient, and never move. The weights' statistics are checked without
    torchrun in tests/test_init.py (pipeline stages too); the padding rows here (500 tokens padded to 512)."""
    from gpt2_ascend.safe_dcp import load_full_model_state
    out = run(workdir, "meta_fresh", 4, "parallel.data_parallel=2", "parallel.model_parallel=2",
              "parallel.optimizer_shard=true", "runner_config.batch_size=4", "parallel.meta_init=true",
              "model.model_config.vocab_size=500", "model.model_config.eos_token_id=499",
              "model.model_config.pad_token_id=499", "lr_schedule.learning_rate=1e-2", "lr_schedule.lr_end=1e-2",
              f"train_dataset.data_loader.dataset_dir={workdir / 'learnable.npy'}")
    got = records(out)
    curve, norms = [r["loss"] for r in got], [r["grad_norm"] for r in got]
    assert len(got) == STEPS and abs(curve[0] - np.log(500)) < 0.3, curve  # a fresh init predicts ~uniformly
    assert min(norms) > 0.1, norms  # measured 0.66 and more; an all-zero init gives 0.0
    assert curve[-1] < curve[0] - 0.5, curve  # measured: 6.20 -> 5.23
    config, state, _ = load_full_model_state(str(out / "checkpoint" / f"step_{STEPS:07d}"))
    assert config.padded_vocab_size == 512
    for name in ("transformer.wte.weight", "lm_head.weight"):  # no gradient reaches them: still the init's zeros
        assert state[name][500:].abs().max().item() == 0.0, name
    assert torch.equal(state["transformer.wte.weight"], state["lm_head.weight"])  # the head is still the embedding
    assert all(torch.isfinite(t).all() for t in weights(out / "final").values())


def test_only_modules_a_model_or_stage_holds_are_planned():
    """The tensor-parallel plan names every part of the LM and the classifier; a model or pipeline stage gets the
    entries of the parts it has (a stage before the last holds ln_f as None)."""
    from gpt2_ascend import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    from gpt2_ascend.parallel.tensor_parallel import _has_module
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64)
    lm, classifier = GPT2LMHeadModel(config), GPT2ForSequenceClassification(config)
    assert _has_module(lm, "lm_head") and _has_module(lm, "transformer.wte") and not _has_module(lm, "score")
    assert _has_module(classifier, "score") and not _has_module(classifier, "lm_head")
    lm.transformer.ln_f = None
    assert not _has_module(lm, "transformer.ln_f")


SEQUENCE_PARALLEL_PLACEMENTS = r"""
import json, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from gpt2_ascend import GPT2Config, GPT2LMHeadModel
from gpt2_ascend.parallel.tensor_parallel import apply_tensor_parallel
dist.init_process_group("gloo")
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64))
apply_tensor_parallel(model, init_device_mesh("cpu", (1,)), sequence_parallel=True)
seen = {}
block = model.transformer.h[0]
for name, module in [("drop", model.transformer.drop), ("attn.c_proj", block.attn.c_proj),
                     ("mlp.c_proj", block.mlp.c_proj), ("ln_f", model.transformer.ln_f)]:
    module.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, repr(tuple(o.placements))) and None)
model(torch.randint(0, 64, (2, 8)))
# replicate_parallel(): plain tensors in become Replicate DTensors, anything else (None, a DTensor) passes as is;
# the output is a plain tensor again
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import parallelize_module
from gpt2_ascend.parallel.tensor_parallel import replicate_parallel
class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), 2.0))
    def forward(self, x, y):
        seen.setdefault("kinds", []).append([type(x).__name__, type(y).__name__])
        return x * self.w if y is None else x * self.w + y
scale = parallelize_module(Scale(), init_device_mesh("cpu", (1,)), replicate_parallel())
x = torch.ones(3)
outputs = [scale(x, None), scale(DTensor.from_local(x, scale.w.device_mesh, [Replicate()]), x)]
seen["outputs"] = [[type(o).__name__, o.tolist()] for o in outputs]
print(json.dumps(seen))
dist.destroy_process_group()
"""


def test_sequence_parallel_keeps_the_residual_stream_split_on_the_sequence():
    """The point of sequence parallel: between the blocks' matrix products the activations stay sharded on the
    sequence dim (a reduce-scatter there, not an all-reduce); an equal loss would not show a plan that shards
    another dim and redistributes at every residual add. One rank, a mesh of one: the placements are the plan's.
    The same process checks replicate_parallel(), the style of the modules every rank keeps whole."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_port()), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", SEQUENCE_PARALLEL_PLACEMENTS], env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    names = ("drop", "attn.c_proj", "mlp.c_proj", "ln_f")
    assert {k: seen[k] for k in names} == {name: "(Shard(dim=1),)" for name in names}
    # the style of the modules every rank keeps whole (replicate_parallel), on its own
    assert seen["kinds"] == [["DTensor", "NoneType"], ["DTensor", "DTensor"]]
    assert seen["outputs"] == [["Tensor", [2.0, 2.0, 2.0]], ["Tensor", [3.0, 3.0, 3.0]]]
