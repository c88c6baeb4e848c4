"""Writes that fail (issue 12 items 11-13): no temporary is left behind on any failure path, the final rename's
included; a full disk is one line naming the directory and the bytes needed, and what was there before stays
intact; .ckpt files follow the umask like every other output.

A full disk is injected (the errors torch, numpy, safetensors and Python raise, copied from a real full tmpfs);
where the machine lets the test mount a 256 KB tmpfs, the same writers also run into a real one.
"""
import errno
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_config
from gpt2_ascend import GPT2LMHeadModel
from gpt2_ascend.mindspore_io.ckpt import CkptWriter, write_ckpt
from gpt2_ascend.data.store import save_blocks
from gpt2_ascend.fileio import DiskFullError, atomic_write
from gpt2_ascend import checkpoints as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a full disk raised on a real tmpfs (torch 2.13, numpy 2.4, safetensors 0.8)
TORCH_SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
NUMPY_SHORT_WRITE = OSError("1000000 requested and 131056 written")
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def leftovers(folder):
    """Hidden temporaries (.NAME.tmp-*, .step_*, *.old-*) anywhere under folder."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files
            if n.startswith(".") or ".old-" in n or ".tmp" in n]


def states(n=1000):
    return dict(model={"w": torch.arange(n, dtype=torch.float32)}, trainer={"step": 1})


def failing_after(real, error, when=lambda path: True):
    """A torch.save that writes a little, then fails as a full disk does."""
    def save(obj, path, *args, **kwargs):
        if when(str(path)):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 partial")
            raise error
        return real(obj, path, *args, **kwargs)
    return save


# ---------------------------------------------------------------------------------------------
# disk full (injected)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [TORCH_SHORT_WRITE, ENOSPC])
def test_checkpoint_on_a_full_disk_is_one_line_and_the_previous_stays(tmp_path, monkeypatch, error):
    root = str(tmp_path / "checkpoint")
    first = ckpt.save_checkpoint(root, 1, states(), json_files={"config.json": {"n": 1}})
    monkeypatch.setattr(torch, "save", failing_after(torch.save, error))
    with pytest.raises(DiskFullError) as e:
        ckpt.save_checkpoint(root, 2, states(), json_files={"config.json": {"n": 1}}, keep=1)
    message = str(e.value)
    where = re.escape(str(root))  # a temporary folder's name may hold regex characters ('+')
    assert re.fullmatch(rf"no space left on the disk of {where} while writing checkpoint step_0000002: it needs about "
                        rf"4\.0 KB \(4000 bytes\) and [\d.]+ [KMGT]?B is free there; free some space and run again "
                        rf"\(nothing that was there before was changed\)", message), message
    assert ckpt.list_checkpoints(root) == [(1, first)] and leftovers(root) == []  # keep=1 never pruned step 1
    assert ckpt.verify_checkpoint(first) and ckpt.load_checkpoint(first)["model"]["w"][-1] == 999


def test_train_cli_on_a_full_disk_exits_2_and_resumes_from_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """train.py in process: the save at step 4 finds the disk full; step 2 survives and --resume auto goes on."""
    from conftest import load_script
    np.save(tmp_path / "train.npy", np.random.default_rng(0).integers(0, 512, (40, 17)).astype(np.uint16))
    recipe = dict(device="cpu", seed=1, runner_config=dict(batch_size=2, max_steps=6, progress_bar=False),
                  model=dict(model_config=dict(seq_length=16, vocab_size=512, hidden_size=32, num_layers=1,
                                               num_heads=2, eos_token_id=511, pad_token_id=511)),
                  callbacks=[dict(type="CheckpointMonitor", save_checkpoint_steps=2, keep_checkpoint_max=5)],
                  train_dataset=dict(data_loader=dict(dataset_dir=str(tmp_path / "train.npy"))))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    train = load_script("train.py").main
    real_save = torch.save
    monkeypatch.setattr(torch, "save", failing_after(real_save, TORCH_SHORT_WRITE, lambda p: "step_0000004" in p))
    assert train(["--config", str(tmp_path / "tiny.yaml"), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: no space left on the disk of {out / 'checkpoint'} while writing checkpoint "
                              f"step_0000004: it needs about "), err
    assert "Traceback" not in "\n".join(err)
    root = str(out / "checkpoint")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2] and leftovers(root) == []
    monkeypatch.setattr(torch, "save", real_save)
    assert train(["--config", str(tmp_path / "tiny.yaml"), "--output_dir", str(out), "--resume", "auto"]) == 0
    said = capsys.readouterr()
    assert f"resumed from {root}/step_0000002" in said.out + said.err
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4, 6]


def test_export_convert_and_data_writes_on_a_full_disk(tmp_path, monkeypatch):
    model = GPT2LMHeadModel(tiny_config())
    model.save_pretrained(str(tmp_path / "final"))
    before = (tmp_path / "final" / "model.safetensors").read_bytes()
    from gpt2_ascend.hf import SafetensorsWriter

    def full(*args, **kwargs):
        raise ENOSPC
    monkeypatch.setattr(SafetensorsWriter, "write", full)
    where = re.escape(str(tmp_path))
    with pytest.raises(DiskFullError, match=rf"disk of {where} while writing {where}/final: it needs "
                                            rf"about [\d.]+ [KM]B \(\d+ bytes\)"):
        model.save_pretrained(str(tmp_path / "final"))  # tied head: its copy is not written
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before and leftovers(tmp_path) == []

    def short_write(self, name, dims, type_name, content):
        raise NUMPY_SHORT_WRITE
    monkeypatch.setattr(CkptWriter, "_write_record", short_write)
    with pytest.raises(DiskFullError, match=rf"while writing {where}/m\.ckpt: it needs about 48 bytes and"):
        with CkptWriter(str(tmp_path / "m.ckpt"), size=48) as w:
            w.write("a", torch.zeros(12))
    assert not (tmp_path / "m.ckpt").exists() and leftovers(tmp_path) == []

    def numpy_full(f, array, allow_pickle=True):
        raise NUMPY_SHORT_WRITE
    monkeypatch.setattr(np, "save", numpy_full)
    with pytest.raises(DiskFullError, match=r"while writing b.npy: it needs about 80 bytes and"):
        save_blocks(np.zeros((5, 8), np.uint16), str(tmp_path / "b.npy"), {})
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_sharded_checkpoint_on_a_full_disk_removes_its_temporary(tmp_path, monkeypatch):
    """save_sharded on a one-process gloo group: the disk fills while DCP writes; nothing is left behind."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from gpt2_ascend.parallel.checkpoint import save_sharded
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        root = tmp_path / "checkpoint"
        root.mkdir()
        save_sharded(str(root / "step_0000001"), model, optimizer, {"step": 1}, {"step": 1})

        def full(*args, **kwargs):
            raise ENOSPC
        monkeypatch.setattr(dcp, "save", full)
        where = re.escape(str(root))
        with pytest.raises(DiskFullError, match=rf"disk of {where} while writing checkpoint step_0000002: it needs "
                                                rf"about 248 bytes and"):  # weights 80, Adam's moments 160, steps 8
            save_sharded(str(root / "step_0000002"), model, optimizer, {"step": 2}, {"step": 2})
    finally:
        dist.destroy_process_group()
    assert sorted(os.listdir(root)) == ["step_0000001"]
    assert ckpt.verify_checkpoint(str(root / "step_0000001"))


