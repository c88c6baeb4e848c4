"""Every fenced bash / python example of README.md and docs/*.md that can run on a CPU runs as written (issue 24),
with the tiny model and slices of the real data where it names bigger ones (SUBSTITUTIONS, applied to the text), in
one working folder, in the order the documents give them. What cannot run here is listed with its reason (CANNOT);
a new example that is neither runnable nor listed fails the test, so the documents cannot drift from the code.

Commands run in this process through each program's main() (no interpreter start-up per line); a training command
gets CHEAP_TRAINING appended (two steps of two rows; the flagship recipes one 64-wide layer: test_user_paths.py
runs the flagship's own shape), a generation command that names no length CHEAP_GENERATION (8 new tokens), and the
evaluation sets are 40-line slices. So every example runs in the suite, in ~1-2 minutes on 2 cores."""
import glob
import os
import re
import shlex
import shutil

import pytest

from conftest import REPO, load_script

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]

# what the documents name -> what runs here (a working folder holding the tiny model and slices of the real data)
SUBSTITUTIONS = [
    ("../shared/data/", "$GPT2_DATA_DIR/"), ("configs/gpt2/", os.path.join(REPO, "configs", "gpt2") + "/"),
    ("--stride 512", "--stride 64"),  # (the tiny model's context is 128)
    ("out/small/final", "out/tiny/final"), ("openai-community/gpt2", "out/tiny/final"),
    ("path/saved/by/transformers", "out/tiny/final"), ("base_dir", "out/tiny/final"), ("out/base", "out/tiny/final"),
    ("--model gpt2 ", "--model out/tiny/final "), ('"path"', '"out/tiny/final"'),
    ("hf_adapter", "out/lora/final/adapter"), ('from_preset("small")', 'from_preset("tiny")'),
    ("runner_config.max_steps=50", "runner_config.max_steps=2"),
]
CHEAP_TRAINING = ["--max_steps", "2", "runner_config.progress_bar=false", "runner_config.batch_size=2"]
CHEAP_GENERATION = ["--max_new_tokens", "8"]  # (a command that names a length keeps it)
CHEAP_FLAGSHIP = ["model.model_config.seq_length=32", "model.model_config.num_layers=1",
                  "model.model_config.hidden_size=64", "model.model_config.num_heads=4",
                  "model.model_config.compute_dtype=float32", "runner_config.batch_size=2",
                  "runner_config.global_batch_size=2", "model.model_config.max_decode_length=40"]

# programs (the first word, or python's script) that cannot run here, and why
CANNOT_PROGRAMS = {
    "torchrun": "torchrun over 4-8 devices (tests/test_parallel.py runs every layout on 2-4 CPU processes)",
    "accelerate": "accelerate's multi-process launcher (tests/test_hf_workflow.py runs it on 2 CPU processes)",
    "scripts/launch.sh": "a launcher for 8 devices / several nodes", "bash": "sets up a venv (scripts/*.sh)",
    "pip": "installs packages (tests/test_package.py installs the wheel in a fresh venv)",
    "source": "Ascend's CANN environment", "npu-smi": "an Ascend NPU", "export": "an NPU's environment",
    "python3": "the GPU benchmark session / a MindSpore venv", "/tmp/msenv/bin/python": "a MindSpore venv",
    "/tmp/msenv/bin/pip": "a MindSpore venv", "run_mindformer.py": "MindFormers' own command (MindSpore)",
    "bench/generate.py": "a GPU benchmark", "bench/train.py": "a GPU benchmark",
    "-c": "checks an NPU install", "pytest": "the test suite itself",
    "gpt2_ascend.data.download": "downloads (the data directory is complete here; tests/test_data_download.py "
                                 "serves the files locally)",
}
# single commands or python blocks that cannot run here, by a fragment of their text, and why
CANNOT = {
    "--device cuda": "a GPU", "--device npu": "an Ascend NPU", 'device="cuda"': "a GPU",
    "...": "a placeholder for the user's arguments", "[--": "optional arguments in brackets (a synopsis)",
    "wikitext:wikitext-2-raw-v1": "a hub download (tests/test_hf_datasets.py reads it from an offline cache)",
    "Salesforce/wikitext": "a hub download", "my_hub_dataset": "a hub download", "glue:sst2": "a hub download",
    "my_corpus": "the user's own corpus", "saved_dataset": "the user's own datasets folder",
    "wiki.train.parquet": "the user's own parquet", "docs.jsonl": "the user's own file",
    "parquet_shards": "the user's own files", "IMDB_Dataset.csv": "the user's own download",
    "ag_news_train.csv": "the user's own download", "sst2_saved": "the user's own datasets folder",
    "reviews.csv": "the user's own file", "prepared/": "the user's own folder",
    "--train_dataset_dir train.npy": "blocks prepared 1025 wide (README's, for GPT-2 small); the tiny recipe's are 129",
    "--train_dataset_dir sst2.train.npz": "rows prepared 128 long (the default); the tiny recipe's are 64",
    "output/": "a MindFormers distributed run folder (tests/test_transform_ckpt.py reads real ones)",
    "RUN/checkpoint": "a placeholder run", "output/pretrain_gpt2_13b": "a 13B run's checkpoint",
    "gpt2_13b.ckpt": "the 13B model", "hf_seq_cls_adapter": "a classifier adapter from transformers + peft "
                                                            "(tests/test_hf_interop.py)",
    "HF_ENDPOINT=https": "another hub server", "HF_HUB_OFFLINE=1": "a hub cache (tests/test_hub.py)",
    "--report_to tensorboard,wandb,mlflow": "wandb and mlflow (tests/test_train_units.py fakes them)",
    "stream_1d": "a fragment (names defined elsewhere)", "class Reviews": "tests/test_python_api.py runs it",
    "from gpt2_ascend.train import DataSplit": "tests/test_python_api.py runs it",
    "TrainJob(model=model, train_data=blocks, batch_size=8, device=\"cpu\", output_dir": "tests/test_python_api.py",
    "StepLoader(causal_lm_inputs(blocks)": "tests/test_python_api.py runs it",
    "from gpt2_ascend.train import OptimizerSettings": "tests/test_python_api.py runs it",
}


