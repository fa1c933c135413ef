"""`smptrain-test`: evaluate a checkpoint on its run's held-out test split, with DARTS' full metric set.

    smptrain-test RUN_DIR [--checkpoint best|last|PATH] [--config FILE] [--set ...] [--batch-size N] [--json OUT]
                  [--figures DIR] [--tta none|flips|d4] [--threshold 0.5|NUMBER|val-best]

The test split is re-read from the run's `splits.json` unless the keys that define it change. Pixel metrics come
from the same exact, process-count-independent counts as validation, plus object and boundary metrics, the
expected calibration error, and the same metrics per region and per sample id (from the per-sample counts). With
--tta the metrics of TTA-averaged probabilities come beside the plain ones; with --threshold, the threshold metrics
at that threshold beside those at 0.5.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from smptrain.cli import read_options
from smptrain.config import to_dict
from smptrain.core.errors import UserError
from smptrain.core.progress import configure as configure_progress
from smptrain.core.runtime import choose_precision, start_accelerator
from smptrain.core.storage import move, write_text
from smptrain.data.darts import open_dataset
from smptrain.data.dataset import PatchDataset
from smptrain.data.feed import evaluation_feed
from smptrain.data.splits import make_splits
from smptrain.evaluation import calibration as C
from smptrain.evaluation import plots
from smptrain.evaluation.breakdown import by_group, format_rows, write_csv
from smptrain.evaluation.evaluate import Extras, best_and_worst, evaluate, format_table, sample_figure, write_curves
from smptrain.model.losses import loss_from_config
from smptrain.model.network import described_model
from smptrain.training.layout import (BEST, LAST, SPLITS, TEST, TEST_METRICS, THRESHOLD, WEIGHTS, checkpoints_dir, now,
                                      run_of)
from smptrain.training.loading import load_weights, read_meta, resolve
from smptrain.training.runs import find_data, is_same_data
from smptrain.training.summary import update_summary
from smptrain.training.tracking import clean_number

TEST_PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # what --precision accepts
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # Accelerate's names -> what metrics.json records


def precision_for_test(choice: str) -> tuple[str, str]:
    """(Accelerate's precision, why) for --precision. fp32 by default: a test in the run's own precision would
    give other metrics on a CPU or GPU with native bf16 than on one without, and than the DARTS pipeline's fp32."""
    if choice == "fp32":
        return "no", "smptrain-test's default, as the DARTS pipeline computes; --precision to change"
    return choose_precision(choice)




@dataclass
class Tested:
    """A checkpoint being tested: what it is, on which data, and the model ready on this rank's device."""

    run_dir: Path
    checkpoint_dir: Path
    meta: dict
    cfg: object
    info: object
    band_indices: list
    splits: dict
    split_source: str
    accelerator: object
    model: torch.nn.Module
    precision: str


def assess_checkpoint(run_dir: Path, checkpoint: str = BEST, *, tta: str = "none", threshold: float | str = 0.5,
                      precision: str = "fp32", batch_size: int | None = None, config_path: str | None = None,
                      overrides=(), json_out: str | None = None, figures_dir: str | None = None) -> dict:
    """Test a run's checkpoint (`checkpoint`: best, last, or a checkpoint directory) on its test split; every rank
    calls it. Returns the test metrics and writes them (to `json_out`, default RUN_DIR/test/metrics.json) with the
    figures and tables (to `figures_dir`, default RUN_DIR/test). fp32 whatever the run trained with, unless
    `precision` (one of TEST_PRECISIONS) says otherwise; `threshold`: a probability or "val-best"; `config_path` and
    `overrides` change the configuration (another dataset or split)."""
    tested = open_checkpoint(run_dir, checkpoint, config_path, overrides, precision,
                             ("test", "val") if threshold == "val-best" else ("test",))
    cfg, accelerator, model = tested.cfg, tested.accelerator, tested.model
    batch_size = batch_size or cfg.train.batch_size
    loss_fn = loss_from_config(cfg.train)

    def loader_of(rows):
        dataset = PatchDataset(tested.info, rows, tested.band_indices, cfg.data.in_memory, cfg.data.reader)
        return dataset, evaluation_feed(dataset, batch_size, accelerator, cfg.data, cfg.train.channels_last, place=True)

    choice, tta_threshold = None, None
    if threshold == "val-best":
        val_set, val_loader = loader_of(tested.splits.get("val", []))
        accelerator.print(f"choosing the threshold on {len(val_set)} validation patches"
                          + (f" with TTA {tta}" if tta != "none" else ""))
        choice = choose_threshold(tested, evaluate(model, val_loader, accelerator, len(val_set), loss_fn, "val",
                                                   Extras(tta=tta, calibrate=True)), tta, len(val_set))
        threshold = choice["without_tta"]["threshold"] if "without_tta" in choice else choice["threshold"]
        tta_threshold = choice["threshold"] if "without_tta" in choice else None
    dataset, loader = loader_of(tested.splits["test"])
    averaged = " (the moving average of its weights)" if tested.meta.get("weights") == "ema" else ""
    accelerator.print(f"testing {tested.checkpoint_dir}{averaged} on {len(dataset)} patches "
                      f"(test split {tested.split_source})")
    extras = Extras(objects=True, tta=tta, threshold=threshold if choice or threshold != 0.5 else None,
                    tta_threshold=tta_threshold, calibrate=True)
    evaluation = evaluate(model, loader, accelerator, len(dataset), loss_fn, "test", extras)

    metrics = {**evaluation.metrics, **(evaluation.tta.metrics if evaluation.tta is not None else {})}
    if accelerator.is_main_process:
        report(tested, dataset, evaluation, metrics, choice, json_out, figures_dir, tta)
    accelerator.wait_for_everyone()
    return metrics


def open_checkpoint(run_dir: Path, checkpoint: str, config_path, overrides, precision: str, names) -> Tested:
    """The checkpoint, its configuration (with --config/--set), its data and splits (`names` checked), and the model
    prepared by an Accelerator in the test's precision."""
    checkpoint_dir = resolve(run_dir if checkpoint in (BEST, LAST) else checkpoint,
                             checkpoint if checkpoint in (BEST, LAST) else BEST)
    meta = read_meta(checkpoint_dir)
    if not run_dir.is_dir() or not checkpoints_dir(run_dir).is_dir():
        run_dir = run_of(checkpoint_dir)
    cfg = read_options(config_path, overrides, False, base=meta["config"], base_source=f"{checkpoint_dir}/meta.json").config
    configure_progress(cfg.log.progress)
    if cfg.data.dir == meta["config"]["data"].get("dir"):
        cfg = find_data(run_dir, cfg)  # moved together with the run: found next to it
    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    band_indices = info.indices_of(meta["bands"]["bands"], "the checkpoint was trained on")
    splits, split_source = run_splits(run_dir, cfg, meta, info, names)
    precision, why = precision_for_test(precision)
    accelerator = start_accelerator(precision, why, cfg.train.threads, deterministic=cfg.train.deterministic)
    torch.manual_seed(42)
    model = accelerator.prepare(described_model(meta["model"], load_weights(checkpoint_dir),
                                                str(checkpoint_dir / WEIGHTS)))
    return Tested(run_dir, checkpoint_dir, meta, cfg, info, band_indices, splits, split_source, accelerator, model,
                  precision)


def trackers_of_run(tested: Tested):
    """The training run's tracker runs, which the test appends to (None when it had none)."""
    from smptrain.training.tracking import tracked_run

    meta = tested.meta
    if not meta.get("run_id"):
        return None
    return tracked_run(meta["config"], meta.get("run_name", tested.run_dir.name), meta["run_id"], job="test")


def choose_threshold(tested: Tested, val, tta: str, val_patches: int) -> dict:
    """The val-best choice from a validation evaluation (calibrated, with `tta`), chosen on validation only, so the
    test data cannot move it. One threshold per kind of probabilities: the TTA-averaged ones (what --tta predicts
    with, threshold.json's top level) and, with TTA, the plain ones (under `without_tta`)."""
    chosen_on = val.tta if val.tta is not None else val
    choice = {**C.best_threshold(chosen_on.fine), "chosen_on": "val", "val_patches": val_patches, "tta": tta,
              "checkpoint": str(tested.checkpoint_dir), "checkpoint_step": tested.meta.get("step"),
              "histogram": chosen_on.fine.tolist()}
    if val.tta is not None:
        choice["without_tta"] = {**C.best_threshold(val.fine), "histogram": val.fine.tolist()}
    return choice


def run_splits(run_dir: Path, cfg, meta: dict, info, names) -> tuple[dict, str]:
    """The zarr rows of the run's splits (each of `names` checked), and where they came from.

    The run's own split is reused when the split settings are unchanged and the dataset is the run's (the same path,
    or one with the same fingerprint after a move); otherwise it is recomputed and said so.
    """
    splits_file = run_dir / SPLITS
    same_split = all(to_dict(cfg)["data"][k] == meta["config"]["data"].get(k) for k in ("split_method", "split_by"))
    known = is_same_data(run_dir, info)  # None for runs made before fingerprints: then the path decides
    same_dataset = cfg.data.dir == meta["config"]["data"].get("dir") if known is None else known
    if same_split and same_dataset and splits_file.is_file():
        splits, source = json.loads(splits_file.read_text()), str(splits_file)
    else:
        splits = make_splits(info.metadata, cfg.data, cfg.train.seed)
        source = "recomputed from the data.* settings"
    for name in names:
        if not splits[name]:
            raise UserError(f"the {name} split is empty")
        bad_rows = [r for r in splits[name] if r not in info.metadata.index]
        if bad_rows:
            raise UserError(f"{splits_file} lists zarr rows {bad_rows[:5]} that {info.root} does not have; pass "
                            f"--config for this dataset")
    return splits, source


def report(tested: Tested, dataset, evaluation, metrics: dict, choice: dict | None, json_out: str | None,
           figures_dir: str | None, tta: str = "none") -> None:
    """Main process: the metrics file, tables per region and sample, figures, the terminal report, wandb."""
    run_dir = tested.run_dir
    out_json = Path(json_out) if json_out else run_dir / TEST / TEST_METRICS
    figures_dir = Path(figures_dir) if figures_dir else run_dir / TEST  # never next to --json
    figures_dir.mkdir(parents=True, exist_ok=True)
    label = f"{tested.meta.get('run_name', run_dir.name)}, {tested.checkpoint_dir.name}"
    figures = write_figures(tested, dataset, evaluation, figures_dir, label)
    tables = write_tables(tested, dataset, evaluation, figures_dir)
    region_rows, region_tta = tables["region"]
    figures["regions"] = plots.groups(region_rows, "test", figures_dir / "regions.png",
                                      f"{label}\ntest: IoU per region (worst at the top)", "region", region_tta)
    calibration = C.reliability(evaluation.fine)
    figures["reliability"] = plots.reliability(calibration, figures_dir / "reliability.png",
                                               f"{label}\ntest: reliability (10 bins)")
    result = {
        "checkpoint": str(tested.checkpoint_dir), "checkpoint_epoch": tested.meta.get("epoch"),
        "checkpoint_step": tested.meta.get("step"), "split": tested.split_source, "test_patches": len(dataset),
        "precision": PRECISION_NAMES[tested.precision], "tta": tta, "tested": now(),
        "metrics": {k: clean_number(v) for k, v in metrics.items()},
        "threshold": {k: v for k, v in choice.items() if k not in ("histogram", "without_tta")} if choice else None,
        "reliability": {"pixels": calibration["pixels"].tolist(),
                        "confidence": [clean_number(float(v)) for v in calibration["confidence"]],
                        "frequency": [clean_number(float(v)) for v in calibration["frequency"]]},
        "figures": {k: str(v) for k, v in figures.items()},
    }
    if choice:
        threshold_file = run_dir / TEST / THRESHOLD
        write_text(threshold_file, json.dumps(choice, indent=2) + "\n")
        result["threshold"]["file"] = str(threshold_file)
    kept = keep_earlier(out_json)
    write_text(out_json, json.dumps(result, indent=2) + "\n")
    update_summary(run_dir, test={key: result[key] for key in ("checkpoint", "split", "precision", "tta", "tested")}
                   | {"file": str(out_json), "metrics": {k: v for k, v in result["metrics"].items()
                                                         if k.count("/") == 1}})
    print_report(tested, dataset, evaluation, metrics, choice, tables)
    click.echo(f"wrote {out_json}; figures and by_region.csv, by_sample_id.csv in {figures_dir}"
               + (f"; the earlier results are kept as {kept}" if kept else ""))
    if (tracked := trackers_of_run(tested)) is not None:
        send_to_trackers(tested, tracked, metrics, figures, tables)


def keep_earlier(path: Path) -> Path | None:
    """A test's metrics file already there (another checkpoint, TTA or split, or the same again) is kept, not
    replaced without a word: moved to `earlier/` beside it, named by when it was tested."""
    if not path.is_file():
        return None
    try:
        when = json.loads(path.read_text()).get("tested")
    except ValueError:
        when = None
    stamp = (when or datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat(
        timespec="seconds")).replace(":", "").replace("+0000", "Z")
    kept = path.parent / "earlier" / f"{path.stem}-{stamp}{path.suffix}"
    move(path, kept)
    return kept


def write_figures(tested: Tested, dataset, evaluation, figures_dir: Path, label: str) -> dict:
    """Curves, and grids of the best and worst test patches by IoU; {name: path}."""
    figures = write_curves(evaluation, figures_dir, "test", label=label)
    net = tested.accelerator.unwrap_model(tested.model)
    for name, chosen in zip(("best", "worst"), best_and_worst(evaluation)):
        if chosen:
            figures[name] = sample_figure(net, dataset, chosen, evaluation.pixel, tested.accelerator.device,
                                          figures_dir / f"samples_{name}.png",
                                          f"{label}\ntest: {name} samples by IoU", tested.cfg.train.channels_last)
    return figures


def write_tables(tested: Tested, dataset, evaluation, figures_dir: Path) -> dict:
    """Metrics per region and per sample id (and with TTA), as CSV files; {column: (rows, tta rows or None)}."""
    test_meta = tested.info.metadata.loc[dataset.rows]
    tables = {}
    for column in ("region", "sample_id"):
        rows = by_group(evaluation, test_meta[column].to_numpy(), "test")
        tta_rows = by_group(evaluation.tta, test_meta[column].to_numpy(), "test_tta") if evaluation.tta else None
        tables[column] = (rows, tta_rows)
        write_csv(rows, figures_dir / f"by_{column}.csv", column)
        if tta_rows:
            write_csv(tta_rows, figures_dir / f"by_{column}_tta.csv", column)
    return tables


def print_report(tested: Tested, dataset, evaluation, metrics: dict, choice: dict | None, tables: dict) -> None:
    click.echo(f"test metrics of {tested.checkpoint_dir.name} ({len(dataset)} patches, "
               f"{PRECISION_NAMES[tested.precision]}):")
    click.echo(format_table(metrics))
    if choice:
        with_tta = f" with TTA {choice['tta']}" if choice["tta"] != "none" else ""
        click.echo(f"threshold {choice['threshold']:.3f} chosen on {choice['val_patches']} validation patches{with_tta} "
                   f"(val IoU {choice['JaccardIndex']:.4f}, {choice['JaccardIndex@0.5']:.4f} at 0.5)")
        if "without_tta" in choice:
            plain = choice["without_tta"]
            click.echo(f"threshold {plain['threshold']:.3f} without TTA (val IoU {plain['JaccardIndex']:.4f}, "
                       f"{plain['JaccardIndex@0.5']:.4f} at 0.5)")
    if evaluation.tta is not None:
        gain = metrics["test_tta/JaccardIndex"] - metrics["test/JaccardIndex"]
        click.echo(f"TTA changes test IoU by {gain:+.4f}")
    click.echo(f"per region, worst first:\n{format_rows(tables['region'][0], 'test', 'region')}")
    click.echo(f"per sample_id, worst first:\n{format_rows(tables['sample_id'][0], 'test', 'sample_id', limit=5)}")


def send_to_trackers(tested: Tested, tracked, metrics: dict, figures: dict, tables: dict) -> None:
    """Append to the training run in each tracker: the same wandb id with resume="allow" (DARTS' test-smp does the
    same), the same MLflow run, the run's TensorBoard directory."""
    from smptrain.training.tracking import Recorder

    recorder = Recorder(tested.accelerator, tested.run_dir, tracked)
    recorder.log(metrics, step=None, write_jsonl=False)
    recorder.summary(metrics)
    for key, path in figures.items():
        recorder.image(f"test/{key}", path, step=None)
    for column, (rows, tta_rows) in tables.items():
        recorder.table(f"test/by_{column}", rows)
        if tta_rows:
            recorder.table(f"test_tta/by_{column}", tta_rows)
    recorder.finish()
