"""Named training recipes (`smptrain/config/recipes.toml`): `train.recipe = "NAME"` fills in the keys of the recipe's
table that the configuration does not set itself (a file's own sections, its `[darts]` table or `--set` win).

Plain configuration, nothing hidden: the table is TOML a user reads, `smptrain-inspect` names the keys a recipe
set, and a run's config.toml holds every key as it was resolved.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from smptrain.core.choices import RECIPES
from smptrain.core.errors import UserError

RECIPES_FILE = Path(__file__).with_name("recipes.toml")


def recipe_table(name: str) -> dict:
    """{section: {key: value}} of recipe `name`."""
    tables = tomllib.loads(RECIPES_FILE.read_text())
    if name not in RECIPES or name not in tables:
        raise UserError(f"train.recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return tables[name]


def with_recipe(raw: dict, source: str) -> tuple[dict, list[str]]:
    """`raw` (a configuration as read: {section: {key: value}}) with its recipe's keys filled in where it sets none
    (hyphens and underscores alike), and the keys the recipe set as `section.key`."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    name = next((v for k, v in train.items() if k.replace("-", "_") == "recipe"), "darts")
    if not isinstance(name, str):
        raise UserError(f"train.recipe in {source} must be a recipe's name ({', '.join(RECIPES)}), got {name!r}")
    filled = []
    for section, values in recipe_table(name).items():
        own = raw.setdefault(section, {})
        given = {k.replace("-", "_") for k in own}
        for key, value in values.items():
            if key not in given:
                own[key] = value
                filled.append(f"{section}.{key}")
    return raw, filled
