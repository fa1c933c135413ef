import pandas as pd
import pytest

from smptrain.config import load_config
from smptrain.core.errors import UserError
from smptrain.data.splits import make_splits, split_fold, split_test


@pytest.fixture
def metadata():
    # 30 patches, stored shuffled: the index labels (zarr rows) are not in order
    rows = [(i, ["North", "South", "West", "East", "Centre"][i % 5], f"s{i % 10}", i % 3 == 0) for i in range(30)]
    frame = pd.DataFrame(rows, columns=["row", "region", "sample_id", "empty"]).set_index("row")
    frame.index.name = None
    return frame.sample(frac=1, random_state=7)


def data(**values):
    return load_config(None, [f"data.{k}={v!r}" if isinstance(v, (list, str)) else f"data.{k}={v}"
                              for k, v in values.items()]).data


def test_random_holds_out_the_fraction_with_seed_42(metadata):
    trainval, test = split_test(metadata, "random", [0.2])
    assert len(test) == 6 and set(test) == set(metadata.sample(frac=0.2, random_state=42).index)
    assert set(trainval).isdisjoint(test) and len(trainval) + len(test) == 30
    assert list(split_test(metadata, "random", [0.2])[1]) == list(test)  # deterministic


def test_region_and_sample_hold_out_exactly_the_listed_values(metadata):
    trainval, test = split_test(metadata, "region", ["West", "East"])
    assert set(metadata.loc[test, "region"]) == {"West", "East"} and len(test) == 12
    assert not set(metadata.loc[trainval, "region"]) & {"West", "East"}
    _, test = split_test(metadata, "sample", ["s2", "s5"])
    assert set(metadata.loc[test, "sample_id"]) == {"s2", "s5"} and len(test) == 6


def test_none_tests_on_everything_and_trains_on_everything(metadata):
    trainval, test = split_test(metadata, "none", [])
    assert set(trainval) == set(test) == set(metadata.index)
    splits = make_splits(metadata, data(split_method="none", fold_method="none"), 42)
    assert splits["train"] == splits["val"] == splits["test"] == sorted(metadata.index)


def test_kfold_is_contiguous_in_stored_order_and_partitions(metadata):
    vals = []
    for fold in range(5):
        train, val = split_fold(metadata, "kfold", 5, fold, seed=1)
        assert list(val) == list(metadata.index[fold * 6:(fold + 1) * 6])
        assert set(train).isdisjoint(val) and len(train) + len(val) == 30
        vals += list(val)
    assert sorted(vals) == sorted(metadata.index)


@pytest.mark.parametrize("method", ["shuffle", "stratified", "region", "region-stratified"])
def test_seeded_folds_are_deterministic_and_disjoint(metadata, method):
    a = split_fold(metadata, method, 3, 1, seed=42)
    b = split_fold(metadata, method, 3, 1, seed=42)
    assert list(a[0]) == list(b[0]) and list(a[1]) == list(b[1])
    assert set(a[0]).isdisjoint(a[1]) and len(a[1]) > 0
    if method.startswith("region"):
        assert set(metadata.loc[a[0], "region"]).isdisjoint(metadata.loc[a[1], "region"])


def test_manifest_is_sorted_zarr_rows_and_disjoint(metadata):
    splits = make_splits(metadata, data(split_method="region", split_by=["North"], fold_method="kfold",
                                        total_folds=4, fold=2), 42)
    assert all(s == sorted(s) for s in splits.values())
    assert set(splits["train"]).isdisjoint(splits["val"]) and set(splits["train"]).isdisjoint(splits["test"])
    assert set(splits["val"]).isdisjoint(splits["test"])
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(metadata.index)


@pytest.mark.parametrize("method, by, words", [
    ("region", ["Atlantis"], ["unknown region", "Atlantis", "North"]),
    ("sample", ["nope"], ["unknown sample_id", "nope"]),
    ("random", [1.5], ["between 0 and 1"]),
    ("random", [0.0], ["between 0 and 1"]),
    ("random", [0.2, 0.3], ["exactly one"]),
    ("random", ["0.2"], ["exactly one"]),
    ("region", [], ["must list"]),
    ("region", ["North", "South", "West", "East", "Centre"], ["nothing is left for training"]),
])
def test_impossible_test_splits_are_clear_errors(metadata, method, by, words):
    with pytest.raises(UserError) as error:
        split_test(metadata, method, by)
    for word in words:
        assert word in str(error.value)


def test_impossible_folds_are_clear_errors(metadata):
    with pytest.raises(UserError, match="between 0 and"):
        split_fold(metadata, "kfold", 3, 3, seed=1)
    with pytest.raises(UserError, match="cannot split"):
        split_fold(metadata, "region-stratified", 8, 0, seed=1)  # 5 regions, 8 folds
