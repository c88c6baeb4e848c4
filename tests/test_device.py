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
from conftest import HANG_GUARD_S

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


@pytest.mark.parametrize("version", ["2.7.1", "2.10.0.post2", "2.10.0.post4"])
def test_npu_loss_scalers_are_torch_npus_called_with_keywords(npu_reference, version):
    """Up to 26.0.x torch_npu's sharded scaler takes no device argument (torch's ShardedGradScaler("npu", ...)
    call, which its import redirects to that class, fails there); from 26.1.0 it takes one."""
    npu_reference.set_version(version)
    settings = dict(init_scale=1024.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=7)
    sharded = dev.grad_scaler("npu", sharded=True, **settings)
    assert isinstance(sharded, npu_reference.npu.amp.sharded_grad_scaler._ShardedGradScaler)
    single = dev.grad_scaler("npu", **settings)
    assert type(single) is npu_reference.npu.amp.GradScaler
    for scaler in (sharded, single):
        assert (scaler._init_scale, scaler._growth_factor, scaler._backoff_factor, scaler._growth_interval) == \
            (1024.0, 4.0, 0.25, 7)
        assert scaler.scale(torch.ones(())).item() == 1024.0


def test_loss_scalers_elsewhere_are_torchs(no_torch_npu):
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    sharded = dev.grad_scaler("cpu", sharded=True, init_scale=8.0)
    assert type(sharded) is ShardedGradScaler and sharded._device == "cpu" and sharded._init_scale == 8.0
    single = dev.grad_scaler("cpu", init_scale=8.0)
    assert type(single) is torch.amp.GradScaler and single._device == "cpu"


def test_compile_on_npu_needs_torch_npus_inductor_backend(npu_reference):
    npu_reference.set_version("2.5.1.post1")  # no torch_npu/_inductor before 2.6.0
    with pytest.raises(RuntimeError) as err:
        dev.require_compile_backend("npu")
    message = str(err.value)
    assert "\n" not in message and "torch_npu 2.5.1.post1" in message and "runner_config.compile: false" in message
    dev.require_compile_backend("cpu")  # other devices compile with what torch has
    npu_reference.set_version("2.7.1")
    dev.require_compile_backend("npu")
    assert "torch_npu._inductor" in sys.modules  # imported: that registers the backend


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
                          text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["auto"] == "npu" and res["explicit"] == "npu:0"  # npu first, before cuda and cpu
    assert res["compile_modes"] == [False]
    assert res["backend"] == "hccl"
    assert res["rng_round_trip"] is True
    assert res["events"] == ["set_device", "synchronize", "reset_peak_memory_stats"]
    assert res["memory"] == 0 and res["name"].startswith("Ascend910B")
    assert res["auto_attn"] == "npu"


TRAIN_WITH_COMPILE_ON_NPU = textwrap.dedent("""
    import sys, torch_npu
    torch_npu.emulate_device()
    torch_npu.npu.available = True
    torch_npu.set_version("2.5.1.post1")
    sys.path.insert(0, ".")
    import train
    sys.exit(train.main(["--config", "configs/gpt2/pretrain_gpt2_tiny.yaml", "--device", "npu",
                         "--output_dir", sys.argv[1], "runner_config.compile=true"]))
""")


def test_train_cli_refuses_compile_on_an_npu_without_a_backend(tmp_path):
    """The one line comes before any data or model work (nothing is written)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REFERENCE_ROOT, REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", TRAIN_WITH_COMPILE_ON_NPU, str(tmp_path / "out")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: runner_config.compile needs torch_npu's inductor backend on NPU")
    assert "torch_npu 2.5.1.post1" in proc.stderr and proc.stderr.strip().endswith("set runner_config.compile: false")
    assert not (tmp_path / "out").exists()
