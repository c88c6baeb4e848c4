"""Malicious and damaged files through every loader entry point (issue 12): nothing a user hands us is unpickled
with arbitrary globals.

Each pickle-bearing fixture carries a `__reduce__` that would run `touch MARKER`. Every case runs a real CLI as a
subprocess and asserts: exit code 2, stderr's last line is one `error:` line naming the file, no traceback, and
no MARKER. The CLI runs go two at a time (most of their time is importing torch).
"""
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import yaml

from conftest import HANG_GUARD_S, tiny_config
from gpt2_ascend.mindspore_io.ckpt import CkptWriter, read_ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_CKPT = os.path.join(REPO, "tests", "fixtures", "mindspore_gpt2_micro.ckpt")


class Payload:
    """Unpickling this runs `touch marker` (os.system): what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------
# fixture builders
# ---------------------------------------------------------------------------------------------
def rehash(directory):
    """Rewrite manifest.json to match the files: whoever writes a directory can write its manifest."""
    path = os.path.join(directory, "manifest.json")
    manifest = json.load(open(path)) if os.path.isfile(path) else dict(format=1, step=1, meta={})
    files = {}
    for name in sorted(os.listdir(directory)):
        if name != "manifest.json":
            data = open(os.path.join(directory, name), "rb").read()
            files[name] = dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["files"] = files
    with open(path, "w") as f:
        json.dump(manifest, f)


def hf_config_dict():
    return tiny_config().to_hf_dict("GPT2LMHeadModel")


def hf_bin_dir(root, marker):
    """An HF model directory whose pytorch_model.bin pickles os.system."""
    d = root / "hf_bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config_dict()))
    torch.save({"transformer.wte.weight": Payload(marker)}, d / "pytorch_model.bin")
    return d


def training_checkpoint(root, marker, evil_file):
    """A single-process training checkpoint (model.pt, optimizer.pt, trainer.pt) with one file replaced."""
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend import checkpoints as ckpt
    model = GPT2LMHeadModel(tiny_config())
    path = ckpt.save_checkpoint(str(root / f"run_{evil_file}" / "checkpoint"), 1,
                                dict(model=model.state_dict(), optimizer={"state": {}}, trainer={"step": 1}),
                                json_files={"config.json": hf_config_dict()})
    torch.save({"state": Payload(marker)}, os.path.join(path, evil_file))
    rehash(path)
    return path


def sharded_checkpoint(root, marker, evil_file, name):
    """A sharded (DCP) checkpoint directory: `.metadata` (a pickle DCP reads) or a rank_N.pt that pickles
    os.system; the other files legitimate in form."""
    d = root / name / "checkpoint" / "step_0000001"
    d.mkdir(parents=True)
    meta = dict(model_config=hf_config_dict(), architecture="GPT2LMHeadModel", qkv_layout="per_head", step=1)
    (d / "config.json").write_text(json.dumps(meta))
    for rank in (0, 1):
        torch.save({"step": 1}, d / f"rank_{rank}.pt")
    (d / "__0_0.distcp").write_bytes(b"\0" * 64)
    if evil_file == ".metadata":
        (d / ".metadata").write_bytes(pickle.dumps(Payload(marker)))  # protocol 5: STACK_GLOBAL
    else:
        (d / ".metadata").write_bytes(pickle.dumps("not reached"))
        (d / evil_file).write_bytes(pickle.dumps({"step": Payload(marker)}, protocol=4))
    (d / "manifest.json").write_text(json.dumps(dict(format=1, step=1, meta=dict(sharded=True))))
    rehash(d)
    return d


def save_dcp(state, directory):
    """DCP's files for `state`, written by one process."""
    import warnings
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)


def sharded_dir(d, model_state, qkv_layout):
    """A legitimate sharded checkpoint of the tiny model as parallel/checkpoint.py lays it out: DCP's files of
    {"model": model_state}, config.json (the model and its c_attn layout) and the manifest."""
    save_dcp({"model": model_state}, d)
    meta = dict(model_config=hf_config_dict(), architecture="GPT2LMHeadModel", qkv_layout=qkv_layout, step=1)
    (d / "config.json").write_text(json.dumps(meta))
    (d / "manifest.json").write_text(json.dumps(dict(format=1, step=1, meta=dict(sharded=True))))
    rehash(d)
    return d


def crafted_ckpt(root, name, record):
    """The micro MindFormers GPT-2 with one record replaced by `record` = (dims, type, bytes), crc intact."""
    tensors = read_ckpt(MICRO_CKPT)
    path = root / f"{name}.ckpt"
    with CkptWriter(str(path)) as writer:
        for key, value in tensors.items():
            if key == "backbone.embedding.word_embedding.embedding_table":
                writer._write_record(key, *record)
            else:
                writer.write(key, value)
    return path


def truncated_ckpt(root):
    data = open(MICRO_CKPT, "rb").read()
    path = root / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


