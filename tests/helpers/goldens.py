"""Golden runs: the per-step losses, gradient norms, evaluations and final weights of tiny training runs, recorded
once and then demanded on every machine (tests/test_goldens.py, and the torchrun layouts in tests/test_parallel.py).

Why tolerances and not bits. The runs are seeded, single-threaded and their reductions have a fixed order, so on one
machine they repeat bit for bit. Another CPU does not: torch picks its vectorized kernels (and MKL / oneDNN theirs)
by the instruction set, and AVX2, AVX-512 and plain SSE kernels round differently in the last bits. Measured here
(torch 2.13.0 CPU build, the same runs under ATEN_CPU_CAPABILITY / MKL_ENABLE_INSTRUCTIONS / ONEDNN_MAX_CPU_ISA set
to avx512, avx2 and sse, and with 1 or 2 threads), the largest differences from the recording were:

    per-step loss        5e-7 absolute          (losses ~6)
    gradient norm        1.2e-7 relative
    evaluation loss      1.7e-7 absolute
    a final weight       1.1e-6 absolute (one element; most agree to 1e-7)

The tolerances below are ~20x those, and still ~100x below what a one-line change of the restructure kind gives
(docs/testing.md, "Goldens": a LayerNorm eps moved, a schedule step off by one, weight decay on biases, ...).

The final weights are compared by a fingerprint per tensor instead of by all their values (a few MB per run):
its RMS and four projections onto fixed random +-1 vectors, scaled by 1/sqrt(n). A change d of the tensor moves
each projection by about RMS(d) (a random-sign sum), so a change spread over the tensor shows at its own size,
and one element changed by x shows as x / sqrt(n). Names, shapes and dtypes compare exactly.

Where both sides run on the same machine (a run stopped and resumed against the one that never stopped), the tests
compare bit for bit, not through these goldens.

A change that is meant to change the numbers records them again: GPT2_RECORD_GOLDENS=1 makes the checks write
tests/fixtures/goldens.json instead of comparing (say why in the commit)."""
import json
import math
import os
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDENS = os.path.join(REPO, "tests", "fixtures", "goldens.json")
RECORDING = os.environ.get("GPT2_RECORD_GOLDENS") == "1"

LOSS_TOL = 1e-5         # absolute, per-step training loss and evaluation loss
GRAD_NORM_RTOL = 1e-5   # relative, per-step gradient norm (before clipping)
WEIGHT_TOL = 1e-5       # absolute, each entry of a tensor's fingerprint
ACCURACY_TOL = 1 / 48   # one example of the SST-2 golden's 48: a row whose two logits are nearly tied may flip
PROJECTIONS = 4


def read_tensors(path) -> dict:
    """Every tensor of an HF-format directory, or of one safetensors file (an adapter)."""
    from safetensors.torch import load_file
    path = str(path)
    if os.path.isdir(path):
        from gpt2_ascend.hf import read_state_dict
        return read_state_dict(path)
    return load_file(path)


def fingerprint(name: str, tensor) -> dict:
    """What a tensor is compared by: shape, dtype, RMS and PROJECTIONS random-sign projections / sqrt(n)."""
    import numpy as np
    values = tensor.detach().float().cpu().reshape(-1).numpy().astype(np.float64)
    n = max(values.size, 1)
    signs = np.random.default_rng(zlib.crc32(name.encode())).integers(0, 2, size=(PROJECTIONS, values.size)) * 2 - 1
    return dict(shape=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
                rms=float(math.sqrt((values ** 2).sum() / n)),
                projections=[float(p) for p in (signs @ values) / math.sqrt(n)])


def weights_fingerprint(path) -> dict:
    tensors = read_tensors(path)
    return {name: fingerprint(name, tensors[name]) for name in sorted(tensors)}


