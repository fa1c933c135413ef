"""DARTS configuration files read as they are: the [darts] table flattened, hyphenated keys, keys of other DARTS
commands named and ignored, unknown keys refused with the closest name; `--set` with DARTS' names."""

import pytest

from smptrain.config import load_config, read_config
from smptrain.config.darts import flatten
from smptrain.core.errors import UserError

# The shape of DARTS' training quickstart (docs/guides/training/quickstart.md): sub-tables, hyphenated keys, keys
# of preprocessing, Earth Engine and paths, and a [hyperparameters] table for tuning in the same file.
QUICKSTART = """
[darts.wandb]
wandb-project = ""
wandb-entity = "someone"
ee-project = "my-ee-project"

[darts.paths]
data-dir = "/path/to/planet_data"
arcticdem-dir = "/path/to/arcticdem2m.icechunk"
preprocess-cache = "/path/to/cache"
artifact-dir = "{artifacts}"

[darts.training.paths]
labels-dir = "/path/to/ML_training_labels"
train-data-dir = "{data}"

[darts.preprocess]
tpi-outer-radius = 100
mask-erosion-size = 3

[darts.training]
device = "auto"
num-workers = 0
max-epochs = 1
log-every-n-steps = 2
check-val-every-n-epoch = 1
plot-every-n-val-epochs = 0
early-stopping-patience = 0
fold = 0

[darts.test]
data-split-method = "region"
data-split-by = ['Yamal']

[darts.training.preprocessing]
patch-size = 64
overlap = 16
exclude-nan = false

[darts.cross-validation]
fold-method = "kfold"
total-folds = 3
n-folds = 2
n-randoms = 1
scoring-metric = ["val/JaccardIndex", "val/Recall"]
multi-score-strategy = "geometric"

[darts.training.hyperparameters]
learning-rate = 4e-4
batch-size = 4
gamma = 0.999
focal-loss-alpha = 0.92
focal-loss-gamma = 1.6
model-arch = "Unet"
model-encoder = "resnet18"
augment = ["HorizontalFlip", "VerticalFlip"]

[darts.tuning]
hpconfig = "{self}"
n-trials = "grid"

[hyperparameters]
learning-rate = 4e-4
model-encoder = ["tu-maxvit_tiny_rw_224", "resnet18"]
"""


def quickstart(tmp_path, data_dir="/data/planet_quickstart", text=QUICKSTART):
    path = tmp_path / "planet-training-quickstart.toml"
    path.write_text(text.format(data=data_dir, artifacts=tmp_path / "artifacts", self=path))
    return path


def test_flattening_ignores_sub_tables_and_the_last_equal_key_wins():
    flat = flatten({"a": {"learning-rate": 1e-3, "b": {"batch-size": 4}}, "learning-rate": 4e-4})
    assert flat == {"learning_rate": ("learning-rate", 4e-4), "batch_size": ("a.b.batch-size", 4)}


def test_a_darts_quickstart_file_is_a_configuration(tmp_path):
    loaded = read_config(quickstart(tmp_path))
    cfg = loaded.config
    assert (cfg.data.dir, cfg.data.split_method, cfg.data.split_by) == ("/data/planet_quickstart", "region", ("Yamal",))
    assert (cfg.data.fold_method, cfg.data.total_folds, cfg.data.fold, cfg.data.num_workers) == ("kfold", 3, 0, 0)
    assert (cfg.model.arch, cfg.model.encoder) == ("Unet", "resnet18")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.gamma) == (4e-4, 4, 0.999)
    assert (cfg.train.focal_alpha, cfg.train.focal_gamma, cfg.train.max_epochs) == (0.92, 1.6, 1)
    assert cfg.train.augment == ("HorizontalFlip", "VerticalFlip") and cfg.train.val_every_n_epochs == 1
    assert (cfg.log.artifact_dir, cfg.log.log_every_n_steps, cfg.log.preview_every_n_val) == (
        str(tmp_path / "artifacts"), 2, 0)
    assert cfg.log.wandb_entity == "someone"
    assert loaded.darts.options == {"folds": 2, "n_randoms": 1, "scoring": "val/JaccardIndex,val/Recall",
                                    "strategy": "geometric", "space": str(tmp_path / "planet-training-quickstart.toml"),
                                    "sampler": "grid"}
    line = loaded.darts.ignored_line("F")
    for key in ("ee-project", "data-dir", "arcticdem-dir", "labels-dir", "tpi-outer-radius", "patch-size", "overlap"):
        assert key in line
    assert "device (accelerate launch places the processes)" in line
    targets = {key: target for key, _, target in loaded.darts.lines}
    assert targets["[darts] training.hyperparameters.learning-rate"] == "train.lr"
    assert targets["[darts] cross-validation.n-folds"].startswith("--folds")


