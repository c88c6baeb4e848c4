"""Experiment trackers: where a run's scalars go besides metrics.jsonl (the job's report_to: a recipe's report_to
key, train.py's --report_to, TrainJob(report_to=...); named as HF's Trainer names it; TensorBoard is the default,
[none] turns them all off). They write under OUTPUT_DIR, so a run without one (the Python API's in-memory run) has
none: TensorBoard is skipped there, and naming wandb or mlflow is an error.

    tensorboard  event files in OUTPUT_DIR/tensorboard/
    wandb        Weights & Biases (pip install gpt2_ascend[trackers]): project $WANDB_PROJECT (default gpt2_ascend),
                 the run named after OUTPUT_DIR, its files in OUTPUT_DIR/wandb/ ($WANDB_DIR); WANDB_MODE=offline
                 logs without a network (`wandb sync` uploads later)
    mlflow       MLflow (the same extra: mlflow-skinny, or mlflow): $MLFLOW_TRACKING_URI, else a file store in
                 OUTPUT_DIR/mlruns; experiment $MLFLOW_EXPERIMENT_NAME (default gpt2_ascend)

Every tracker gets the same scalars under the same names (train/loss, train/lr, train/grad_norm, ..., eval/loss,
eval/ppl) at the same steps, and the resolved recipe as the run's config (a job built in Python: its settings;
wandb: nested; mlflow: `section.key` params). A resumed run goes on logging into the same wandb / mlflow run: their
ids are kept in OUTPUT_DIR/trackers.json. (The steps between the checkpoint and the interruption are logged again: mlflow keeps both
values, wandb the first; TensorBoard's purge_step drops the old ones.)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

from ..fileio import write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
DEFAULT_PROJECT = "gpt2_ascend"


def scalars(record: dict) -> dict:
    """A metrics.jsonl record's finite numbers under their tracker names: train/KEY, or eval/KEY for eval_KEY."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = value
    return out


def flat_params(config: dict, prefix: str = "") -> dict:
    """A nested recipe as `section.key` -> text (mlflow params are flat strings)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        elif isinstance(value, (list, bool)) or value is None:
            out[f"{prefix}{key}"] = json.dumps(value)
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, output_dir: str, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"), purge_step=purge_step)
        self.run_id = None

    def log(self, values: dict, step: int):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self):
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, output_dir: str, config: dict, run_id: str | None, run_name: str):
        import wandb
        folder = os.environ.get("WANDB_DIR") or output_dir
        os.makedirs(folder, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run_name,
                                  id=run_id, resume="allow" if run_id else None, dir=folder, config=config,
                                  settings=wandb.Settings(silent=True, console="off"))
        except (wandb.errors.Error, OSError) as e:
            raise ValueError(f"wandb could not start a run ({_first_line(e)}): log in (wandb login, or "
                             f"WANDB_API_KEY), or set WANDB_MODE=offline to log without a network") from None
        self.run_id = self.run.id

    def log(self, values: dict, step: int):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, output_dir: str, config: dict, run_id: str | None, run_name: str):
        from mlflow.exceptions import MlflowException
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store (mlflow 3 asks for an explicit opt-in to file stores)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file://" + os.path.join(os.path.abspath(output_dir), "mlruns")
        try:
            self._start(uri, config, run_id, run_name)
        except (MlflowException, OSError) as e:
            raise ValueError(f"mlflow could not start a run at {uri} ({_first_line(e)}): check "
                             f"MLFLOW_TRACKING_URI") from None

    def _start(self, uri: str, config: dict, run_id: str | None, run_name: str):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        if run_id:
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(k, v) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, values: dict, step: int):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self):
        self.client.set_terminated(self.run_id)


def require_trackers(names):
    """A one-line error, before the run changes anything, when a tracker is unknown or its package is not
    installed."""
    import importlib.util
    unknown = [n for n in names if n not in TRACKERS + ("none",)]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r} in report_to: use {', '.join(TRACKERS)}, or none")
    for name in names:
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to names {name} but the {name} package is not installed: pip install "
                             f"'gpt2_ascend[trackers]' (or {name}), or drop it from report_to")


def open_trackers(names, output_dir: str, config: dict, resumed: bool, start_step: int, log=print) -> list:
    """The trackers report_to names, started (a resumed run reopens its wandb / mlflow runs); a tracker that cannot
    start is a one-line ValueError, before any step runs."""
    names = [n for n in names if n != "none"]
    require_trackers(names)
    ids = _read_ids(output_dir) if resumed else {}
    run_name = os.path.basename(os.path.normpath(output_dir))
    trackers = []
    try:
        for name in names:
            if name == "tensorboard":
                try:
                    trackers.append(TensorBoardTracker(output_dir, start_step + 1 if resumed else None))
                except ImportError as e:  # an install requirement: a broken one does not stop training
                    log(f"warning: TensorBoard is not usable ({e}): no tensorboard/ events for this run")
                continue
            cls = WandbTracker if name == "wandb" else MlflowTracker
            trackers.append(cls(output_dir, config, ids.get(name), run_name))
    except BaseException:
        close_trackers(trackers)
        raise
    new_ids = {t.name: t.run_id for t in trackers if t.run_id}
    if new_ids:
        write_json(new_ids, os.path.join(output_dir, IDS_FILE))
        log(f"tracking the run in {', '.join(f'{k} (run {v})' for k, v in new_ids.items())}")
    return trackers


def log_to(trackers: list, values: dict, step: int):
    """Each tracker's log. One that fails (its server, network or disk) is dropped with one warning line: the
    training, metrics.jsonl and the checkpoints go on."""
    for tracker in list(trackers):
        try:
            tracker.log(values, step)
        except Exception as e:  # noqa: BLE001 - whatever a tracker raises, it must not stop the run
            trackers.remove(tracker)
            print(f"warning: {tracker.name} stopped logging at step {step} ({_first_line(e)}); metrics.jsonl has "
                  f"every step", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):  # its run ends as far as it still can
                tracker.close()


def close_trackers(trackers: list):
    """Finish every tracker's run, each one even when another fails (a warning line for that one)."""
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as e:  # noqa: BLE001 - the others still close
            print(f"warning: {tracker.name} did not close cleanly ({_first_line(e)})", file=sys.stderr, flush=True)


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _read_ids(output_dir: str) -> dict:
    path = os.path.join(output_dir, IDS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            ids = json.load(f)
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}