def run_record(output_dir, *extra_weights) -> dict:
    """What a run is compared by: each step's loss and gradient norm (metrics.jsonl), the evaluations it logged,
    and the fingerprint of final/ (plus of `extra_weights`, paths relative to output_dir)."""
    with open(os.path.join(str(output_dir), "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    record = dict(steps=[r["step"] for r in records], losses=[r["loss"] for r in records],
                  grad_norms=[r["grad_norm"] for r in records],
                  evals={str(r["step"]): {k: v for k, v in r.items() if k.startswith("eval_")}
                         for r in records if any(k.startswith("eval_") for k in r)},
                  weights=weights_fingerprint(os.path.join(str(output_dir), "final")))
    for relative in extra_weights:
        record[relative] = weights_fingerprint(os.path.join(str(output_dir), relative))
    return record


def load_goldens() -> dict:
    if not os.path.isfile(GOLDENS):
        return {}
    with open(GOLDENS, encoding="utf-8") as f:
        return json.load(f)


def _close(got: float, want: float, atol: float = 0.0, rtol: float = 0.0) -> bool:
    return abs(got - want) <= atol + rtol * abs(want)


def _eval_tolerances(key: str) -> dict:
    """eval_loss to LOSS_TOL; eval_ppl = exp(eval_loss), so to LOSS_TOL relative; an accuracy to one example
    (eval_loss still holds that run to LOSS_TOL)."""
    if key.endswith("ppl"):
        return dict(rtol=2 * LOSS_TOL)
    if key.endswith("accuracy"):
        return dict(atol=ACCURACY_TOL + 1e-12)
    return dict(atol=LOSS_TOL)


def differences(record: dict, want: dict) -> list[str]:
    """Every way `record` is off the golden `want` beyond the tolerances, one line each (empty: it holds)."""
    problems = []
    if set(record) != set(want):
        problems.append(f"compared by {sorted(want)}, got {sorted(record)}")
    if record["steps"] != want["steps"]:
        return problems + [f"steps {record['steps']} != {want['steps']}"]
    for step, got, expected in zip(record["steps"], record["losses"], want["losses"]):
        if not _close(got, expected, atol=LOSS_TOL):
            problems.append(f"step {step} loss {got!r} vs {expected!r} (off by {abs(got - expected):.2e})")
    for step, got, expected in zip(record["steps"], record["grad_norms"], want["grad_norms"]):
        if not _close(got, expected, rtol=GRAD_NORM_RTOL):
            problems.append(f"step {step} grad_norm {got!r} vs {expected!r} (off by {abs(got - expected):.2e})")
    if sorted(record["evals"]) != sorted(want["evals"]):
        problems.append(f"evaluated at steps {sorted(record['evals'])}, golden {sorted(want['evals'])}")
    for step, evals in want["evals"].items():
        got_evals = record["evals"].get(step, {})
        for key, expected in evals.items():
            got = got_evals.get(key)
            if got is None or not _close(got, expected, **_eval_tolerances(key)):
                problems.append(f"step {step} {key} {got!r} vs {expected!r}")
    for key in want:
        if key in ("weights",) or "/" in key:
            problems += [f"{key}: {line}" for line in _weight_differences(record.get(key, {}), want[key])]
    return problems


def _weight_differences(got: dict, want: dict) -> list[str]:
    if sorted(got) != sorted(want):
        return [f"tensors {sorted(set(got) ^ set(want))} in one but not the other"]
    problems = []
    for name, expected in want.items():
        mine = got[name]
        if (mine["shape"], mine["dtype"]) != (expected["shape"], expected["dtype"]):
            problems.append(f"{name} is {mine['dtype']} {mine['shape']}, golden {expected['dtype']} {expected['shape']}")
            continue
        off = max(abs(a - b) for a, b in zip([mine["rms"], *mine["projections"]],
                                             [expected["rms"], *expected["projections"]]))
        if off > WEIGHT_TOL:
            problems.append(f"{name} fingerprint off by {off:.2e} (tolerance {WEIGHT_TOL:.0e})")
    return problems


def assert_golden(name: str, record: dict):
    """record equals the golden `name` within the tolerances above (or, when recording, becomes it)."""
    goldens = load_goldens()
    if RECORDING:
        goldens[name] = record
        with open(GOLDENS, "w", encoding="utf-8") as f:
            json.dump(goldens, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    assert name in goldens, f"no golden {name!r} in {GOLDENS}: record it with GPT2_RECORD_GOLDENS=1"
    problems = differences(record, goldens[name])
    assert not problems, f"{name} differs from its golden beyond the tolerances:\n  " + "\n  ".join(problems[:20])
