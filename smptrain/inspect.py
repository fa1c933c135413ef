"""`smptrain-inspect`: validate a DARTS dataset and show what each split and fold would hold.

    smptrain-inspect --config FILE [--set section.key=value ...] [--json OUT]
    smptrain-inspect --config FILE --download-weights    # fill the weights cache for offline training nodes

It prints how each key of a DARTS `[darts]` table was read, checks the layout (files, shapes, dtypes, band names,
metadata index), scans every value (labels in {0, 1, 2}, finite inputs, the `empty` column agreeing with the
labels), builds the model and passes one zero patch through it, then prints per-split and per-fold statistics.
`--json OUT` writes the split manifest {"train", "val", "test"} of sorted zarr row numbers, the same file training
writes as `splits.json`. Exit status 2, after the report, when training would refuse the dataset or the
configuration (damaged values, a training band without normalisation).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from smptrain.cli import config_options, read_options
from smptrain.training.prepare import check_model_of
from smptrain.data.dataset import open_dataset
from smptrain.data.scan import MISSING_CHUNKS, mismatch_sentence, scan_values
from smptrain.storage import write_text
from smptrain.errors import UserError
from smptrain.cli import report_user_errors
from smptrain.training.schedule import describe as describe_schedule
from smptrain.data.splits import make_splits, split_fold, split_stats, split_test


def describe(name: str, stats: dict) -> str:
    regions = ", ".join(stats["regions"][:6]) + (" ..." if len(stats["regions"]) > 6 else "")
    return (f"  {name:<6} {stats['patches']:>7} patches  {stats['positive_patches']:>7} with positives  "
            f"{stats['sample_ids']:>5} sample ids  regions: {regions}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the split manifest {train, val, test} (sorted zarr rows) to this file.")
@click.option("--download-weights", is_flag=True,
              help="Only fill the download cache with the config's model.encoder_weights (e.g. imagenet) and say "
                   "where it is: run it where there is network, then train offline (HF_HUB_OFFLINE=1).")
@config_options
@report_user_errors
def main(json_out, download_weights, config_path, overrides, debug):
    """Validate the dataset of a config and print split and fold statistics."""
    loaded = read_options(config_path, overrides, debug)
    cfg = loaded.config
    if download_weights:
        from smptrain.model import download_weights as fill

        cache = fill(cfg.model.encoder, cfg.model.encoder_weights)
        click.echo(f"{cfg.model.encoder} weights {cfg.model.encoder_weights!r} are in {cache}")
        return
    if loaded.darts.lines:
        click.echo(f"DARTS configuration [darts] in {loaded.source}, read as:")
        for key, value, target in loaded.darts.lines:
            click.echo(f"  {key} = {value!r} -> {target}")
    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    bands = [info.bands[i] for i in info.band_indices(cfg.data.bands)]
    click.echo(f"dataset {info.root}: {info.num_rows} zarr rows, {len(info.metadata)} in metadata, "
               f"patch size {info.patch_size}, {len(info.bands)} bands ({', '.join(info.bands)})")
    click.echo(f"training bands: {', '.join(bands)}")
    click.echo(f"normalisation ({info.convention}; model input = clip(value * factor + offset, 0, 1)):")
    for name, factor, offset in zip(info.bands, info.band_factors, info.band_offsets):
        known = f"factor {factor:.6g}, offset {offset:.6g}" if factor is not None else "unknown (give data.band_normalisation)"
        click.echo(f"  {name:<20} {known}")
    found = scan_values(info)
    problems = []
    if found["bad_labels"]:
        problems.append(f"{len(found['bad_labels'])} patch(es) have labels outside {{0, 1, 2}} (zarr rows {found['bad_labels'][:10]})")
    if found["non_finite"]:
        problems.append(f"{len(found['non_finite'])} patch(es) hold NaN or inf in x (zarr rows {found['non_finite'][:10]})")
    if found["out_of_range"]:
        click.echo(f"warning: {len(found['out_of_range'])} patch(es) have inputs outside [0, 1] (DARTS data is "
                   f"normalised to [0, 1]): zarr rows {found['out_of_range'][:10]}")
    for band, rows in found["zero_bands"].items():
        click.echo(f"warning: band {band} is all zeros in {len(rows)} labelled patch(es): zarr rows {rows[:10]} "
                   f"({MISSING_CHUNKS})")
    contradiction = mismatch_sentence(found["empty_mismatch"], info.root / "metadata.parquet")
    refused = contradiction and not cfg.data.accept_empty_mismatch
    if contradiction and not refused:
        click.echo(f"warning: {contradiction} (data.accept_empty_mismatch = true: training uses them as they are)")
    if found["unreferenced_rows"]:
        click.echo(f"note: {found['unreferenced_rows']} zarr row(s) have no metadata row and are never used")

    splits = make_splits(info.metadata, cfg.data, cfg.train.seed)
    click.echo(f"split: data.split_method = {cfg.data.split_method}, split_by = {list(cfg.data.split_by)}; "
               f"fold: {cfg.data.fold_method}, fold {cfg.data.fold} of {cfg.data.total_folds}")
    for name in ("train", "val", "test"):
        click.echo(describe(name, split_stats(info.metadata, splits[name])))
    if loaded.from_recipe:
        click.echo(f"recipe {cfg.train.recipe} (smptrain/recipes.toml) set: {', '.join(loaded.from_recipe)}")
    per_epoch = len(splits["train"]) // (cfg.train.batch_size * cfg.train.grad_accum_steps)
    if per_epoch:
        click.echo(f"{describe_schedule(cfg.train, per_epoch)} (one process: under accelerate launch, an epoch has "
                   f"1/N of these steps on N processes)")
    if cfg.data.fold_method != "none":
        trainval, _ = split_test(info.metadata, cfg.data.split_method, cfg.data.split_by)
        part = info.metadata.loc[trainval]
        click.echo(f"all {cfg.data.total_folds} folds ({cfg.data.fold_method}):")
        for fold in range(cfg.data.total_folds):
            train, val = split_fold(part, cfg.data.fold_method, cfg.data.total_folds, fold, cfg.train.seed)
            s = split_stats(info.metadata, list(val))
            click.echo(f"  fold {fold}: train {len(train):>6}, val {s['patches']:>6} ({s['positive_patches']} with "
                       f"positives; regions: {', '.join(s['regions'][:6])})")
    if json_out:
        write_text(Path(json_out), json.dumps(splits) + "\n")
        click.echo(f"wrote the split manifest to {json_out}")
    errors = [f"{info.root / 'data.zarr'}: " + "; ".join(problems) + "; training stops on such patches"] if problems else []
    if refused:
        errors.append(f"{contradiction}; training refuses them unless data.accept_empty_mismatch = true")
    try:
        info.band_meta(info.band_indices(cfg.data.bands))  # what training refuses before it writes anything
    except UserError as error:
        errors.insert(0, str(error))
    try:
        check_model_of(cfg)
        click.echo(f"model: {cfg.model.arch} with {cfg.model.encoder} takes {info.patch_size} x {info.patch_size} patches")
    except UserError as error:
        errors.insert(0, str(error))
    if errors:
        raise UserError("; and ".join(errors))


if __name__ == "__main__":
    main()
