"""Recipes by name (smptrain/config/recipes.toml), warmup in epochs, the schedule said at the start, and recipes compared on
a dataset with `smptrain-recipes`: trained, chosen on validation, tested, tabulated; a killed comparison continues."""

from __future__ import annotations

import json
import tomllib

import pandas as pd
import pytest
from helpers import run, tiny_config

from smptrain.config import Config, read_config, to_dict
from smptrain.core.choices import RECIPES
from smptrain.core.errors import UserError


def test_every_recipe_is_a_table_of_valid_keys_and_darts_changes_nothing():
    from smptrain.config.recipes import RECIPES_FILE

    tables = tomllib.loads(RECIPES_FILE.read_text())
    assert set(tables) == set(RECIPES) and tables["darts"] == {}
    defaults = to_dict(Config())
    for name, table in tables.items():
        for section, values in table.items():
            assert set(values) <= set(defaults[section]), (name, section)
        read_config(None, [f"train.recipe='{name}'"])  # every value passes the configuration's checks


def test_a_recipe_fills_in_what_the_configuration_leaves_and_every_set_key_wins(tmp_path):
    loaded = read_config(None, ["train.recipe='rare-positives'"])
    cfg = loaded.config
    assert cfg.train.loss == {"focal": 1.0, "dice": 1.0} and cfg.train.schedule == "cosine"
    assert cfg.train.warmup_epochs == 1 and cfg.data.positive_fraction == 0.33
    assert set(loaded.from_recipe) == {"train.loss", "train.schedule", "train.warmup_epochs", "data.positive_fraction"}
    path = tmp_path / "mine.toml"
    path.write_text('[train]\nrecipe = "rare-positives"\nschedule = "constant"\n[data]\npositive-fraction = 0.5\n')
    mine = read_config(path, ["train.loss='focal'"])
    assert (mine.config.train.schedule, mine.config.data.positive_fraction, mine.config.train.loss) == \
        ("constant", 0.5, "focal")
    assert set(mine.from_recipe) == {"train.warmup_epochs"}
    assert read_config(None).config.train.recipe == "darts" and read_config(None).from_recipe == ()


@pytest.mark.parametrize("overrides, words", [
    (["train.recipe='fastest'"], ["train.recipe", "must be one of", "rare-positives"]),
    (["train.warmup_steps=5", "train.warmup_epochs=1"], ["train.warmup_steps and train.warmup_epochs", "give one"]),
])
def test_a_wrong_recipe_or_two_warmups_is_one_sentence(overrides, words):
    with pytest.raises(UserError) as error:
        read_config(None, overrides)
    for word in words:
        assert word in str(error.value)