# ---------------------------------------------------------------------------------------------
# temporaries on every failure path, the final rename's included
# ---------------------------------------------------------------------------------------------
def test_failed_final_renames_leave_no_temporaries(tmp_path, monkeypatch):
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(str(tmp_path / "a_dir"), lambda f: f.write(b"x"))
    (tmp_path / "a_file").write_text("x")
    model = GPT2LMHeadModel(tiny_config())
    where = re.escape(str(tmp_path))
    with pytest.raises(ValueError, match=rf"{where}/a_file is a file, not a directory"):
        model.save_pretrained(str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match=rf"{where}/a_dir is a directory: pass a .ckpt file name"):
        write_ckpt(str(tmp_path / "a_dir"), {"w": torch.zeros(2)})
    assert leftovers(tmp_path) == []

    real_replace = os.replace

    def fail_renames(monkeypatch, prefix, parent=False):
        """os.replace fails for the temporary named prefix* (or for the files inside it: parent=True)."""
        def replace(src, dst):
            name = os.path.basename(os.path.dirname(src) if parent else src)
            if name.startswith(prefix):
                raise PermissionError(errno.EACCES, "Permission denied", dst)
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)

    fail_renames(monkeypatch, ".m.ckpt.tmp-")
    with pytest.raises(PermissionError):
        write_ckpt(str(tmp_path / "m.ckpt"), {"w": torch.zeros(2)})
    fail_renames(monkeypatch, ".new_export.tmp-")
    with pytest.raises(PermissionError):
        model.save_pretrained(str(tmp_path / "new_export"))
    fail_renames(monkeypatch, ".a_dir.tmp-", parent=True)
    with pytest.raises(PermissionError):
        model.save_pretrained(str(tmp_path / "a_dir"))  # into an existing directory: file by file
    monkeypatch.setattr(os, "replace", real_replace)
    root = str(tmp_path / "checkpoint")
    first = ckpt.save_checkpoint(root, 1, states())
    fail_renames(monkeypatch, ".step_0000001.tmp-")
    with pytest.raises(PermissionError):
        ckpt.save_checkpoint(root, 1, states(5))  # the same step again: the old one is swapped back in
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.load_checkpoint(first)["model"]["w"].numel() == 1000
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file", "checkpoint"] and leftovers(tmp_path) == []
    assert os.listdir(tmp_path / "a_dir") == [] and os.listdir(root) == ["step_0000001"]


