"""Golden runs: the per-step losses, gradient norms and final weights of tiny training runs, recorded once and
then demanded bit for bit (tests/test_goldens.py, and the torchrun layouts in tests/test_parallel.py).

They were recorded on the code before the one-way restructure (issue 13) to prove it changed no number. On the
CI's CPU build (torch 2.13.0, pinned) every value is reproducible run to run: each run is seeded, single-threaded
(one intra-op thread in-process, OMP_NUM_THREADS=1 under torchrun) and its reductions have a fixed order.

A change that is meant to change the numbers records them again: GPT2_RECORD_GOLDENS=1 makes the checks write
tests/fixtures/goldens.json instead of comparing (say why in the commit)."""
import hashlib
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDENS = os.path.join(REPO, "tests", "fixtures", "goldens.json")
RECORDING = os.environ.get("GPT2_RECORD_GOLDENS") == "1"


def weights_sha256(directory) -> str:
    """One sha256 over every tensor of an HF-format directory (or an adapter's safetensors file): names, dtypes,
    shapes and bytes, in name order (the file's own bytes would also hash its layout and metadata)."""
    import torch
    from safetensors.torch import load_file
    path = str(directory)
    if os.path.isdir(path):
        from gpt2_ascend.hf import read_state_dict
        state = read_state_dict(path)
    else:
        state = load_file(path)
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_record(output_dir, *extra_weights) -> dict:
    """What a run is compared by: each step's loss and gradient norm (metrics.jsonl, exact floats), the
    evaluations it logged, and the sha256 of final/ (plus of `extra_weights`, paths relative to output_dir)."""
    with open(os.path.join(str(output_dir), "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    record = dict(steps=[r["step"] for r in records], losses=[r["loss"] for r in records],
                  grad_norms=[r["grad_norm"] for r in records],
                  evals={str(r["step"]): {k: v for k, v in r.items() if k.startswith("eval_")}
                         for r in records if any(k.startswith("eval_") for k in r)},
                  weights=weights_sha256(os.path.join(str(output_dir), "final")))
    for relative in extra_weights:
        record[relative] = weights_sha256(os.path.join(str(output_dir), relative))
    return record


def load_goldens() -> dict:
    if not os.path.isfile(GOLDENS):
        return {}
    with open(GOLDENS, encoding="utf-8") as f:
        return json.load(f)


def assert_golden(name: str, record: dict):
    """record equals the golden `name` exactly (or, when recording, becomes it)."""
    goldens = load_goldens()
    if RECORDING:
        goldens[name] = record
        with open(GOLDENS, "w", encoding="utf-8") as f:
            json.dump(goldens, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    assert name in goldens, f"no golden {name!r} in {GOLDENS}: record it with GPT2_RECORD_GOLDENS=1"
    want = goldens[name]
    for key in want:
        assert record[key] == want[key], f"{name}: {key} differs from the golden\n got  {record[key]}\n want {want[key]}"
    assert set(record) == set(want), f"{name}: compared by {sorted(want)}, got {sorted(record)}"