def test_our_own_sections_win_over_darts_and_set_wins_over_both(tmp_path):
    path = quickstart(tmp_path, text=QUICKSTART + "\n[train]\nlr = 1e-2\nmax-epochs = 3\n")
    loaded = read_config(path, ["learning-rate=5e-3", "darts.batch_size=2", "train.grad-accum-steps=2"])
    cfg = loaded.config
    assert (cfg.train.lr, cfg.train.max_epochs, cfg.train.batch_size, cfg.train.grad_accum_steps) == (5e-3, 3, 2, 2)
    targets = {key: target for key, _, target in loaded.darts.lines}
    assert targets["[darts] training.max-epochs"] == "train.max_epochs (overridden by [train] max-epochs)"


@pytest.mark.parametrize("text, words", [
    ("[darts]\nlearnig-rate = 1e-3\n", ["unknown key [darts] learnig-rate", "no DARTS command has it",
                                         "did you mean learning-rate?"]),
    ("[darts.training]\nmax-epoch = 3\n", ["[darts] training.max-epoch", "did you mean max-epochs?"]),
    ("[darts]\nlearning-rate = \"fast\"\n", ["train.lr", "(as [darts] learning-rate)", "must be a float"]),
    ("[darts]\nbatch-size = 0\n", ["train.batch_size", "(as [darts] batch-size)", "at least 1"]),
    ("[darts]\nn-folds = \"two\"\n", ["[darts] n-folds", "must be an integer"]),
    ("[darts]\nfold-method = \"random\"\n", ["data.fold_method", "(as [darts] fold-method)", "must be one of"]),
    ("darts = 3\n", ["[darts] in", "must be a table"]),
])
def test_a_wrong_darts_key_or_value_is_one_sentence_naming_it(tmp_path, text, words):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_config(path)
    for word in words:
        assert word in str(error.value)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("override, words", [
    ("n-folds=2", ["--set n-folds", "--folds of smptrain-cv"]),
    ("ee_project=x", ["--set ee-project", "does not use", "another DARTS command"]),
    ("device=0", ["--set device", "accelerate launch"]),
    ("learnin-rate=1", ["--set learnin-rate", "did you mean learning-rate?"]),
])
def test_set_takes_darts_names_and_refuses_the_ones_that_are_no_config_key(override, words):
    with pytest.raises(UserError) as error:
        load_config(None, [override])
    for word in words:
        assert word in str(error.value)


def test_set_takes_darts_names_hyphenated_or_not():
    cfg = load_config(None, ["learning-rate=4e-4", "model_encoder=resnet18", "check-val-every-n-epoch=2",
                             "darts.random-seed=7"])
    assert (cfg.train.lr, cfg.model.encoder, cfg.train.val_every_n_epochs, cfg.train.seed) == (4e-4, "resnet18", 2, 7)


