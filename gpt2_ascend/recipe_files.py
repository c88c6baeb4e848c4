"""The packaged recipes: configs/gpt2/*.yaml, shipped in the wheel as gpt2_ascend/recipes/ (a link in a checkout).

Every `--config` takes a YAML file or a packaged recipe's name (`pretrain_gpt2_tiny`, with or without `.yaml`):
train.py and generate.py (whole recipes, train/recipe.py) and the converters (a recipe's model shape,
mindspore_io/mapping.py). A foundation module, so that each of them finds names the same way.
"""
from __future__ import annotations

import os

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipe_names() -> list[str]:
    """The packaged recipes' names, sorted."""
    if not os.path.isdir(RECIPE_DIR):
        return []
    return sorted(name[:-len(".yaml")] for name in os.listdir(RECIPE_DIR) if name.endswith(".yaml"))


def recipe_path(path_or_name: str, flag: str = "recipe") -> str:
    """A YAML file as given, or a packaged recipe by name; FileNotFoundError naming both kinds otherwise."""
    if os.path.isfile(path_or_name):
        return path_or_name
    name = path_or_name[:-len(".yaml")] if path_or_name.endswith(".yaml") else path_or_name
    if os.sep not in name and name in recipe_names():
        return os.path.join(RECIPE_DIR, name + ".yaml")
    raise FileNotFoundError(f"{flag} not found: {path_or_name}; pass a YAML file or the name of one of "
                            f"{', '.join(recipe_names()) or 'configs/gpt2/*.yaml'}")
