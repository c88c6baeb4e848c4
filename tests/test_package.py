"""The installable package: a wheel built from this checkout carries every module, the recipes and the console
scripts, and works from a fresh virtual environment outside the checkout (gpt2-train with a recipe named,
gpt2-generate, gpt2-convert, gpt2-prepare).

Cheap by construction (~1 minute): the wheel is built without build isolation and without dependencies, and
the fresh venv (no pip) reaches this environment's torch, transformers, ... through a .pth line, so nothing
but the wheel is installed (tests/helpers/compat_env.py)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import HANG_GUARD_S, REPO
from helpers.compat_env import overlay_venv, pip_install

WORDS = ("the tower is three hundred metres tall and about the same height as a building of eighty storeys "
         "it was the tallest structure in the world for forty years until a building in new york was finished ")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of a copy of this checkout (the build writes nothing into the checkout)."""
    src = tmp_path_factory.mktemp("src") / "gpt2_ascend"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".compat", "output", "out", "runs", "build", "dist", "*.egg-info", "__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(dist), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = dist.glob("gpt2_ascend-*.whl")
    return path


def test_wheel_holds_every_module_the_recipes_and_the_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {os.path.relpath(os.path.join(d, f), REPO) for d, _, files in os.walk(os.path.join(REPO, "gpt2_ascend"))
               for f in files if f.endswith(".py")}
    assert modules and modules <= names, sorted(modules - names)
    recipes = {f"gpt2_ascend/recipes/{f}" for f in os.listdir(os.path.join(REPO, "configs", "gpt2"))}
    assert "gpt2_ascend/recipes/pretrain_gpt2_tiny.yaml" in recipes and recipes <= names
    protos = {f"gpt2_ascend/mindspore_io/{f}" for f in ("checkpoint.proto", "node_strategy.proto")}  # read at run time
    assert protos <= names, sorted(protos - names)
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("gpt2-train", "gpt2-evaluate", "gpt2-generate", "gpt2-convert", "gpt2-prepare"):
        assert f"{script} = gpt2_ascend.commands." in text


def test_installed_wheel_trains_and_generates_outside_the_checkout(wheel, tmp_path, data_dir):
    venv = tmp_path / "venv"
    python = overlay_venv(str(venv))
    proc = pip_install(python, "--no-deps", "--no-index", str(wheel))
    assert proc.returncode == 0, proc.stderr[-2000:]
    work = tmp_path / "work"  # outside the checkout, no PYTHONPATH: only the installed package can be found
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GPT2_DATA_DIR=data_dir, OMP_NUM_THREADS="2")

    def run(*args):
        return subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)

    where = run(python, "-c", "import gpt2_ascend; print(gpt2_ascend.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    (work / "text.txt").write_text((WORDS * 40 + "\n") * 3)
    train = run(venv / "bin" / "gpt2-train", "--config", "pretrain_gpt2_tiny", "--output_dir", "out", "--max_steps", 2,
                "--train_dataset_dir", "text.txt", "--eval_dataset_dir", "text.txt", "--device", "cpu",
                "runner_config.batch_size=2", "eval_dataset.max_samples=4", "data_cache_dir=cache")
    assert train.returncode == 0, train.stderr[-2000:]
    assert "done: 2 steps" in train.stdout
    final = work / "out" / "final"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(os.listdir(final))
    gen = run(venv / "bin" / "gpt2-generate", "--model", final, "--prompt", "The tower", "--max_new_tokens", 4,
              "--device", "cpu")
    assert gen.returncode == 0 and gen.stdout.startswith("The tower"), gen.stderr[-2000:]
    for script, sub, example in (("gpt2-convert", "merge-lora", "--base"), ("gpt2-prepare", "txtcls", "--dataset_name"),
                                 ("gpt2-evaluate", None, "--task"), ("gpt2-train", None, "--config"),
                                 ("gpt2-generate", None, "--model"), ("gpt2-convert", "mindspore-to-hf", "--mindspore_path")):
        help_ = run(venv / "bin" / script, *([sub] if sub else []), "--help")
        assert help_.returncode == 0 and "usage:" in help_.stdout, help_.stderr
        name = " ".join([script, *([sub] if sub else [])])  # the examples name the program as it was invoked
        assert f"  {name} {example}" in help_.stdout, help_.stdout
        assert not any(old in help_.stdout for old in ("python train.py", "python evaluate.py", "convert/", "python -m"))
    bad = run(venv / "bin" / "gpt2-train", "--config", "pretrain_gpt2_nope")
    assert bad.returncode == 2 and "pretrain_gpt2_tiny" in bad.stderr  # the error lists the packaged recipes
