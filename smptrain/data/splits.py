"""Test split and train/validation folds, exactly as the DARTS training guide describes them.

Two levels, both on the metadata table (whose index labels are zarr row numbers) in its stored row order:

1. the **test split** (`data.split_method`): `random` holds out `split_by[0]` (a fraction in (0, 1)) of the patches,
   drawn with seed 42; `region` holds out the listed regions; `sample` the listed sample ids; `none` tests on the
   whole dataset (and trains on it too).
2. the **fold** of the remaining patches (`data.fold_method`), with the sklearn generators DARTS uses:
   `kfold` = KFold (contiguous, unshuffled), `shuffle` = StratifiedShuffleSplit (10 % val, seed 42),
   `stratified` = StratifiedKFold (shuffled, seed 42), `region` = GroupShuffleSplit by region (20 % of the regions,
   seeded with `train.seed`, where DARTS left it to the global RNG), `region-stratified` = StratifiedGroupKFold by
   region (seed 42), `none` = validate on the training part. Stratification is on "has a positive pixel".

Every impossible request (unknown region or sample id, fraction outside (0, 1), too few groups, an empty set) is a
`UserError`, never a silently empty split.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from smptrain.core.errors import UserError

RANDOM_SPLIT_SEED = 42  # the user's guide: "the seed is always 42"
FOLD_SEED = 42  # DARTS' random_state for the shuffled fold generators


def listed(by, root=None) -> list:
    """`data.split_by` with every `@FILE` entry replaced by the values the file lists, one per line (`#` starts a
    comment): a held-out set a dataset already has (`smptrain-import --heldout` writes `heldout.txt`) without listing
    every id in the configuration. A relative FILE is read from the dataset directory."""
    values = []
    for entry in list(by or ()):
        if not (isinstance(entry, str) and entry.startswith("@")):
            values.append(entry)
            continue
        path = Path(entry[1:])
        path = path if path.is_absolute() or root is None else Path(root) / path
        try:
            text = path.read_text()
        except OSError as error:
            raise UserError(f"data.split_by lists {entry!r}, but {path} cannot be read: {error.strerror or error}") from None
        found = [line.split("#")[0].strip() for line in text.splitlines()]
        values.extend(value for value in found if value)
    return values


def split_test(metadata: pd.DataFrame, method: str, by, root=None) -> tuple[pd.Index, pd.Index]:
    """Return (train+val index labels, test index labels) for a test-split method (`root`: the dataset directory,
    where `@FILE` entries of `by` are read)."""
    by = listed(by, root)
    if method == "none":
        return metadata.index, metadata.index
    if method == "random":
        if len(by) != 1 or isinstance(by[0], str) or not 0 < float(by[0]) < 1:
            raise UserError(
                f"data.split_by must hold exactly one test fraction between 0 and 1 for split_method 'random', got {by}"
            )
        test = metadata.sample(frac=float(by[0]), random_state=RANDOM_SPLIT_SEED).index
        if len(test) == 0:
            raise UserError(f"data.split_by = {by}: a test fraction of {by[0]} of {len(metadata)} patches is empty")
    elif method in ("region", "sample"):
        column = "region" if method == "region" else "sample_id"
        if not by:
            raise UserError(f"data.split_by must list the {column} values to hold out for split_method '{method}'")
        known = {str(v) for v in metadata[column].unique()}
        wanted = [str(v) for v in by]
        unknown = [v for v in wanted if v not in known]
        if unknown:
            listing = ", ".join(sorted(known)[:20]) + (" ..." if len(known) > 20 else "")
            raise UserError(f"data.split_by names unknown {column} value(s) {unknown}; the dataset has: {listing}")
        test = metadata.index[metadata[column].astype(str).isin(wanted)]
    else:
        raise UserError(f"data.split_method must be one of random, region, sample, none, got {method!r}")
    trainval = metadata.index.difference(test, sort=False)
    if len(trainval) == 0:
        raise UserError(f"data.split_by = {by} holds out every patch; nothing is left for training")
    return trainval, test


def split_fold(metadata: pd.DataFrame, method: str, total_folds: int, fold: int, seed: int) -> tuple[pd.Index, pd.Index]:
    """Split the train+val part (`metadata`, stored order) into (train labels, val labels) by the fold method."""
    if method == "none":
        return metadata.index, metadata.index
    from sklearn.model_selection import GroupShuffleSplit, KFold, StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

    if not 0 <= fold < total_folds:
        raise UserError(f"data.fold must be between 0 and data.total_folds - 1 = {total_folds - 1}, got {fold}")
    positive = (~metadata["empty"].astype(bool)).to_numpy()
    groups = metadata["region"].astype(str).to_numpy()
    rows = np.arange(len(metadata))
    generators = {
        "kfold": lambda: KFold(total_folds).split(rows),
        "shuffle": lambda: StratifiedShuffleSplit(n_splits=total_folds, random_state=FOLD_SEED).split(rows, positive),
        "stratified": lambda: StratifiedKFold(total_folds, shuffle=True, random_state=FOLD_SEED).split(rows, positive),
        "region": lambda: GroupShuffleSplit(total_folds, random_state=seed).split(rows, groups=groups),
        "region-stratified": lambda: StratifiedGroupKFold(total_folds, shuffle=True, random_state=FOLD_SEED).split(
            rows, positive, groups
        ),
    }
    if method not in generators:
        raise UserError(f"data.fold_method must be one of {', '.join([*generators, 'none'])}, got {method!r}")
    try:
        with warnings.catch_warnings():
            # StratifiedKFold warns when a class has fewer members than folds; the folds are still valid.
            warnings.simplefilter("ignore", UserWarning)
            for i, (train_pos, val_pos) in enumerate(generators[method]()):
                if i == fold:
                    break
            else:
                raise UserError(f"data.fold_method '{method}' produced no fold {fold}")
    except ValueError as error:
        raise UserError(
            f"data.fold_method '{method}' with data.total_folds = {total_folds} cannot split the "
            f"{len(metadata)} training patches ({len(set(groups))} regions): {error}"
        ) from None
    if len(train_pos) == 0 or len(val_pos) == 0:
        raise UserError(
            f"data.fold_method '{method}' fold {fold} leaves an empty {'training' if len(train_pos) == 0 else 'validation'} set"
        )
    return metadata.index[train_pos], metadata.index[val_pos]


def make_splits(metadata: pd.DataFrame, data_cfg, seed: int) -> dict[str, list[int]]:
    """The split manifest {"train", "val", "test"}: sorted zarr row numbers."""
    trainval, test = split_test(metadata, data_cfg.split_method, data_cfg.split_by, data_cfg.dir)
    train, val = split_fold(metadata.loc[trainval], data_cfg.fold_method, data_cfg.total_folds, data_cfg.fold, seed)
    subsample = getattr(data_cfg, "subsample", 0)
    if subsample:
        # DARTS' --subsample draws with random_state 42; here from the training split only, so validation and test
        # stay the ones a full run would see.
        if subsample > len(train):
            raise UserError(f"data.subsample = {subsample} is more than the {len(train)} patches of the training split")
        train = metadata.loc[train].sample(subsample, random_state=RANDOM_SPLIT_SEED).index
    return {name: sorted(int(i) for i in labels) for name, labels in (("train", train), ("val", val), ("test", test))}


def split_stats(metadata: pd.DataFrame, rows: list[int]) -> dict:
    """Counts for one split: patches, patches with a positive pixel, regions and sample ids."""
    part = metadata.loc[rows]
    return {
        "patches": len(part),
        "positive_patches": int((~part["empty"].astype(bool)).sum()),
        "regions": sorted(str(r) for r in part["region"].unique()),
        "sample_ids": int(part["sample_id"].nunique()),
    }
