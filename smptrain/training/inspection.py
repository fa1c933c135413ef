"""What `smptrain-inspect` finds: a dataset validated and what each split and fold of a configuration would hold,
before anything is trained.

It says how each key of a DARTS `[darts]` table was read, checks the layout (files, shapes, dtypes, band names,
metadata index), scans every value (labels in {0, 1, 2}, finite inputs, the `empty` column agreeing with the
labels), builds the model and passes one zero patch through it, then gives per-split and per-fold statistics. The
split manifest {"train", "val", "test"} of sorted zarr rows is the file training writes as `splits.json`. What
training would refuse (damaged values, a training band without normalisation, a model that cannot take the patches)
is raised after the report, as one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

from smptrain.config import Loaded
from smptrain.core.errors import UserError
from smptrain.core.progress import configure as configure_progress
from smptrain.core.storage import write_text
from smptrain.data.darts import ARRAYS, METADATA, open_dataset
from smptrain.data.scan import MISSING_CHUNKS, mismatch_sentence, scan_values
from smptrain.data.splits import make_splits, split_fold, split_stats, split_test
from smptrain.training.prepare import check_model_of
from smptrain.training.schedule import describe as describe_schedule


def inspect(loaded: Loaded, *, json_out: str | Path | None = None, say=print) -> dict:
    """Report on the dataset and splits of a configuration as read (`loaded`) through `say`, line by line; write the
    split manifest to `json_out` if given; return the splits. Raises the sentence training would end with, after the
    report, when training would refuse the data or the configuration."""
    cfg = loaded.config
    configure_progress(cfg.log.progress)
    if loaded.darts.lines:
        say(f"DARTS configuration [darts] in {loaded.source}, read as:")
        for key, value, target in loaded.darts.lines:
            say(f"  {key} = {value!r} -> {target}")
    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    report_dataset(info, cfg, say)
    errors = report_values(info, cfg, say)
    splits = make_splits(info.metadata, cfg.data, cfg.train.seed)
    report_splits(info, cfg, loaded, splits, say)
    if json_out:
        write_text(Path(json_out), json.dumps(splits) + "\n")
        say(f"wrote the split manifest to {json_out}")
    try:
        info.band_meta(info.band_indices(cfg.data.bands))  # what training refuses before it writes anything
    except UserError as error:
        errors.insert(0, str(error))
    try:
        check_model_of(cfg)
        say(f"model: {cfg.model.arch} with {cfg.model.encoder} takes {info.patch_size} x {info.patch_size} patches")
    except UserError as error:
        errors.insert(0, str(error))
    if errors:
        raise UserError("; and ".join(errors))
    return splits


def report_dataset(info, cfg, say) -> None:
    """The dataset's rows, patch size, bands and each band's normalisation."""
    bands = [info.bands[i] for i in info.band_indices(cfg.data.bands)]
    say(f"dataset {info.root}: {info.num_rows} zarr rows, {len(info.metadata)} in metadata, "
        f"patch size {info.patch_size}, {len(info.bands)} bands ({', '.join(info.bands)})")
    say(f"training bands: {', '.join(bands)}")
    say(f"normalisation ({info.convention}; model input = clip(value * factor + offset, 0, 1)):")
    for name, factor, offset in zip(info.bands, info.band_factors, info.band_offsets):
        known = f"factor {factor:.6g}, offset {offset:.6g}" if factor is not None else "unknown (give data.band_normalisation)"
        say(f"  {name:<20} {known}")


def report_values(info, cfg, say) -> list[str]:
    """Scan every value; warnings said, and the sentences of what training refuses returned."""
    found = scan_values(info)
    problems = []
    if found["bad_labels"]:
        values = ", ".join(str(v) for v in found["bad_values"][:10])
        problems.append(f"{len(found['bad_labels'])} patch(es) have labels outside {{0 background, 1 positive, "
                        f"2 ignored}} (values {values}; zarr rows {found['bad_labels'][:10]})")
    if found["non_finite"]:
        problems.append(f"{len(found['non_finite'])} patch(es) hold NaN or inf in x (zarr rows {found['non_finite'][:10]})")
    if found["out_of_range"]:
        say(f"warning: {len(found['out_of_range'])} patch(es) have inputs outside [0, 1] (DARTS data is normalised to "
            f"[0, 1]): zarr rows {found['out_of_range'][:10]}")
    for band, rows in found["zero_bands"].items():
        say(f"warning: band {band} is all zeros in {len(rows)} labelled patch(es): zarr rows {rows[:10]} "
            f"({MISSING_CHUNKS})")
    contradiction = mismatch_sentence(found["empty_mismatch"], info.root / METADATA)
    refused = contradiction and not cfg.data.accept_empty_mismatch
    if contradiction and not refused:
        say(f"warning: {contradiction} (data.accept_empty_mismatch = true: training uses them as they are)")
    if found["unreferenced_rows"]:
        say(f"note: {found['unreferenced_rows']} zarr row(s) have no metadata row and are never used")
    errors = [f"{info.root / ARRAYS}: " + "; ".join(problems) + "; training stops on such patches"] if problems else []
    if refused:
        errors.append(f"{contradiction}; training refuses them unless data.accept_empty_mismatch = true")
    return errors


def report_splits(info, cfg, loaded: Loaded, splits: dict, say) -> None:
    """Each split's statistics, the recipe's keys, the schedule, and every fold."""
    say(f"split: data.split_method = {cfg.data.split_method}, split_by = {list(cfg.data.split_by)}; "
        f"fold: {cfg.data.fold_method}, fold {cfg.data.fold} of {cfg.data.total_folds}")
    for name in ("train", "val", "test"):
        say(describe(name, split_stats(info.metadata, splits[name])))
    if loaded.from_recipe:
        say(f"recipe {cfg.train.recipe} (smptrain/config/recipes.toml) set: {', '.join(loaded.from_recipe)}")
    per_epoch = len(splits["train"]) // (cfg.train.batch_size * cfg.train.grad_accum_steps)
    if per_epoch:
        say(f"{describe_schedule(cfg.train, per_epoch)} (one process: under accelerate launch, an epoch has 1/N of "
            f"these steps on N processes)")
    if cfg.data.fold_method != "none":
        trainval, _ = split_test(info.metadata, cfg.data.split_method, cfg.data.split_by, cfg.data.dir)
        part = info.metadata.loc[trainval]
        say(f"all {cfg.data.total_folds} folds ({cfg.data.fold_method}):")
        for fold in range(cfg.data.total_folds):
            train, val = split_fold(part, cfg.data.fold_method, cfg.data.total_folds, fold, cfg.train.seed)
            s = split_stats(info.metadata, list(val))
            say(f"  fold {fold}: train {len(train):>6}, val {s['patches']:>6} ({s['positive_patches']} with "
                f"positives; regions: {', '.join(s['regions'][:6])})")


def describe(name: str, stats: dict) -> str:
    regions = ", ".join(stats["regions"][:6]) + (" ..." if len(stats["regions"]) > 6 else "")
    return (f"  {name:<6} {stats['patches']:>7} patches  {stats['positive_patches']:>7} with positives  "
            f"{stats['sample_ids']:>5} sample ids  regions: {regions}")
