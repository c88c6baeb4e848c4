"""Device selection, the torch_npu import guard, distributed backend, autocast and RNG state."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gpt2_ascend import device as dev
from npu_reference import REFERENCE_ROOT, npu_reference  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError


def test_auto_without_torch_npu_never_picks_npu(no_torch_npu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert not dev.npu_available()


def test_auto_prefers_cuda_over_cpu_when_no_npu(no_torch_npu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device(None) == torch.device("cuda")


def test_npu_without_torch_npu_fails_with_one_line_install_hint(no_torch_npu):
    with pytest.raises(RuntimeError) as err:
        dev.resolve_device("npu")
    message = str(err.value)
    assert "\n" not in message and "torch_npu is not installed" in message and "pip install '.[npu]'" in message
    with pytest.raises(RuntimeError, match="torch_npu is not installed"):
        dev.resolve_device("npu:3")


def test_npu_with_torch_npu_but_no_device_says_what_to_check(npu_reference, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")  # present but no NPU: auto skips it
    with pytest.raises(RuntimeError, match="finds no NPU.*ASCEND_RT_VISIBLE_DEVICES"):
        dev.resolve_device("npu")


def test_cuda_and_unknown_devices_fail_with_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU.*--device cpu"):
        dev.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'.*npu"):
        dev.resolve_device("tpu")


def test_dist_backend_per_device():
    assert dev.dist_backend("cpu") == "gloo"
    assert dev.dist_backend(torch.device("cuda:1")) == "nccl"
    assert dev.dist_backend("meta") == "gloo"


def test_autocast_settings():
    assert dev.autocast_dtype("cpu", "fp32") is None
    assert dev.autocast_dtype("cuda", "bf16") is torch.bfloat16
    assert dev.autocast_dtype("npu", "fp16") is torch.float16
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        dev.autocast_dtype("cpu", "int8")
    with dev.autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")
    with dev.autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_cpu_rng_state_round_trip():
    cpu = torch.device("cpu")
    dev.manual_seed(3, cpu)
    state = dev.rng_state(cpu)
    first = torch.rand(4)
    dev.set_rng_state(cpu, state)
    assert torch.equal(torch.rand(4), first)
    assert dev.max_memory_allocated(cpu) == 0 and dev.device_name(cpu) == "cpu"


# On a real NPU host, importing torch_npu renames PyTorch's PrivateUse1 backend to "npu" and registers
# torch.npu: only then does torch.device("npu") exist. That cannot be undone inside a process, so the
# checks that need an "npu" device run in a subprocess with the reference torch_npu doing the same.
NPU_DEVICE_SCRIPT = textwrap.dedent("""
    import json, torch, torch_npu
    torch_npu.emulate_device()
    torch_npu.npu.available = True
    from gpt2_ascend import device as dev
    res = {}
    res["auto"] = str(dev.resolve_device("auto"))
    res["explicit"] = str(dev.resolve_device("npu:0"))
    res["compile_modes"] = torch_npu.npu.compile_modes          # once per process, jit_compile=False
    npu = torch.device("npu:0")
    res["backend"] = dev.dist_backend(npu)
    dev.manual_seed(5, npu)
    state = dev.rng_state(npu)
    first = torch.rand(3, generator=torch_npu.npu._generator).tolist()
    dev.set_rng_state(npu, state)
    res["rng_round_trip"] = torch.rand(3, generator=torch_npu.npu._generator).tolist() == first
    dev.set_device(npu)
    dev.synchronize(npu)
    dev.reset_peak_memory(npu)
    res["events"] = [name for name, _ in torch_npu.npu.events]
    res["memory"] = dev.max_memory_allocated(npu)
    res["name"] = dev.device_name(npu)
    res["auto_attn"] = __import__("gpt2_ascend.ops", fromlist=["x"]).resolve_attn_implementation("auto", "npu")
    print(json.dumps(res))
""")


def test_npu_device_layer_with_an_npu_present():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REFERENCE_ROOT, REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", NPU_DEVICE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["auto"] == "npu" and res["explicit"] == "npu:0"  # npu first, before cuda and cpu
    assert res["compile_modes"] == [False]
    assert res["backend"] == "hccl"
    assert res["rng_round_trip"] is True
    assert res["events"] == ["set_device", "synchronize", "reset_peak_memory_stats"]
    assert res["memory"] == 0 and res["name"].startswith("Ascend910B")
    assert res["auto_attn"] == "npu"
