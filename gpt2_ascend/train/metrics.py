"""What a training run reports: a tqdm bar, OUTPUT_DIR/metrics.jsonl (one JSON object per optimizer
step), the same scalars to the report_to trackers (TensorBoard events in OUTPUT_DIR/tensorboard/ by default; wandb,
mlflow: train/trackers.py), and OUTPUT_DIR/loss_curve.png at the end.

MFU = achieved FLOP/s / the device's peak, with FLOPs per token = 6 N + 12 L H T (PaLM appendix B /
nanoGPT: N parameters, L layers, H hidden size, T sequence length; the second term is attention).
Peaks (dense bf16/fp16, per chip):
- NVIDIA H100 SXM and H200: 989 TFLOP/s (NVIDIA's datasheets: 1979 with sparsity).
- Ascend 910B: ~313 TFLOP/s fp16. Huawei publishes no single figure; third-party write-ups quote 280-376
  depending on the 910B variant (about 320 for the common one). 313 is the number this project uses, so
  NPU MFU is an estimate.
MFU is shown only where the peak is known (and not in fp32, whose peak differs).
"""
from __future__ import annotations

import json
import math
import os

from ..fileio import atomic_write
from .trackers import close_trackers, log_to, open_trackers, scalars

PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("910B", 313e12))


def flops_per_token(num_params: int, n_layer: int, hidden: int, seq_length: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward matmuls) + 12 L H T (attention scores)."""
    return 6.0 * num_params + 12.0 * n_layer * hidden * seq_length


def peak_flops(device_name: str, precision: str) -> float | None:
    if precision not in ("bf16", "fp16"):
        return None
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------
def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is ignored."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def truncate_metrics(path: str, last_step: int):
    """Keep the records of steps <= last_step (resume: the steps after the checkpoint are run again)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    text = "".join(_dumps(record) + "\n" for record in kept).encode("utf-8")
    atomic_write(path, lambda f: f.write(text), size=len(text))


def _dumps(record: dict) -> str:
    # strict JSON: a non-finite number becomes null (its step is flagged nonfinite)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean)


class MetricsLogger:
    """Writes finished step records to metrics.jsonl (or `records`) and the report_to trackers, and drives the
    progress bar."""

    def __init__(self, output_dir: str | None, start_step: int, total_steps: int, resumed: bool,
                 progress: bool = True, flops_per_token: float | None = None, peak: float | None = None,
                 trackers: list | None = None):
        """output_dir None: no files; the records are kept in `records` (the Python API's in-memory runs).
        trackers: the report_to trackers (train/trackers.py: open_trackers), closed by close(); None: TensorBoard
        in OUTPUT_DIR/tensorboard/ (no tracker without an output_dir)."""
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.records: list[dict] = []
        self.path = self.file = None
        if output_dir is not None:
            self.path = os.path.join(output_dir, "metrics.jsonl")
            if resumed:
                truncate_metrics(self.path, start_step)
            elif os.path.exists(self.path):
                os.remove(self.path)
            self.file = open(self.path, "a", encoding="utf-8")
            if trackers is None:
                trackers = open_trackers(["tensorboard"], output_dir, {}, resumed, start_step)
        self.trackers = list(trackers or [])
        self.bar = None
        if progress:
            from ..progress import progress_bar
            self.bar = progress_bar(total=total_steps, initial=start_step, desc="train", unit="step")

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak or not self.flops_per_token:
            return None
        return tokens_per_s * self.flops_per_token / self.peak

    def write(self, records: list[dict]):
        if self.file is None:
            self.records += records
        for record in records:
            if self.file is not None:
                self.file.write(_dumps(record) + "\n")
            log_to(self.trackers, scalars(record), record["step"])
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
        if records and self.bar is not None:
            last = records[-1]
            postfix = dict(loss=_fmt(last.get("loss")), lr=f"{last['lr']:.2e}",
                           tok_s=f"{last.get('tokens_per_s', 0):,.0f}")
            if last.get("mfu") is not None:
                postfix["mfu"] = f"{100 * last['mfu']:.1f}%"
            if last.get("eval_ppl") is not None:
                postfix["val_ppl"] = f"{last['eval_ppl']:.2f}"
            self.bar.set_postfix(postfix, refresh=False)

    def advance(self, steps: int = 1):
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str):
        """Print without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        trackers, self.trackers = self.trackers, []
        close_trackers(trackers)
        if self.file is not None and not self.file.closed:
            self.file.close()


def _fmt(value):
    return "nan" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------
# loss_curve.png
# ---------------------------------------------------------------------------------------------
def plot_loss_curve(metrics_path: str, output_path: str) -> str | None:
    """Training loss per step (and validation loss where evaluated) as a PNG, written atomically."""
    records = read_metrics(metrics_path)
    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    if not points:
        return None
    # a Figure without pyplot draws with Agg and leaves the process's backend alone (a notebook keeps plotting inline)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(*zip(*points), linewidth=1, label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(output_path, lambda f: fig.savefig(f, format="png"))
    return output_path