def adapter_dir(root, marker):
    """A LoRA adapter directory whose adapter_model.bin pickles os.system (peft reads it)."""
    d = root / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, bias="none",
        task_type=None, base_model_name_or_path=None)))
    torch.save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": Payload(marker)},
               d / "adapter_model.bin")
    return d


def tiny_model_dir(root):
    from gpt2_ascend import GPT2LMHeadModel
    d = root / "tiny_model"
    GPT2LMHeadModel(tiny_config()).save_pretrained(str(d))
    return d


def recipe_and_data(root):
    tokens = np.random.default_rng(0).integers(0, 511, size=(64, 17), dtype=np.uint16)
    np.save(root / "train.npy", tokens)
    np.save(root / "eval.npy", tokens[:8, :16])
    with open(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_tiny.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe.update(do_eval=False, data_cache_dir=str(root / "cache"))
    recipe["model"]["model_config"].update(seq_length=16, vocab_size=512, hidden_size=64, num_layers=2,
                                           num_heads=4, eos_token_id=511, pad_token_id=511, max_decode_length=16)
    recipe["runner_config"].update(batch_size=4, max_steps=2, progress_bar=False)
    recipe["train_dataset"]["data_loader"]["dataset_dir"] = str(root / "train.npy")
    recipe["eval_dataset"]["data_loader"]["dataset_dir"] = ""
    with open(root / "recipe.yaml", "w") as f:
        yaml.safe_dump(recipe, f)
    return root / "recipe.yaml"


# ---------------------------------------------------------------------------------------------
# through the CLIs as subprocesses: (name, command line, the file the error must name)
# ---------------------------------------------------------------------------------------------
def build_cases(root, marker):
    py = sys.executable
    recipe = str(recipe_and_data(root))
    hf = str(hf_bin_dir(root, marker))
    model_pt = training_checkpoint(root, marker, "model.pt")
    optimizer_pt = training_checkpoint(root, marker, "optimizer.pt")
    metadata = str(sharded_checkpoint(root, marker, ".metadata", "dcp_meta"))
    rank_file = str(sharded_checkpoint(root, marker, "rank_1.pt", "dcp_rank"))
    meta_resume = str(sharded_checkpoint(root, marker, ".metadata", "dcp_meta_resume"))
    huge = str(crafted_ckpt(root, "huge", ([1 << 40, 1 << 20], "Float32", torch.zeros(16, 8).numpy().tobytes())))
    out = str(root / "out")
    train = [py, "train.py", "--config", recipe]
    generate = [py, "generate.py", "--prompt", "hi", "--max_new_tokens", "2", "--device", "cpu", "--model"]
    evaluate = [py, "evaluate.py", "--eval_dataset_dir", str(root / "eval.npy"), "--seq_length", "16",
                "--device", "cpu", "--model"]
    merge = [py, "convert/merge_checkpoint.py", "--dst_dir", str(root / "merged"), "--src_ckpt_dir"]
    join = os.path.join
    cases = [
        ("hf_bin/generate", generate + [hf], join(hf, "pytorch_model.bin")),
        ("hf_bin/train_load_checkpoint", train + ["--output_dir", out + "1", "--load_checkpoint", hf],
         join(hf, "pytorch_model.bin")),
        ("hf_bin/hf_to_mindspore", [py, "convert/hf_to_mindspore.py", "--torch_path", hf, "--mindspore_path",
                                    str(root / "x.ckpt")], join(hf, "pytorch_model.bin")),
        ("model_pt/evaluate", evaluate + [model_pt], join(model_pt, "model.pt")),
        ("model_pt/merge_checkpoint", merge + [model_pt], join(model_pt, "model.pt")),
        ("optimizer_pt/train_resume", train + ["--output_dir", os.path.dirname(os.path.dirname(optimizer_pt)),
                                               "--resume", optimizer_pt], join(optimizer_pt, "optimizer.pt")),
        ("dcp_metadata/generate", generate + [metadata], join(metadata, ".metadata")),
        ("dcp_metadata/evaluate", evaluate + [metadata], join(metadata, ".metadata")),
        ("dcp_metadata/train_load_checkpoint", train + ["--output_dir", out + "2", "--load_checkpoint", metadata],
         join(metadata, ".metadata")),
        ("dcp_metadata/merge_checkpoint", merge + [metadata], join(metadata, ".metadata")),
        ("ckpt_huge_dims/mindspore_to_hf", [py, "convert/mindspore_to_hf.py", "--mindspore_path", huge, "--n_head",
                                            "2", "--output_dir", str(root / "hf_out")], huge),
    ]
    # under torchrun (2 ranks, started here as torchrun starts them): rank 1's own file, and DCP's metadata
    for name, path, named in [("dcp_rank_file/torchrun_resume", rank_file, join(rank_file, "rank_1.pt")),
                              ("dcp_metadata/torchrun_resume", meta_resume, join(meta_resume, ".metadata"))]:
        argv = train + ["--output_dir", os.path.dirname(os.path.dirname(path)), "--resume", path, "--use_parallel",
                        "True", "parallel.data_parallel=2"]
        cases.append((name, ("ranks", argv), named))
    return cases


def _port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(argv):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    if argv[0] != "ranks":
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        return proc.returncode, proc.stderr
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [subprocess.Popen(argv[1], cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    (_, err0), (_, err1) = (p.communicate(timeout=HANG_GUARD_S) for p in procs)
    if procs[1].returncode != 2 or "Traceback" in err1 or "error:" in err1:  # rank 0 speaks for both
        return procs[1].returncode, "rank 1: " + err1
    return procs[0].returncode, err0


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "MARKER"
    cases = build_cases(root, marker)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: run_case(case[1]), cases))
    return {name: (code, err, named) for (name, _, named), (code, err) in zip(cases, results)}, marker


CASE_NAMES = ["hf_bin/generate", "hf_bin/train_load_checkpoint", "hf_bin/hf_to_mindspore", "model_pt/evaluate",
              "model_pt/merge_checkpoint", "optimizer_pt/train_resume", "dcp_metadata/generate",
              "dcp_metadata/evaluate", "dcp_metadata/train_load_checkpoint", "dcp_metadata/merge_checkpoint",
              "ckpt_huge_dims/mindspore_to_hf", "dcp_rank_file/torchrun_resume", "dcp_metadata/torchrun_resume"]


def assert_one_line_error(code, err, named):
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("error: ") and named in lines[-1], err[-3000:]
    return lines[-1]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_file_is_refused_in_one_line(outcomes, case):
    results, marker = outcomes
    code, err, named = results[case]
    last = assert_one_line_error(code, err, named)
    if not case.startswith("ckpt_"):
        assert "refusing to load" in last and "posix.system" in last, last
    assert not marker.exists(), f"{case}: the pickle ran"


def test_every_case_is_checked(outcomes):
    assert sorted(outcomes[0]) == sorted(CASE_NAMES)


# ---------------------------------------------------------------------------------------------
# the same CLIs in process, for the variants of one entry point
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, record", [
    ("negative", ([-1, 8], "Float32", torch.zeros(16, 8).numpy().tobytes())),
    ("int", ([16, 8], "Int32", torch.zeros(16, 8).numpy().tobytes())),
    ("float99", ([16, 8], "Float99", torch.zeros(16, 8).numpy().tobytes())),
    ("short", ([16, 8], "Float32", torch.zeros(16, 7).numpy().tobytes())),
    ("truncated", None),
])
def test_crafted_mindspore_ckpt_is_one_line(tmp_path, capsys, name, record):
    from conftest import load_script
    path = truncated_ckpt(tmp_path) if record is None else crafted_ckpt(tmp_path, name, record)
    code = load_script("convert/mindspore_to_hf.py").main(["--mindspore_path", str(path), "--n_head", "2",
                                                            "--output_dir", str(tmp_path / "out")])
    last = assert_one_line_error(code, capsys.readouterr().err, str(path))
    assert {"int": "type Int32", "float99": "type Float99", "negative": "dims [-1, 8]",
            "short": "448 bytes of data but dims [16, 8] of Float32 need 512", "truncated": "truncated"}[name] in last
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no output, no temporary


