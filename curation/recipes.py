"""(being written: recipe config loading and application)"""
from __future__ import annotations

import os
from importlib import resources as ir

import yaml


def recipe_config_path() -> str:
    return os.environ.get("CURATION_RECIPES") or str(ir.files("curation") / "configs" / "recipes.yaml")


def recipe_names() -> list[str]:
    with open(recipe_config_path()) as f:
        return list(yaml.safe_load(f)["recipes"])
