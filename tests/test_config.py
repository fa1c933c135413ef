import tomllib

import pytest
from helpers import ROOT

from smptrain.config import Config, dump_toml, load_config, to_dict
from smptrain.core.errors import UserError


def test_base_toml_documents_every_key_with_its_default():
    base = tomllib.loads((ROOT / "configs" / "base.toml").read_text())
    defaults = to_dict(Config())
    assert {s: set(v) for s, v in base.items()} == {s: set(v) for s, v in defaults.items()}
    assert load_config(ROOT / "configs" / "base.toml") == Config()


@pytest.mark.parametrize("name", ["demo.toml", "tiny.toml", "base.toml"])
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / name)


def test_overrides_are_typed_and_strict():
    cfg = load_config(None, ["train.lr=3e-4", "data.split_method=region", "data.split_by=['East', 'West']",
                             "train.focal_alpha=none", "train.augment=['D4', 'Blur']", "train.max_epochs=7"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_epochs == 7 and cfg.train.focal_alpha is None
    assert cfg.data.split_by == ("East", "West") and cfg.train.augment == ("D4", "Blur")
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # an int is a valid float
    assert load_config(None, ["data.split_by=[0.2]"]).data.split_by == (0.2,)


@pytest.mark.parametrize("override, words", [
    ("train.learning_rate=1e-3", ["train.learning_rate", "did you mean train.lr"]),
    ("trian.lr=1e-3", ["[trian]", "did you mean train"]),
    ("train.max_epochs=ten", ["train.max_epochs", "int", "'ten'"]),
    ("train.max_epochs=2.5", ["train.max_epochs", "int"]),
    ("data.in_memory=1", ["data.in_memory", "bool"]),
    ("data.split_method=randm", ["data.split_method", "random, region, sample, none"]),
    ("train.augment=['Flip']", ["train.augment", "HorizontalFlip"]),
    ("data.fold=5", ["data.fold", "between 0 and"]),
    ("train.lr", ["section.key=value"]),
    ("train.learnig_rate=1e-3", ["given with --set", "did you mean train.lr?"]),  # misspelt synonym
    ("data.epochs=3", ["data.epochs", "did you mean train.max_epochs?"]),  # synonym in another section
    ("model.batch=4", ["did you mean train.batch_size?"]),
    ("train.max_epoch=3", ["did you mean train.max_epochs?"]),  # closest last component
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(UserError) as error:
        load_config(None, [override])
    for word in words:
        assert word in str(error.value)


def test_set_errors_name_set_and_not_the_file(tmp_path):
    config = tmp_path / "demo_copy.toml"
    config.write_text("[train]\nlr = 1e-3\n")
    with pytest.raises(UserError) as error:
        load_config(config, ["train.learnig_rate=1e-3"])
    assert "--set" in str(error.value) and "demo_copy.toml" not in str(error.value)
    with pytest.raises(UserError) as error:
        load_config(config, ["train.max_epochs=ten"])
    assert "--set train.max_epochs" in str(error.value)


def test_toml_errors_name_file_and_position(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = = 3\n")
    with pytest.raises(UserError, match=r"bad.toml is not valid TOML.*line 2"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_dump_toml_round_trips(tmp_path):
    cfg = load_config(None, ["train.focal_alpha=0.25", "data.split_by=[0.3]", "log.run_name=a \"quoted\" name",
                             "train.augment=['D4']"])
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def test_the_configuration_imports_neither_torch_nor_pandas():
    """Reading and checking a configuration (every command does it first) needs no heavy import."""
    import subprocess
    import sys

    script = ("import sys, smptrain.config, smptrain.cli; smptrain.config.load_config('configs/base.toml'); "
              "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_nested_replace_changes_only_the_named_keys():
    from smptrain.config import Config, replace

    cfg = replace(Config(), **{"data.fold": 2, "train.seed": 21, "log.run_name": "x"})
    assert (cfg.data.fold, cfg.train.seed, cfg.log.run_name) == (2, 21, "x")
    assert cfg.model == Config().model and cfg.data.dir == Config().data.dir


def test_the_names_inside_a_run_directory_are_written_in_layout_py_only():
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "smptrain"
    names = re.compile(r'"(checkpoints|splits\.json|run\.json|metrics\.jsonl|previews|threshold\.json|model\.safetensors|'
                       r'meta\.json)"')
    found = [f"{path.relative_to(package)}:{number}" for path in package.rglob("*.py") if path.name != "layout.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if names.search(line)]
    assert not found, found


def test_every_subpackage_is_a_package_that_installs():
    """A folder of modules without __init__.py imports from a checkout but is left out of a wheel."""
    from pathlib import Path

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    folders = {".".join(p.parent.relative_to(root).parts) for p in (root / "smptrain").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert folders == set(find_packages(str(root), include=["smptrain*"]))
