"""The supported version ranges are stated once in setup.cfg and repeated, identically, in the README
and docs/ascend.md."""
import configparser
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_cfg_floors() -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    floors = {"Python": cfg["options"]["python_requires"].removeprefix(">=")}
    for line in cfg["options"]["install_requires"].split():
        name, _, floor = line.partition(">=")
        if floor:
            floors[name] = floor
    return floors


def read(*path) -> str:
    with open(os.path.join(REPO, *path), encoding="utf-8") as f:
        return f.read()


def test_readme_and_docs_state_the_setup_cfg_ranges():
    floors = setup_cfg_floors()
    assert floors == {"Python": "3.10", "torch": "2.7", "transformers": "4.45", "peft": "0.7", "datasets": "2.17"}
    readme_line = next(line for line in read("README.md").splitlines() if line.startswith("Supported ranges"))
    stated = dict(re.findall(r"(Python|torch|transformers|peft|datasets) ≥ ([\d.]+)", readme_line))
    assert stated == floors
    docs = read("docs", "ascend.md")
    assert f"**PyTorch ≥ {floors['torch']}**" in docs
    table = docs[docs.index("### Versions this project needs"):docs.index("## Install")]
    for name in ("torch", "transformers", "peft", "datasets"):
        assert re.search(rf"^\| {name} \| {re.escape(floors[name])} \|", table, re.M), name