def fenced_blocks():
    """(document, line, language, text) of every ```bash / ```python block."""
    for doc in DOCS:
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r"```(bash|python)\n(.*?)```", text, re.S):
            yield doc, text[:m.start()].count("\n") + 1, m.group(1), m.group(2)


def substituted(text: str) -> str:
    for old, new in SUBSTITUTIONS:
        text = text.replace(old, new)
    return text


def bash_commands(text: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped, NAME="..." variables of
    the block expanded."""
    variables, out = {}, []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if len(words) == 1 and re.fullmatch(r"[A-Z]+=.*", words[0]):
            name, value = words[0].split("=", 1)
            variables[name] = value
            continue
        line = re.sub(r"\$([A-Z]+)\b", lambda m: variables.get(m.group(1), m.group(0)), line)
        out.append(line)
    return out


def why_not(text: str) -> str | None:
    return next((why for fragment, why in CANNOT.items() if fragment in text), None)


def program_of(words: list[str]) -> str:
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=value before a command
    if words[0] == "python":
        return words[2] if words[1] == "-m" else words[1]
    return words[0]


MAINS = {"train.py": "train.py", "evaluate.py": "evaluate.py", "generate.py": "generate.py",
         "gpt2-train": "train.py", "gpt2-evaluate": "evaluate.py", "gpt2-generate": "generate.py"}


def run_command(words: list[str]) -> int:
    """A command line through its program's main(), in this process."""
    words = [os.path.expandvars(w) for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]
    if words[0] == "python":
        words = words[1:]
    if words[0] == "-m":
        module, args = words[1], words[2:]
        main = __import__(module, fromlist=["main"]).main
    elif words[0] in MAINS or words[0].startswith("convert/"):
        main, args = load_script(MAINS.get(words[0], words[0])).main, words[1:]
    elif words[0] in ("gpt2-convert", "gpt2-prepare"):
        from gpt2_ascend.commands import convert, prepare
        main, args = (convert if words[0] == "gpt2-convert" else prepare).main, words[1:]
    else:
        raise AssertionError(f"no way to run {words[0]}: list it in CANNOT_PROGRAMS")
    if words[0] in ("generate.py", "gpt2-generate") and not {"--max_new_tokens", "--max_length"} & set(args):
        args = args + CHEAP_GENERATION
    if words[0] in ("train.py", "gpt2-train"):
        args = args + ["--device", "cpu"] + (CHEAP_FLAGSHIP if "_small" in " ".join(args) else [])
        if training(args):  # (the documents run several commands into one output_dir)
            args += CHEAP_TRAINING + ([] if "--resume" in args else ["--overwrite_output_dir"])
    try:
        return main(args) or 0
    except SystemExit as e:
        return e.code or 0


def training(args: list[str]) -> bool:
    return "--run_mode" not in args or args[args.index("--run_mode") + 1] in ("train", "finetune")


@pytest.fixture
def workdir(tmp_path, data_dir, monkeypatch, capsys):
    """The working folder (the cwd): slices of the real WikiText-2 / SST-2 files in a data directory of their own
    ($GPT2_DATA_DIR, with the real tokenizer) and under the bare names the documents use; then the models the
    documents start from, made by their own commands: out/tiny (training.md's first), gpt2.ckpt (README's
    hf_to_mindspore line), out/lora and out/sst2 (the tiny LoRA and SST-2 recipes)."""
    data = tmp_path / "data"
    for folder, names, lines in (("wikitext-2", ("wiki.train.tokens",), 150),
                                 ("wikitext-2", ("wiki.valid.tokens", "wiki.test.tokens"), 40),
                                 ("sst2", ("train.tsv", "dev.tsv"), 40)):
        (data / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            with open(os.path.join(data_dir, folder, name), encoding="utf-8") as f:
                text = "".join(next(f) for _ in range(lines))
            (data / folder / name).write_text(text, encoding="utf-8")
            (tmp_path / name).write_text(text, encoding="utf-8")
    shutil.copytree(os.path.join(data_dir, "gpt2"), data / "gpt2")
    (tmp_path / "prompts.txt").write_text("The history of\nOnce upon a time\n", encoding="utf-8")
    monkeypatch.setenv("GPT2_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    for command in ("python train.py --config configs/gpt2/pretrain_gpt2_tiny.yaml --output_dir out/tiny",
                    "python convert/hf_to_mindspore.py --torch_path out/tiny/final --mindspore_path gpt2.ckpt",
                    "python train.py --config configs/gpt2/finetune_gpt2_tiny_lora.yaml --load_checkpoint "
                    "out/tiny/final --output_dir out/lora",
                    "python train.py --config configs/gpt2/finetune_gpt2_tiny_txtcls.yaml --output_dir out/sst2"):
        assert run_command(shlex.split(substituted(command))) == 0, capsys.readouterr().err
    capsys.readouterr()
    return tmp_path


def runnable_examples():
    """(where, kind, text or words) of every example that runs here, and the list of those that cannot, with why."""
    run, skipped = [], []
    for doc, line, language, text in fenced_blocks():
        where, text = f"{doc}:{line}", substituted(text)
        if language == "python":
            why = why_not("\n".join(line.split("#")[0] for line in text.splitlines()))  # (not its comments)
            (skipped if why else run).append((where, why) if why else (where, "python", text))
            continue
        for command in bash_commands(text):
            words = shlex.split(command, comments=True)
            why = why_not(command) or CANNOT_PROGRAMS.get(program_of(words))
            (skipped if why else run).append((f"{where} {command[:60]}", why) if why else (where, "bash", words))
    return run, skipped


def test_every_example_is_runnable_or_listed_with_its_reason():
    """The inventory, without running anything: each runnable command's program is one this file runs in-process
    (train.py, evaluate.py, generate.py, convert/*.py, python -m gpt2_ascend..., the gpt2-* console scripts), each
    python block compiles, and what cannot run has its reason."""
    run, skipped = runnable_examples()
    for where, kind, body in run:
        if kind == "python":
            compile(body, where, "exec")
            continue
        words = [w for w in body if not re.fullmatch(r"[A-Z_]+=.*", w)]
        program = words[2] if words[:2] == ["python", "-m"] else words[1] if words[0] == "python" else words[0]
        assert (program in MAINS or program.startswith(("convert/", "gpt2_ascend."))
                or program in ("gpt2-convert", "gpt2-prepare")), f"{where}: {' '.join(body)}: list it in CANNOT"
    assert len(run) >= 40 and len(skipped) >= 40, (len(run), len(skipped))


def test_every_example_is_run_or_listed_with_its_reason(workdir, capsys):
    """Each runnable example, in the documents' order, in the working folder: exit 0 (a python block: no exception)."""
    run, _ = runnable_examples()
    for where, kind, body in run:
        if kind == "python":
            exec(compile(body, where, "exec"), {"__name__": "__docs__"})
            continue
        code = run_command(body)
        printed = capsys.readouterr()
        assert code == 0, f"{where}: {' '.join(body)}\n{printed.err[-2000:]}"