def test_a_none_written_as_darts_means_it_is_our_default_spelling(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[darts]\ndata-split-method = "None"\nfocal-loss-alpha = "None"\nmodel-encoder-weights = "None"\n')
    cfg = load_config(path)
    assert (cfg.data.split_method, cfg.train.focal_alpha, cfg.model.encoder_weights) == ("none", None, "none")


# --- through the real commands -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_darts_file_runs_inspect_train_cv_and_tune_as_it_is(demo_dir, tmp_path):
    """The quickstart's shape with only its paths changed; the tuning space's MaxViT cannot take 64 px patches, so
    its trial fails in one sentence, leaves no directory, and the next trial runs."""
    import json

    import pandas as pd
    from helpers import run

    config = quickstart(tmp_path, demo_dir)
    inspected = run(["smptrain-inspect", "--config", str(config)], cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert "[darts] training.hyperparameters.learning-rate = 0.0004 -> train.lr" in inspected.stdout
    assert "[darts] cross-validation.n-folds = 2 -> --folds of smptrain-cv" in inspected.stdout
    assert "model: Unet with resnet18 takes 64 x 64 patches" in inspected.stdout
    assert inspected.stderr.count("[darts] keys not used here") == 1 and "tpi-outer-radius" in inspected.stderr

    trained = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=one"],
                  cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    written = (tmp_path / "artifacts" / "one" / "config.toml").read_text()
    assert "lr = 0.0004" in written and "focal_alpha = 0.92" in written and 'encoder = "resnet18"' in written

    cv = run(["smptrain-cv", "--config", str(config), "--name", "cv"], cwd=tmp_path)
    assert cv.returncode == 0, cv.stderr[-2000:]
    outcome = json.loads((tmp_path / "artifacts" / "cv" / "cv.json").read_text())
    assert (outcome["folds"], outcome["seeds"], outcome["strategy"]) == ([0, 1], [42], "geometric")

    tuned = run(["smptrain-tune", "--config", str(config), "--single-run", "--study", "study"], cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert "Traceback" not in tuned.stderr + tuned.stdout
    table = pd.read_csv(tmp_path / "artifacts" / "study" / "trials.csv")
    assert sorted(table["state"]) == ["COMPLETE", "FAIL"]
    failed = table[table["state"] == "FAIL"].iloc[0]
    assert failed["model.encoder"] == "tu-maxvit_tiny_rw_224"
    assert failed["failure"] == ("model.arch = 'Unet' with model.encoder = 'tu-maxvit_tiny_rw_224' cannot take 64 x 64 "
                                 "patches: height (16) must be divisible by window (7)")
    assert not (tmp_path / "artifacts" / "study" / f"trial-{failed['number']:04d}").exists()
    done = table[table["state"] == "COMPLETE"].iloc[0]
    assert (tmp_path / "artifacts" / "study" / done["directory"]).is_dir()


@pytest.mark.slow
def test_a_model_that_cannot_take_the_patches_is_refused_before_anything_is_written(demo_dir, tmp_path):
    from helpers import run, tiny_config

    config = tiny_config(tmp_path, demo_dir)
    for command in (["python", "-m", "smptrain.train"], ["smptrain-cv"]):
        result = run([*command, "--config", str(config), "--set", "model.encoder=tu-maxvit_tiny_rw_224"])
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            "error: model.arch = 'Unet' with model.encoder = 'tu-maxvit_tiny_rw_224' cannot take 64 x 64 patches: "
            "height (16) must be divisible by window (7)")
        assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_a_config_file_of_darts_1d2746d_reads_and_its_new_keys_of_other_commands_are_named_and_ignored(tmp_path):
    """1d2746d added aux-dir, tcvis-year, tcvis-lag, arcticdem-resolution and zoom-factor to DARTS' commands; a key
    that DARTS adds later and that is far from every training key is ignored the same way, and named."""
    path = quickstart(tmp_path, text=QUICKSTART + '\n[darts.inference]\naux-dir = "/data/aux"\ntcvis-year = 2022\n'
                                                  'tcvis-lag = 3\narcticdem-resolution = 10\nzoom-factor = 2\n'
                                                  'mosaic-tiling-scheme = "utm"\n')
    loaded = read_config(path)
    line = loaded.darts.ignored_line(str(path))
    for key in ("aux-dir", "tcvis-year", "tcvis-lag", "arcticdem-resolution", "zoom-factor"):
        assert key in line.split("(other DARTS commands)")[0]
    assert "mosaic-tiling-scheme (unknown here" in line
    assert loaded.config == read_config(quickstart(tmp_path)).config  # training reads the same as without them
    targets = {key: target for key, _, target in loaded.darts.lines}
    assert targets["[darts] inference.zoom-factor"] == "not read: a key of another DARTS command"
    assert targets["[darts] inference.mosaic-tiling-scheme"] == "not read: unknown here"