def test_pickled_numpy_data_and_adapter_are_refused(tmp_path, capsys):
    from conftest import load_script
    marker = tmp_path / "MARKER"
    recipe = recipe_and_data(tmp_path)
    np.save(tmp_path / "evil.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    code = load_script("train.py").main(["--config", str(recipe), "--output_dir", str(tmp_path / "out"),
                                         "--train_dataset_dir", str(tmp_path / "evil.npy")])
    assert_one_line_error(code, capsys.readouterr().err, str(tmp_path / "evil.npy"))
    adapter = adapter_dir(tmp_path, marker)
    code = load_script("generate.py").main(["--model", str(tiny_model_dir(tmp_path)), "--adapter", str(adapter),
                                            "--prompt", "hi", "--max_new_tokens", "2", "--device", "cpu"])
    last = assert_one_line_error(code, capsys.readouterr().err, str(adapter / "adapter_model.bin"))
    assert "refusing to load" in last and "posix.system" in last
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# in process: DCP's non-tensor values, and what a legitimate DCP checkpoint still loads
# ---------------------------------------------------------------------------------------------
def test_dcp_values_are_read_weights_only(tmp_path):
    """A DCP checkpoint whose non-tensor value (an optimizer hyperparameter's slot) pickles os.system: DCP's own
    planner would run it (torch.load(weights_only=False)); ours refuses, naming the checkpoint and the value."""
    import warnings
    import torch.distributed.checkpoint as dcp
    from gpt2_ascend.safe_dcp import dcp_load
    from gpt2_ascend.safe_pickle import UnsafeFileError
    marker = tmp_path / "MARKER"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "lr": Payload(marker)}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
        state = {"w": torch.zeros(3), "lr": 0.0}
        with pytest.raises(UnsafeFileError, match=r"refusing to load .*ck \(the value of lr\).*posix.system"):
            dcp_load(state, str(tmp_path / "ck"), no_dist=True)
        assert not marker.exists()
        good = {"w": torch.ones(3), "lr": 0.25, "betas": (0.9, 0.95), "names": ["a", "b"]}
        dcp.save(good, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
        back = {"w": torch.zeros(3), "lr": 0.0, "betas": (0.0, 0.0), "names": []}
        dcp_load(back, str(tmp_path / "ok"), no_dist=True)
    assert torch.equal(back["w"], torch.ones(3)) and back["lr"] == 0.25 and back["betas"] == (0.9, 0.95)
    assert back["names"] == ["a", "b"]


def test_dcp_metadata_pointing_outside_the_directory_is_refused(tmp_path):
    import warnings
    import torch.distributed.checkpoint as dcp
    from gpt2_ascend.safe_dcp import read_dcp_metadata
    from gpt2_ascend.checkpoints import CheckpointError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path), no_dist=True)
    metadata = read_dcp_metadata(str(tmp_path))  # what a real .metadata holds reads back
    assert list(metadata.state_dict_metadata) == ["w"]
    for outside in ("../../etc/passwd", "sub/__0_0.distcp"):  # DCP writes its data files beside .metadata
        for info in metadata.storage_data.values():
            info.relative_path = outside
        (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(CheckpointError, match=f"points at '{outside}', not a file of the checkpoint directory$"):
            read_dcp_metadata(str(tmp_path))
    (tmp_path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt .metadata"):
        read_dcp_metadata(str(tmp_path))


def test_dcp_metadata_declaring_more_model_bytes_than_the_files_hold_is_refused(tmp_path):
    """Before anything is allocated, the model tensors `.metadata` declares must fit in the .distcp files: 15 float32
    (60 bytes) fit in 60 bytes, not in 59; tensors outside the model (an optimizer's) are not counted."""
    import warnings
    import torch.distributed.checkpoint as dcp
    from gpt2_ascend.checkpoints import CheckpointError
    from gpt2_ascend.safe_dcp import model_tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model.w": torch.ones(3, 5), "optimizer.m": torch.ones(100)}, checkpoint_id=str(tmp_path),
                 no_dist=True)
    (data,) = [f for f in os.listdir(tmp_path) if f.endswith(".distcp")]
    (tmp_path / data).write_bytes(b"\0" * 60)
    assert model_tensors(str(tmp_path)) == {"model.w": (torch.Size([3, 5]), torch.float32)}
    (tmp_path / data).write_bytes(b"\0" * 59)
    with pytest.raises(CheckpointError, match=r"it declares 60 bytes of weights but its \.distcp files hold 59$"):
        model_tensors(str(tmp_path))


def test_a_metadata_of_allowed_classes_that_is_not_dcp_metadata_is_one_line(tmp_path):
    """Allowed classes put together wrongly: an OrderedDict, or a Metadata whose state_dict_metadata is no dict."""
    from torch.distributed.checkpoint.metadata import Metadata
    from gpt2_ascend.checkpoints import CheckpointError
    from gpt2_ascend.safe_dcp import read_dcp_metadata
    from collections import OrderedDict
    for wrong in (OrderedDict(), Metadata(state_dict_metadata=None)):
        (tmp_path / ".metadata").write_bytes(pickle.dumps(wrong))
        with pytest.raises(CheckpointError, match=r"has a corrupt \.metadata \(not DCP metadata\)$"):
            read_dcp_metadata(str(tmp_path))


def test_a_dcp_failure_is_one_line_with_the_root_causes_first_line(tmp_path, monkeypatch):
    """DCP wraps each rank's exception (with its traceback) in a CheckpointException; the line shown is the root
    cause's type and first line, whatever follows it."""
    import gpt2_ascend.safe_dcp as safe_dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from gpt2_ascend.checkpoints import CheckpointError
    monkeypatch.setattr(safe_dcp, "read_dcp_metadata", lambda path: None)
    cause = ValueError("Size mismatch for model.w\n  saved [3], current [4]\n")

    def failing_load(*args, **kwargs):
        raise CheckpointException("load", {0: (cause, "Traceback ...")})
    monkeypatch.setattr(safe_dcp.dcp, "load", failing_load)
    with pytest.raises(CheckpointError) as error:
        safe_dcp.dcp_load({}, str(tmp_path))
    assert str(error.value) == f"checkpoint {tmp_path} cannot be loaded (ValueError: Size mismatch for model.w)"


def test_a_metadata_that_fails_to_unpickle_is_one_line_with_the_errors_first_line(tmp_path, monkeypatch):
    """DCP's own classes can fail while they are built: a TensorProperties whose memory-format code is not one
    (here text of two lines) raises in its __setstate__. The line shown is the error's type and first line."""
    from torch.distributed.checkpoint.metadata import TensorProperties
    from gpt2_ascend.checkpoints import CheckpointError
    from gpt2_ascend.safe_dcp import read_dcp_metadata
    save_dcp({"model.w": torch.ones(3)}, tmp_path)
    metadata = read_dcp_metadata(str(tmp_path))
    monkeypatch.setattr(TensorProperties, "__getstate__",
                        lambda self: (torch.float32, torch.strided, False, "no code\nits second line", False))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.undo()
    with pytest.raises(CheckpointError) as error:
        read_dcp_metadata(str(tmp_path))
    assert re.fullmatch(rf"checkpoint {re.escape(str(tmp_path))} has a corrupt \.metadata \(RuntimeError: "
                        rf"[^\n]*: no code\)", str(error.value)), str(error.value)


def test_a_metadata_without_storage_meta_loads(tmp_path):
    """DCP metadata need not carry a StorageMeta (a storage writer reports none by default; DCP's file writer
    reports one): the reader gives it one to record its load id, and the checkpoint loads."""
    import warnings
    from gpt2_ascend.safe_dcp import dcp_load, read_dcp_metadata
    save_dcp({"w": torch.arange(3.0)}, tmp_path)
    metadata = read_dcp_metadata(str(tmp_path))
    assert metadata.storage_meta is not None  # as this torch writes it
    metadata.storage_meta = None
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    state = {"w": torch.zeros(3)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(state, str(tmp_path), no_dist=True)
    assert state["w"].tolist() == [0.0, 1.0, 2.0]


def test_model_tensors_are_every_model_entry_with_a_possible_shape_and_dtype(tmp_path):
    """model_tensors lists the model's tensors wherever .metadata puts them (here after an optimizer's), accepts an
    empty dimension and refuses a negative one or a dtype that is not torch's, in one line, before any allocation."""
    from gpt2_ascend.checkpoints import CheckpointError
    from gpt2_ascend.safe_dcp import model_tensors, read_dcp_metadata
    save_dcp({"optimizer.m": torch.ones(2), "model.w": torch.ones(3, 5)}, tmp_path)
    metadata = read_dcp_metadata(str(tmp_path))
    assert list(metadata.state_dict_metadata) == ["optimizer.m", "model.w"]
    assert model_tensors(str(tmp_path)) == {"model.w": (torch.Size([3, 5]), torch.float32)}
    item = metadata.state_dict_metadata["model.w"]
    for size, dtype, refused in ((torch.Size([0, 5]), torch.float32, None),
                                 (torch.Size([-1, 5]), torch.float32, "shape torch.Size([-1, 5]), dtype torch.float32"),
                                 (torch.Size([3, 5]), "float32", "shape torch.Size([3, 5]), dtype float32")):
        item.size, item.properties.dtype = size, dtype
        (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
        if refused is None:
            assert model_tensors(str(tmp_path)) == {"model.w": (size, dtype)}
            continue
        with pytest.raises(CheckpointError) as error:
            model_tensors(str(tmp_path))
        assert str(error.value) == f"checkpoint {tmp_path} has a corrupt .metadata (model.w: {refused})"


def test_a_sharded_checkpoints_config_json_is_checked_and_completed(tmp_path):
    """read_meta: what a config.json leaves out gets its default (HF's c_attn layout, not LoRA, no step, no layout);
    a step from 0 and layout degrees from 1 are read, one below is refused in one line, as is a missing file."""
    from gpt2_ascend.checkpoints import CheckpointError
    from gpt2_ascend.safe_dcp import read_meta
    file = tmp_path / "config.json"
    base = dict(model_config=hf_config_dict(), architecture="GPT2LMHeadModel")
    file.write_text(json.dumps(base))
    meta = read_meta(str(tmp_path))
    assert (meta["qkv_layout"], meta["lora"], meta["step"], meta["layout"]) == ("hf", False, None, None)
    file.write_text(json.dumps(dict(base, step=0, layout={"data_parallel": 1, "tensor_parallel": 2})))
    meta = read_meta(str(tmp_path))
    assert meta["step"] == 0 and meta["layout"] == {"data_parallel": 1, "tensor_parallel": 2}
    for wrong, said in (({"step": -1}, "bad value -1 for 'step' in {file}: expected an integer in [0, "),
                        ({"layout": {"data_parallel": 0}},
                         "bad value 0 for 'layout.data_parallel' in {file}: expected an integer in [1, "),
                        (None, "[Errno 2] No such file or directory: '{file}')")):
        if wrong is None:
            file.unlink()
        else:
            file.write_text(json.dumps(dict(base, **wrong)))
        with pytest.raises(CheckpointError) as error:
            read_meta(str(tmp_path))
        assert str(error.value).startswith(f"checkpoint {tmp_path} has a corrupt config.json ({said.format(file=file)}")


def test_a_sharded_checkpoint_reads_back_whole_from_either_qkv_layout(tmp_path):
    """load_full_model_state gives the model's state in HF's c_attn layout whichever layout the checkpoint holds
    (torchrun runs save tensor-parallel ones per head), with its config and head."""
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.hf import convert_qkv_state
    from gpt2_ascend.safe_dcp import load_full_model_state
    config = tiny_config()
    state = GPT2LMHeadModel(config).state_dict()
    per_head = convert_qkv_state(state, config.n_embd, config.n_head, to="per_head")
    assert not torch.equal(per_head["transformer.h.0.attn.c_attn.weight"], state["transformer.h.0.attn.c_attn.weight"])
    for layout, saved in (("hf", state), ("per_head", per_head)):
        back_config, back, architecture = load_full_model_state(str(sharded_dir(tmp_path / layout, saved, layout)))
        assert back_config == config and architecture == "GPT2LMHeadModel"
        assert sorted(back) == sorted(state)
        assert all(torch.equal(back[key], state[key]) for key in state), layout


RANK_1 = """if True:  # rank 1 of 2: a resume reads the checkpoint with rank 0, then waits while rank 0 alone exports it
    import datetime, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    dist.init_process_group("gloo", init_method=sys.argv[1], rank=1, world_size=2,
                            timeout=datetime.timedelta(seconds=float(sys.argv[3])))
    dcp.load({"model": {"transformer.wte.weight": torch.zeros(512, 64)}}, checkpoint_id=sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()
"""


def test_in_a_torchrun_group_ranks_read_a_checkpoint_together_and_rank_0_alone_reads_it_whole(tmp_path):
    """Two ranks, this process and a child. A resume's dcp_load (parallel/checkpoint.py) reads with every rank, as
    DCP does in a process group (no 'single process' warning); the final export is rank 0 alone reading the whole
    model (load_full_model_state) while the others wait at a barrier: no collective, which would wait for them
    forever (HANG_GUARD_S, the group's timeout, is the last guard)."""
    import datetime
    import warnings
    import torch.distributed as dist
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.safe_dcp import dcp_load, load_full_model_state
    state = GPT2LMHeadModel(tiny_config()).state_dict()
    path = str(sharded_dir(tmp_path / "step_0000001", state, "hf"))
    store = f"file://{tmp_path / 'store'}"
    child = subprocess.Popen([sys.executable, "-c", RANK_1, store, path, str(HANG_GUARD_S)],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    try:
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=2,
                                timeout=datetime.timedelta(seconds=HANG_GUARD_S))
        try:
            resumed = {"model": {"transformer.wte.weight": torch.zeros(512, 64)}}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dcp_load(resumed, path)
            assert not [w for w in caught if "single process" in str(w.message)], [str(w.message) for w in caught]
            assert torch.equal(resumed["model"]["transformer.wte.weight"], state["transformer.wte.weight"])
            _, whole, _ = load_full_model_state(path)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        _, err = child.communicate(timeout=HANG_GUARD_S)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:  # this rank failed first: the child's group is gone
            child.kill()
            child.communicate()
    assert all(torch.equal(whole[key], state[key]) for key in state)


class Reduced:
    """Unpickling this calls `func(*args)`: the builtins a widened allow-list would let through."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# The allow-list, pinned: a change to it is a decision, made here too (see docs/reliability.md).
DCP_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
                                              "MetadataIndex", "StorageMeta"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "WindowsPath"},  # where Python 3.13 defines them
    "collections": {"OrderedDict"},
}


def test_dcp_metadata_allow_list_is_dcps_classes_and_nothing_that_runs_code(tmp_path):
    """The allow-list itself: exactly the pinned entries, each a class (DCP's metadata dataclasses, torch.Size, the
    path classes, OrderedDict) or torch.serialization._get_layout (a lookup of torch's layouts by name), plus torch's
    dtypes; no function that runs what it is given (builtins.eval, getattr, exec, __import__, os.system). A real
    `.metadata` (a model and its AdamW state, saved by DCP) names only allowed globals (recorded by an unpickler
    that builds them: the file is ours). Pickles calling eval or getattr are refused and run nothing."""
    import importlib
    import warnings
    import torch.distributed.checkpoint as dcp
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.safe_dcp import DCP_METADATA_CLASSES, _dcp_metadata_class, read_dcp_metadata
    from gpt2_ascend.safe_pickle import UnsafeFileError
    from gpt2_ascend.train.optim import build_optimizer
    assert DCP_METADATA_CLASSES == DCP_ALLOWED
    for module, names in DCP_METADATA_CLASSES.items():
        for name in names:
            if module == "pathlib._local" and not hasattr(importlib.import_module("pathlib"), "_local"):
                continue  # Python < 3.13
            found = getattr(importlib.import_module(module), name)
            assert isinstance(found, type) or found is torch.serialization._get_layout, f"{module}.{name}"
    from_torch = {name for name in dir(torch) if _dcp_metadata_class("torch", name)}
    assert from_torch == {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
    for module, name in [("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "setattr"),
                         ("builtins", "__import__"), ("builtins", "open"), ("os", "system"), ("posix", "system"),
                         ("subprocess", "Popen"), ("torch", "load"), ("torch.serialization", "load"),
                         ("pathlib", "Path.write_text"), ("collections", "namedtuple")]:
        assert not _dcp_metadata_class(module, name), f"{module}.{name}"

    model = GPT2LMHeadModel(tiny_config())
    optimizer = build_optimizer(model, 1e-3)
    model(torch.randint(0, 500, (2, 8)), labels=torch.randint(0, 500, (2, 8))).loss.backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp_path / "real"),
                 no_dist=True)

    class Recording(pickle.Unpickler):
        named = set()

        def find_class(self, module, name):
            self.named.add((module, name))
            return super().find_class(module, name)

    with open(tmp_path / "real" / ".metadata", "rb") as f:
        Recording(f).load()
    assert {("torch.distributed.checkpoint.metadata", "Metadata"), ("torch", "Size")} <= Recording.named
    assert all(_dcp_metadata_class(module, name) for module, name in Recording.named), Recording.named
    read_dcp_metadata(str(tmp_path / "real"))

    marker = tmp_path / "MARKER"
    for name, payload in [("eval", Reduced(eval, f"open({str(marker)!r}, 'w').close()")),
                          ("getattr", Reduced(getattr, pickle.Unpickler, "load"))]:
        (tmp_path / "real" / ".metadata").write_bytes(pickle.dumps(payload))
        with pytest.raises(UnsafeFileError, match=f"builtins.{name}, which could run code"):
            read_dcp_metadata(str(tmp_path / "real"))
    assert not marker.exists()


def test_refusal_names_the_global_for_every_pickle_protocol(tmp_path):
    from gpt2_ascend.safe_pickle import UnsafeFileError, torch_load
    marker = tmp_path / "MARKER"
    for protocol in (0, 2, 4, 5):
        path = tmp_path / f"p{protocol}.pt"
        path.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=protocol))
        with pytest.raises(UnsafeFileError, match=rf"refusing to load {re.escape(str(path))}: .* type posix.system"):
            torch_load(str(path))
    torch.save({"w": torch.ones(2), "step": 3, "names": ["x"]}, tmp_path / "ok.pt")
    assert torch_load(str(tmp_path / "ok.pt"))["step"] == 3
    (tmp_path / "short.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read .*short.pt: .*\(corrupt, truncated"):
        torch_load(str(tmp_path / "short.pt"))
    assert not marker.exists()


def test_refusal_of_bytes_in_memory_names_the_global_and_damage_is_one_line(tmp_path):
    """DCP's non-tensor values reach torch_load as bytes in memory (a file object): a bare protocol-4 payload there
    (its only strings the module and the name: read by disassembly, torch's message does not name it) is refused by
    name; a pickle too damaged to read is a damaged file; a missing or unreadable path is one plain line."""
    import io
    from gpt2_ascend.safe_pickle import UnsafeFileError, torch_load
    marker = tmp_path / "MARKER"
    data = io.BytesIO(pickle.dumps(Payload(marker), protocol=4))
    data.read(7)  # a stream not at its start: the refusal reads the pickle from its first byte
    with pytest.raises(UnsafeFileError, match=r"^refusing to load the value: .* type posix\.system, which could"):
        torch_load(data, name="the value")
    with pytest.raises(ValueError, match=r"^damaged is not a valid checkpoint: it is not a PyTorch file"):
        torch_load(io.BytesIO(b"\x80\x04\x95\xff\xff"), name="damaged")  # a FRAME cut short: damage, not a threat
    # naming the global reads at most the first 16 MiB of a file: a payload just inside is named, one just past it
    # is refused unnamed, as not a checkpoint (a hostile file of any size costs 16 MiB to refuse)
    for pad, error, message in (((1 << 24) - 200, UnsafeFileError, "type posix.system, which could run code"),
                                (1 << 24, ValueError, "big is not a valid checkpoint: it is not a PyTorch file")):
        path = tmp_path / "big.pt"
        path.write_bytes(pickle.dumps({"pad": b"\0" * pad, "w": Payload(marker)}, protocol=4))
        for source in (str(path), io.BytesIO(path.read_bytes())):  # a file, or bytes in memory
            with pytest.raises(error, match=re.escape(message)):
                torch_load(source, name="big")
    assert not marker.exists()  # refused, never run
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError) as error:
        torch_load(missing)
    assert str(error.value) == f"file not found: {missing}"
    with pytest.raises(ValueError, match=rf"^cannot read {re.escape(str(tmp_path))}: .* \(corrupt, truncated or not"):
        torch_load(str(tmp_path))
    assert not marker.exists()


def test_a_protocol_4_global_is_named_by_the_two_strings_before_it_when_both_are_identifiers(tmp_path):
    """protocol 4's STACK_GLOBAL (torch's refusal does not name it) takes its module and name from the two strings
    pushed last: keys before them, spaces and all, do not hide the global; a "module" that is no identifier names no
    global (random bytes); a global of one memoized string twice names none, and the next global is named."""
    import io
    from gpt2_ascend.safe_pickle import UnsafeFileError, torch_load
    marker = tmp_path / "MARKER"
    keys_first = pickle.dumps({"x": 0, "y": 0, "my weights": Payload(marker)}, protocol=4)
    no_identifier = b"\x80\x04\x8c\x03a b\x8c\x06system\x93."  # "a b" "system" STACK_GLOBAL STOP
    memoized = b"\x80\x04\x8c\x05posix\x94h\x00\x93\x8c\x05posix\x8c\x06system\x93."  # then posix.system
    for data in (keys_first, memoized):
        with pytest.raises(UnsafeFileError, match=r"^refusing to load f: it contains a pickled object of type "
                                                  r"posix\.system, which"):
            torch_load(io.BytesIO(data), name="f")
    with pytest.raises(ValueError, match=r"^f is not a valid checkpoint: it is not a PyTorch file of tensors"):
        torch_load(io.BytesIO(no_identifier), name="f")
    assert not marker.exists()


def zip_checkpoint_naming_record(path, key):
    """torch.save's file of {"w": tensor} whose pickle names the tensor's record `key`, a record the zip does not hold
    (it holds "0"): a damaged checkpoint."""
    import zipfile
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):  # protocol 2: the key is BINUNICODE "0"
                assert data.count(b"X\x01\x00\x00\x000") == 1
                data = data.replace(b"X\x01\x00\x00\x000", b"X" + len(key).to_bytes(4, "little") + key.encode())
            z.writestr(info, data)


def test_a_missing_tensor_record_is_one_line_with_the_errors_first_line_with_or_without_mmap(tmp_path):
    """torch's error names the record it misses, so a name can say anything: the line shows the error's first line
    (a name with a newline cuts it there), and a name saying "mmap" is still this error, not the legacy format's
    refusal of mmap; that format itself is read without mmap when mmap is asked for."""
    from gpt2_ascend.safe_pickle import torch_load
    path = tmp_path / "damaged.pt"
    for key, shown in (("lost\nrecord", "data/lost"), ("mmap", "data/mmap")):
        zip_checkpoint_naming_record(path, key)
        for mmap in (False, True):
            with pytest.raises(ValueError) as error:
                torch_load(str(path), mmap=mmap)
            assert re.fullmatch(rf"cannot read {re.escape(str(path))}: [^\n]*{shown}[^\n]* \(corrupt, truncated or "
                                rf"not a PyTorch weights file\)", str(error.value)), (key, mmap, str(error.value))
    torch.save({"w": torch.arange(3.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch_load(str(tmp_path / "legacy.pt"), mmap=True)["w"].tolist() == [0.0, 1.0, 2.0]


def test_merge_needs_only_the_model_files(tmp_path, capsys):
    """A damaged optimizer.pt does not stop merging (or evaluating) the weights; a damaged model.pt does, in one line."""
    from conftest import load_script
    from gpt2_ascend import GPT2LMHeadModel
    from gpt2_ascend.loading import load_model
    from gpt2_ascend import checkpoints as ckpt
    model = GPT2LMHeadModel(tiny_config())
    path = ckpt.save_checkpoint(str(tmp_path / "checkpoint"), 3, dict(model=model.state_dict(),
                                optimizer={"state": {}}, trainer={"step": 3}),
                                json_files={"config.json": hf_config_dict()})
    with open(os.path.join(path, "optimizer.pt"), "r+b") as f:
        f.truncate(10)
    merge = load_script("convert/merge_checkpoint.py").main
    assert merge(["--src_ckpt_dir", path, "--dst_dir", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged"))
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), model.state_dict().values()))
    loaded = load_model(path, device="cpu")
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    with open(os.path.join(path, "model.pt"), "r+b") as f:
        f.truncate(10)
    capsys.readouterr()
    assert merge(["--src_ckpt_dir", path, "--dst_dir", str(tmp_path / "merged2")]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "model.pt has 10 bytes, the manifest says")


def test_a_state_dict_with_a_value_or_key_that_is_not_a_tensor_entry_is_one_line():
    # a mutant of safe_pickle.py (`or` -> `and`, and a check loop that never ran) survived: every entry is checked;
    # a long key is shown by its first 80 characters, text by its first 40
    from gpt2_ascend.safe_pickle import tensor_dict
    good = {"w": torch.zeros(2)}
    assert tensor_dict(good, "f") is good
    for state, said in (({"w": torch.zeros(1), "b": "some text"}, "its entry 'b' holds text ('some text'), not a tensor"),
                        ({7: torch.zeros(1)}, "its key '7' is not a parameter name"),
                        ({10 ** 99: torch.zeros(1)}, f"its key '1{'0' * 79}' is not a parameter name"),
                        ({"k" * 99: "t" * 99}, f"its entry '{'k' * 80}' holds text ('{'t' * 40}'), not a tensor"),
                        (["w"], "it holds a list, not a state dict of tensors")):
        with pytest.raises(ValueError) as error:
            tensor_dict(state, "f")
        assert str(error.value) == f"f is not a valid checkpoint: {said}"
