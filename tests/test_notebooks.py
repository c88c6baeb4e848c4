"""notebooks/*.ipynb: each runs top to bottom in a fresh Jupyter kernel (nbclient), its own asserts included, and is
committed without outputs. The kernel is this interpreter with this checkout first on sys.path; the notebooks run
in notebooks/ (as a user opens them) and must leave nothing behind but what they delete themselves."""
import json
import os
import sys
import time

import nbclient  # the dev extra (scripts/setup.sh installs it): a missing install fails here, it does not skip
import nbformat
import pytest
from conftest import HANG_GUARD_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = ("01_quickstart.ipynb", "02_lora_sst2.ipynb", "03_pretrain_from_python.ipynb",
             "04_mindspore_checkpoints.ipynb")
KERNEL = "gpt2-ascend-test"


def test_the_notebooks_are_the_listed_ones():
    assert sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb")) == list(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, \
            f"{name}: code cell {i} holds outputs or an execution count; clear them before committing " \
            f"(Jupyter: Edit > Clear All Outputs)"
    assert "widgets" not in nb.metadata, f"{name} carries widget state in its metadata"


def kernel_spec_dir(root) -> str:
    """A kernelspec whose interpreter is this one, so the test never picks up another Python's 'python3' kernel."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gpt2_ascend (test)", "language": "python"}))
    return str(root)


def entries(folder: str) -> set:
    return {e for e in os.listdir(folder) if e not in ("__pycache__", ".ipynb_checkpoints")}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    jupyter = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", kernel_spec_dir(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))  # the kernel's connection file
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where the notebooks' tempfile.mkdtemp folders go
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel alone computes; 1 thread is the fastest on 2 shared cores
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    before = entries(REPO), entries(NOTEBOOK_DIR)

    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    start = time.perf_counter()
    # every wait a hang guard: nbclient's defaults (60 s for the kernel to start, 4 s for a cell's last outputs)
    # measure speed, and past the 4 s a loaded machine's late outputs (a figure) are dropped with a warning
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=HANG_GUARD_S, startup_timeout=HANG_GUARD_S,
                            iopub_timeout=HANG_GUARD_S, raise_on_iopub_timeout=True,
                            resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f} s")

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert (entries(REPO), entries(NOTEBOOK_DIR)) == before, f"{name} wrote into the checkout"
    left = [e for e in os.listdir(scratch) if e.startswith("gpt2_ascend_")]  # (torch keeps its own caches there)
    assert not left, f"{name} left its temporary folder behind: {left}"
    if name.startswith("03_"):  # the loss curves are drawn inline, also after a run that wrote its loss_curve.png
        figures = [c for c in nb.cells if c.cell_type == "code"
                   if any("image/png" in o.get("data", {}) for o in c.outputs)]
        assert len(figures) == 3, f"{name}: expected its 3 loss curves as inline images, got {len(figures)}"
