"""The HF workflow around training: real `accelerate launch` processes (CPU, gloo), the launcher's choices read
from its environment (train/launcher.py), the report_to trackers (wandb offline, an mlflow file store, TensorBoard),
and train.py's flags for datasets sources."""
import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402  (the CLI module, in-process)
from gpt2_ascend.commands import train as train_command  # noqa: E402

from gpt2_ascend.train import TrainJob, TrainSettings  # noqa: E402
from gpt2_ascend.train.job import job_from_recipe  # noqa: E402
from gpt2_ascend.train.launcher import apply_launcher, launcher_changes  # noqa: E402
from gpt2_ascend.train.recipe import load_recipe  # noqa: E402
from gpt2_ascend.train.trackers import flat_params  # noqa: E402
from conftest import HANG_GUARD_S

STEPS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny recipe (no dropout) whose global batch of 4 rows is 2 x 2 accumulation on one process and 2 x 2
    ranks on two."""
    root = tmp_path_factory.mktemp("hf_workflow")
    np.save(root / "train.npy", np.random.default_rng(0).integers(0, 512, size=(32, 17), dtype=np.uint16))
    with open(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_tiny.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe.update(do_eval=False, data_cache_dir=str(root / "cache"), device="auto")
    recipe["model"]["model_config"].update(seq_length=16, vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                                           eos_token_id=511, pad_token_id=511, max_decode_length=16)
    recipe["runner_config"].update(batch_size=2, global_batch_size=4, max_steps=STEPS, progress_bar=False)
    recipe["train_dataset"]["data_loader"]["dataset_dir"] = str(root / "train.npy")
    recipe["eval_dataset"]["data_loader"]["dataset_dir"] = ""
    recipe["callbacks"] = [dict(type="MFLossMonitor", per_print_times=1)]
    with open(root / "tiny.yaml", "w") as f:
        yaml.safe_dump(recipe, f)
    return root


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [r["loss"] for r in records(out)]


def run_in_process(workdir, name, *args):
    out = workdir / name
    code = train.main(["--config", str(workdir / "tiny.yaml"), "--output_dir", str(out), *map(str, args)])
    assert code == 0
    return out


def accelerate_launch(workdir, name, *launch_args):
    out = workdir / name
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_HOME=str(workdir / "hf_home"))  # no user config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, os.path.join(REPO, "train.py"),
           "--config", str(workdir / "tiny.yaml"), "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


# ------------------------------------------------------------------------------------------------ accelerate launch

def test_accelerate_launch_two_processes_data_parallel_matches_one_process(workdir):
    one = run_in_process(workdir, "one")
    two, stdout = accelerate_launch(workdir, "two", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                                    "--mixed_precision", "no")
    assert stdout.count("2 processes and no parallel layout (use_parallel is false): data parallel over 2 "
                        "(data_parallel=2)") == 1  # rank 0 alone says it
    assert "on 2 processes (data_parallel 2 x model_parallel 1 x pipeline_stage 1)" in stdout
    assert [r["step"] for r in records(two)] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(two), losses(one))) < 1e-5
    assert json.load(open(two / "summary.json"))["precision"] == "fp32"


def test_accelerate_mixed_precision_from_its_config_file_reaches_the_trainer(workdir):
    config = workdir / "accelerate.yaml"
    config.write_text(yaml.safe_dump(dict(compute_environment="LOCAL_MACHINE", distributed_type="MULTI_GPU",
                                          num_machines=1, num_processes=2, main_process_port=0,
                                          mixed_precision="bf16")))
    bf16, stdout = accelerate_launch(workdir, "bf16", "--config_file", str(config))
    assert "compute dtype bfloat16: accelerate launch --mixed_precision bf16" in stdout
    assert json.load(open(bf16 / "summary.json"))["precision"] == "bf16"
    with open(bf16 / "recipe.yaml") as f:
        assert yaml.safe_load(f)["model"]["model_config"]["compute_dtype"] == "bfloat16"
    one_bf16 = run_in_process(workdir, "one_bf16", "model.model_config.compute_dtype=bfloat16")
    fp32 = workdir / "one" if (workdir / "one").exists() else run_in_process(workdir, "one")
    assert max(abs(a - b) for a, b in zip(losses(bf16), losses(one_bf16))) < 1e-3
    assert max(abs(a - b) for a, b in zip(losses(bf16), losses(fp32))) > 1e-6  # bf16 arithmetic, not fp32's


def test_the_npu_accelerate_config_is_what_accelerate_launch_reads_for_8_devices():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    args = launch_command_parser().parse_args(["--config_file", os.path.join(REPO, "scripts/accelerate_npu.yaml"),
                                               "train.py", "--config", "pretrain_gpt2_small"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults.distributed_type.value == "MULTI_NPU" and args.multi_gpu  # torchrun underneath
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (8, 1, "fp16")
    small = job_from_recipe(load_recipe(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_small.yaml")))
    assert launcher_changes(small, {"ACCELERATE_MIXED_PRECISION": args.mixed_precision}) == {}  # its float16


# ------------------------------------------------------------------------------------------------ the launcher's environment

def _job(*overrides, config="configs/gpt2/pretrain_gpt2_tiny.yaml"):
    return job_from_recipe(load_recipe(os.path.join(REPO, config), list(overrides)))


def test_launcher_precision_rules():
    said = []
    fp32, fp16 = _job(), _job("model.model_config.compute_dtype=float16")
    assert launcher_changes(fp32, {}) == {}
    assert launcher_changes(fp16, {"ACCELERATE_MIXED_PRECISION": "no"}) == {}  # accelerate's default: the job's
    assert launcher_changes(fp16, {"ACCELERATE_MIXED_PRECISION": "fp16"}) == {}
    assert launcher_changes(fp32, {"ACCELERATE_MIXED_PRECISION": "bf16"}, said.append) == dict(precision="bf16")
    assert said == ["compute dtype bfloat16: accelerate launch --mixed_precision bf16"]
    got = apply_launcher(fp32, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert got.settings.precision == "bf16" and got.recipe["model"]["model_config"]["compute_dtype"] == "bfloat16"
    assert fp32.settings.precision == "fp32" and fp32.recipe["model"]["model_config"]["compute_dtype"] == "float32"
    with pytest.raises(ValueError, match=r"^accelerate launch asks for bf16 mixed precision but the run is set to "
                                         r"fp16 \(model.model_config.compute_dtype=float16\): pass --mixed_precision "
                                         r"fp16 to accelerate launch, or set model.model_config.compute_dtype="
                                         r"bfloat16$"):
        launcher_changes(fp16, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    python_job = TrainJob(settings=TrainSettings(precision="fp16"))  # errors name the Python arguments
    with pytest.raises(ValueError, match=r"set to fp16 \(TrainSettings\(precision='fp16'\)\): pass "
                                         r"--mixed_precision fp16 to accelerate launch, or set "
                                         r"TrainSettings\(precision='bf16'\)$"):
        launcher_changes(python_job, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(ValueError, match="--mixed_precision fp8 is not supported here"):
        launcher_changes(fp32, {"ACCELERATE_MIXED_PRECISION": "fp8"})
    assert launcher_changes(fp32, {"ACCELERATE_USE_CPU": "True"}) == dict(device="cpu")
    assert apply_launcher(fp32, {"ACCELERATE_USE_CPU": "True"}).recipe["device"] == "cpu"
    assert launcher_changes(fp32, {"ACCELERATE_USE_CPU": "False"}) == {}
    with pytest.raises(ValueError, match="^accelerate launch --cpu runs on the CPU but the run's device is cuda: "
                                         "drop --cpu, or set device=cpu$"):
        launcher_changes(_job("device=cuda"), {"ACCELERATE_USE_CPU": "True"})


def test_launcher_layout_rules():
    said = []
    small = _job(config="configs/gpt2/pretrain_gpt2_small.yaml")  # use_parallel false, a dp 8 section
    got = apply_launcher(small, {"WORLD_SIZE": "4", "RANK": "0"}, said.append)
    p = got.parallel
    assert got.use_parallel and (p.data_parallel, p.model_parallel, p.pipeline_stage) == (4, 1, 1)
    assert not p.optimizer_shard and p.recompute == small.parallel.recompute
    assert said == ["4 processes and no parallel layout (use_parallel is false): data parallel over 4 "
                    "(data_parallel=4)"]
    recorded = got.recipe  # recipe.yaml says what ran
    assert recorded["use_parallel"] is True and recorded["parallel"]["data_parallel"] == 4
    assert not recorded["parallel"]["optimizer_shard"] and small.recipe["parallel"]["data_parallel"] == 8
    ones = _job("use_parallel=true", "parallel.optimizer_shard=true")
    got = apply_launcher(ones, {"WORLD_SIZE": "2", "RANK": "1"}, said.append)
    assert got.parallel.data_parallel == 2 and got.parallel.optimizer_shard and len(said) == 1  # rank 1 is quiet
    explicit = _job("use_parallel=true", "parallel.data_parallel=2", "parallel.model_parallel=2")
    assert apply_launcher(explicit, {"WORLD_SIZE": "4"}) is explicit  # checked against the world by the mesh
    assert apply_launcher(_job(), {"WORLD_SIZE": "1"}, said.append).use_parallel is False
    python_job = apply_launcher(TrainJob(), {"WORLD_SIZE": "2", "RANK": "0"}, said.append)  # no recipe to record
    assert python_job.use_parallel and python_job.parallel.data_parallel == 2 and python_job.recipe is None


def test_a_precision_contradiction_is_one_line_exit_2(workdir, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    code = train.main(["--config", str(workdir / "tiny.yaml"), "--output_dir", str(workdir / "contradiction"),
                       "model.model_config.compute_dtype=bfloat16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: accelerate launch asks for fp16 mixed precision but the run is set to bf16 "
                          "(model.model_config.compute_dtype=bfloat16): pass --mixed_precision bf16")
    assert not (workdir / "contradiction").exists()


# ------------------------------------------------------------------------------------------------ trackers

def wandb_records(run_file: str) -> list:
    """The protobuf records of a wandb offline run file (LevelDB log format: 7-byte file header, 32 KiB blocks,
    each record a 7-byte header (crc, length, type) and its bytes, split over blocks as FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, out, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def expected_scalars(out) -> dict:
    """metrics.jsonl as the trackers should have it: {step: {train/KEY: value}}."""
    return {r["step"]: {f"train/{k}": v for k, v in r.items() if k != "step" and isinstance(v, float)}
            for r in records(out)}


def test_wandb_offline_gets_the_scalars_and_the_recipe_and_a_resume_continues_its_run(workdir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written to the home folder
        monkeypatch.setenv(name, str(workdir / "wandb_home"))
    out = run_in_process(workdir, "wandb", "--report_to", "tensorboard,wandb", "--max_steps", "2",
                         "callbacks.CheckpointMonitor.save_checkpoint_steps=2")
    run_id = json.load(open(out / "trackers.json"))["wandb"]
    run_in_process(workdir, "wandb", "--report_to", "tensorboard,wandb", "--resume", "auto", "--max_steps", "4")
    assert json.load(open(out / "trackers.json"))["wandb"] == run_id
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2  # the run, and its resumed part (wandb sync joins them under the one id)
    logged, config = {}, {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                logged[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    want = expected_scalars(out)
    assert sorted(logged) == sorted(want) == [1, 2, 3, 4]
    for step, values in want.items():
        assert logged[step].keys() == values.keys() and all(abs(logged[step][k] - v) < 1e-6 for k, v in values.items())
    with open(out / "recipe.yaml") as f:
        recipe = yaml.safe_load(f)
    assert config["model"] == recipe["model"] and config["report_to"] == ["tensorboard", "wandb"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == \
        [(s, round(v["train/loss"], 5)) for s, v in sorted(want.items())]


def test_mlflow_file_store_gets_the_scalars_and_the_recipe_and_a_resume_continues_its_run(workdir, monkeypatch):
    pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    out = run_in_process(workdir, "mlflow", "--report_to", "mlflow", "--max_steps", "2",
                         "callbacks.CheckpointMonitor.save_checkpoint_steps=2")
    assert not (out / "tensorboard").exists()  # report_to replaces the default
    run_id = json.load(open(out / "trackers.json"))["mlflow"]
    with open(out / "recipe.yaml") as f:
        params = flat_params(yaml.safe_load(f))  # the run's recipe, as it started
    run_in_process(workdir, "mlflow", "--report_to", "mlflow", "--resume", "auto", "--max_steps", "4")
    assert json.load(open(out / "trackers.json"))["mlflow"] == run_id

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri="file://" + str(out / "mlruns"))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "mlflow"
    assert client.get_experiment(run.info.experiment_id).name == "gpt2_ascend"
    want = expected_scalars(out)
    for key in want[1]:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [1, 2, 3, 4], key
        assert all(abs(v - want[s][key]) < 1e-6 for s, v in history), key
    assert run.data.params == params and params["runner_config.batch_size"] == "2"


def test_report_to_none_and_bad_trackers(workdir, capsys, monkeypatch):
    out = run_in_process(workdir, "none", "--report_to", "none")
    assert not (out / "tensorboard").exists() and not (out / "trackers.json").exists() and records(out)
    code = train.main(["--config", str(workdir / "tiny.yaml"), "--output_dir", str(workdir / "bad"),
                       "--report_to", "tensorboard,comet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad value ['tensorboard', 'comet'] for 'report_to'" in err and err.count("\n") == 1
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = train.main(["--config", str(workdir / "tiny.yaml"), "--output_dir", str(workdir / "nowandb"),
                       "--report_to", "wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "report_to names wandb but the wandb package is not installed: pip install 'gpt2_ascend[trackers]'" in err
    assert not (workdir / "nowandb").exists()


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_others_go_on(tmp_path, capsys):
    from gpt2_ascend.train.metrics import MetricsLogger

    class Recording:
        name, logged, closed = "recording", [], False

        def log(self, values, step):
            self.logged.append((step, values))

        def close(self):
            self.closed = True

    class Failing(Recording):
        name = "failing"

        def log(self, values, step):
            raise ConnectionError("server gone\nsecond line")

        def close(self):
            raise RuntimeError("cannot finish")

    recording = Recording()
    logger = MetricsLogger(str(tmp_path), 0, 3, resumed=False, progress=False, trackers=[Failing(), recording])
    logger.write([dict(step=1, loss=2.5, lr=0.1, eval_ppl=7.0, skipped=False), dict(step=2, loss=float("nan"))])
    logger.close()
    err = capsys.readouterr().err
    assert err == "warning: failing stopped logging at step 1 (server gone); metrics.jsonl has every step\n"
    assert recording.logged == [(1, {"train/loss": 2.5, "train/lr": 0.1, "eval/ppl": 7.0}), (2, {})]
    assert recording.closed and len(records(tmp_path)) == 2


# ------------------------------------------------------------------------------------------------ train.py's flags

def test_datasets_flags_set_both_dataset_sections():
    args = train_command.parse_args(["--config", "x.yaml", "--text_column", "content", "--label_column", "stars",
                             "--text_format", "text", "--preprocessing_num_workers", "3",
                             "--report_to", "wandb,mlflow", "runner_config.batch_size=2"])
    recipe = load_recipe(os.path.join(REPO, "configs/gpt2/pretrain_gpt2_tiny.yaml"),
                         train_command.overrides_from_flags(args) + args.overrides)
    for section in (recipe.train_dataset, recipe.eval_dataset):
        assert (section.text_column, section.label_column, section.text_format) == ("content", "stars", "text")
    assert (recipe.train_dataset.split, recipe.eval_dataset.split) == ("train", "validation")
    assert recipe.preprocessing_num_workers == 3 and recipe.report_to == ["wandb", "mlflow"]
    assert recipe.runner_config.batch_size == 2