def test_warmup_in_epochs_is_that_many_epochs_of_steps_and_the_schedule_is_said_in_one_line():
    from smptrain.training.schedule import describe, learning_rate, warmup_of

    train = read_config(None, ["train.schedule='cosine'", "train.warmup_epochs=2", "train.max_epochs=10"]).config.train
    assert warmup_of(train, 25) == 50
    steps = read_config(None, ["train.schedule='cosine'", "train.warmup_steps=50",
                               "train.max_epochs=10"]).config.train
    assert [learning_rate(train, s, s // 25, 25) for s in range(250)] == \
        [learning_rate(steps, s, s // 25, 25) for s in range(250)]
    line = describe(train, 25)
    assert "25 optimizer steps per epoch, 250 in 10 epochs, warmup 50 steps" in line
    assert f"first step {learning_rate(train, 0, 0, 25):.3g}" in line and "end of warmup 0.001" in line
    assert line.index("end of warmup") < line.index("middle") < line.index("last step")


@pytest.mark.slow
def test_inspect_and_training_say_the_recipe_and_the_schedule(demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, train={"recipe": "rare-positives", "max_epochs": 1},
                         log={"run_name": "said", "preview_every_n_val": 0})
    inspected = run(["smptrain-inspect", "--config", str(config)], check=True)
    assert "recipe rare-positives (smptrain/config/recipes.toml) set: train.loss, train.schedule, train.warmup_epochs, " \
           "data.positive_fraction" in inspected.stdout
    assert "optimizer steps per epoch" in inspected.stdout and "warmup" in inspected.stdout
    trained = run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    assert "schedule: cosine, 8 optimizer steps per epoch, 8 in 1 epochs, warmup 8 steps" in trained.stdout
    stored = tomllib.loads((tmp_path / "artifacts" / "said" / "config.toml").read_text())
    assert stored["train"]["recipe"] == "rare-positives" and stored["data"]["positive_fraction"] == 0.33


@pytest.mark.slow
def test_recipes_are_compared_on_a_dataset_and_a_killed_comparison_continues(demo_dir, tmp_path):
    """Two recipes x two seeds on the demo data (a region held out): the second run is killed while it saves its
    checkpoint; the same command then runs it again and the rest, and does not train the first again."""
    config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 1}, log={"preview_every_n_val": 0})
    command = ["smptrain-recipes", "--config", str(config), "--recipes", "darts,rare-positives", "--seeds", "1,2",
               "--name", "cmp"]
    killed = run(command, SMPTRAIN_FAILPOINT="checkpoint.after_rename#2")
    assert killed.returncode == -9
    out = tmp_path / "artifacts" / "cmp"
    first = json.loads((out / "rows" / "darts-seed1.json").read_text())
    assert first["status"] == "tested" and not (out / "rows" / "darts-seed2.json").exists()
    again = run(command, check=True)
    assert "darts, seed 1" not in again.stdout and "darts, seed 2" in again.stdout  # killed before its first
    # checkpoint was linked: trained again from its start
    assert json.loads((out / "rows" / "darts-seed1.json").read_text()) == first  # not trained again
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(zip(runs["recipe"], runs["seed"])) == [("darts", 1), ("darts", 2), ("rare-positives", 1),
                                                         ("rare-positives", 2)]
    assert (runs["status"] == "tested").all()
    for row in runs.itertuples():
        tested = json.loads((out / "runs" / row.run_name / "test" / "metrics.json").read_text())
        assert tested["precision"] == "fp32"
        assert tested["metrics"]["test/JaccardIndex"] == pytest.approx(
            runs.loc[runs.run_name == row.run_name, "test/JaccardIndex"].item(), abs=0)
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["recipe"]) == ["darts", "rare-positives"] and list(summary["seeds"]) == [2, 2]
    darts = runs[runs.recipe == "darts"]["test/JaccardIndex"]
    assert summary.loc[0, "test/JaccardIndex mean"] == pytest.approx(darts.mean())
    assert summary.loc[0, "test/JaccardIndex std"] == pytest.approx(darts.std(ddof=1))
    differences = [runs[(runs.recipe == "rare-positives") & (runs.seed == s)]["test/JaccardIndex"].item()
                   - runs[(runs.recipe == "darts") & (runs.seed == s)]["test/JaccardIndex"].item() for s in (1, 2)]
    assert summary.loc[1, "vs darts: test/JaccardIndex difference mean"] == pytest.approx(sum(differences) / 2)
    assert "| rare-positives |" in again.stdout and "(better on" in again.stdout
    assert (out / "comparison.png").stat().st_size > 0 and json.loads((out / "comparison.json").read_text())["runs"] == 4
    stored = tomllib.loads((out / "runs" / "rare-positives-seed2" / "config.toml").read_text())
    assert stored["train"]["recipe"] == "rare-positives" and stored["train"]["seed"] == 2


def test_a_comparison_without_a_held_out_split_is_one_sentence(demo_dir, tmp_path):
    from smptrain.search.recipes import Comparison, compare, named

    with pytest.raises(UserError, match="needs a held-out test split"):
        compare(None, [f"data.dir='{demo_dir}'", "data.split_method='none'"], Comparison(named(["darts"]), [1]),
                tmp_path / "cmp")
    with pytest.raises(UserError, match="'fastest' is not a recipe"):
        named(["darts", "fastest"])


@pytest.mark.slow
def test_compare_writes_next_to_the_runs_by_default(trained_run, tmp_path):
    result = run(["smptrain-compare", str(trained_run)], cwd=tmp_path, check=True)
    assert (trained_run / "compare.csv").is_file() and (trained_run / "compare.png").is_file()
    assert not (tmp_path / "compare.csv").exists() and str(trained_run / "compare.csv") in result.stdout