def test_converter_cli_into_a_file_is_one_line_without_temporaries(tmp_path):
    model = GPT2LMHeadModel(tiny_config())
    model.save_pretrained(str(tmp_path / "hf"))
    from gpt2_ascend.convert import hf_to_mindspore
    hf_to_mindspore(str(tmp_path / "hf"), str(tmp_path / "m.ckpt"))
    (tmp_path / "taken").write_text("x")
    proc = subprocess.run([sys.executable, "convert/mindspore_to_hf.py", "--mindspore_path", str(tmp_path / "m.ckpt"),
                           "--output_dir", str(tmp_path / "taken")], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'taken'} is a file, not a directory: pass another output directory", proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf", "m.ckpt", "taken"]


# ---------------------------------------------------------------------------------------------
# .ckpt files follow the umask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o077, 0o002, 0o022])
def test_ckpt_follows_the_umask_like_every_output(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_ckpt(str(tmp_path / "m.ckpt"), {"w": torch.zeros(2)})
        atomic_write(str(tmp_path / "other.json"), lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.ckpt").st_mode & 0o777 == 0o666 & ~mask
    assert os.stat(tmp_path / "m.ckpt").st_mode & 0o777 == os.stat(tmp_path / "other.json").st_mode & 0o777


# ---------------------------------------------------------------------------------------------
# a real full disk, where a tmpfs can be mounted (root with CAP_SYS_ADMIN); skipped elsewhere
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the injected tests above cover the same paths")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk(full_disk):
    root = str(full_disk / "checkpoint")
    first = ckpt.save_checkpoint(root, 1, states(100))
    where = re.escape(root)
    with pytest.raises(DiskFullError, match=rf"disk of {where} while writing checkpoint step_0000002: it needs "
                                            rf"about 400\.0 KB \(400000 bytes\) and [\d.]+ KB is free"):
        ckpt.save_checkpoint(root, 2, states(100_000))
    assert ckpt.load_checkpoint(first)["model"]["w"].numel() == 100
    with pytest.raises(DiskFullError, match="while writing .*export: it needs about"):
        GPT2LMHeadModel(tiny_config()).save_pretrained(str(full_disk / "export"))
    with pytest.raises(DiskFullError, match=r"while writing .*big.ckpt: it needs about 400\.0 KB"):
        write_ckpt(str(full_disk / "big.ckpt"), {"w": torch.zeros(100_000)})
    with pytest.raises(DiskFullError, match=r"while writing blocks.npy: it needs about 400\.0 KB"):
        save_blocks(np.zeros((1000, 200), np.uint16), str(full_disk / "blocks.npy"), {})
    assert sorted(os.listdir(full_disk)) == ["checkpoint"] and leftovers(str(full_disk)) == []
