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

import json
from pathlib import Path

import click
import torch

from smptrain.evaluation import calibration as C
from smptrain.evaluation import plots
from smptrain.evaluation.breakdown import by_group, format_rows, write_csv
from smptrain.checkpoint import load_weights, read_meta, resolve
from smptrain.cli import config_options, resolve_config
from smptrain.config import to_dict
from smptrain.data.dataset import EvalBatches, PatchDataset, open_dataset
from smptrain.errors import UserError, report_user_errors
from smptrain.evaluation.evaluate import best_and_worst, evaluate, format_table, sample_figure, write_curves
from smptrain.data.feed import feed, place_in_memory
from smptrain.losses import loss_from_config
from smptrain.model import build_model
from smptrain.runs import (BEST, LAST, SPLITS, TEST, TEST_METRICS, THRESHOLD, checkpoints_dir, find_data,
                           is_same_data, run_of)
from smptrain.runtime import (choose_precision, configure_threads, describe_precision, end_processes, local_processes,
                              make_accelerator)
from smptrain.data.splits import make_splits
from smptrain.evaluation.tta import TTA_CHOICES

TEST_PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # what --precision accepts
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # Accelerate's names -> what metrics.json records


def precision_for_test(choice: str) -> tuple[str, str]:
    """(Accelerate's precision, why) for --precision. fp32 by default: a test in the run's own precision would
    give other metrics on a CPU or GPU with native bf16 than on one without, and than the DARTS pipeline's fp32."""
    if choice == "fp32":
        return "no", "smptrain-test's default, as the DARTS pipeline computes; --precision to change"
    return choose_precision(choice)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path())
@click.option("--checkpoint", default=BEST, show_default=True,
              help="best, last, or the path of a checkpoint directory.")
@click.option("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics here instead of RUN_DIR/test/metrics.json (figures still go to RUN_DIR/test).")
@click.option("--figures", "figures_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the figures and the per-region and per-sample tables (default: RUN_DIR/test).")
@click.option("--tta", type=click.Choice(TTA_CHOICES), default="none", show_default=True,
              help="Test-time augmentation: average probabilities over the 4 flips or the 8 symmetries of the square "
                   "(d4). The metrics without TTA are reported beside, as test/..., those with it as test_tta/....")
@click.option("--threshold", default="0.5", show_default=True,
              help="Also report the test metrics at this probability threshold (test_at_threshold/...); val-best "
                   "chooses the one that maximises IoU (and so F1) on the run's validation split, never on test, and "
                   "records it in RUN_DIR/test/threshold.json for smptrain-convert --threshold val-best.")
@click.option("--precision", type=click.Choice(TEST_PRECISIONS), default="fp32", show_default=True,
              help="Precision of the forward pass. fp32 is what the converted model computes in the DARTS pipeline, "
                   "so the metrics do not depend on the machine; bf16/fp16 autocast as in training, auto as "
                   "train.mixed_precision = auto.")
@config_options
@report_user_errors
def main(run_dir, checkpoint, batch_size, json_out, figures_dir, tta, threshold, precision, config_path, overrides,
         debug):
    """Evaluate a checkpoint of RUN_DIR on its held-out test split, with DARTS' full metric set, per region and per
    sample, optionally with test-time augmentation and a threshold chosen on validation."""
    assess_checkpoint(Path(run_dir), checkpoint, batch_size, json_out, config_path, overrides, debug, figures_dir, tta,
                    C.parse_threshold(threshold), precision)
    end_processes()


def assess_checkpoint(run_dir: Path, checkpoint: str = BEST, batch_size: int | None = None, json_out=None,
                    config_path=None, overrides=(), debug: bool = False, figures_dir=None, tta: str = "none",
                    threshold: float | str = 0.5, precision: str = "fp32") -> dict:
    """Test a run's checkpoint (every rank calls it); returns the test metrics and writes them with the figures.
    `precision`: one of TEST_PRECISIONS; fp32 whatever the run trained with, unless asked otherwise."""
    checkpoint_dir = resolve(run_dir if checkpoint in (BEST, LAST) else checkpoint,
                             checkpoint if checkpoint in (BEST, LAST) else BEST)
    meta = read_meta(checkpoint_dir)
    if not run_dir.is_dir() or not checkpoints_dir(run_dir).is_dir():
        run_dir = run_of(checkpoint_dir)
    cfg = resolve_config(config_path, overrides, debug, base=meta["config"], base_source=f"{checkpoint_dir}/meta.json")
    if cfg.data.dir == meta["config"]["data"].get("dir"):
        cfg = find_data(run_dir, cfg)  # moved together with the run: found next to it
    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    band_indices = info.indices_of(meta["bands"]["bands"], "the checkpoint was trained on")
    splits, split_source = run_splits(run_dir, cfg, meta, info, ("test", "val") if threshold == "val-best" else ("test",))
    test_rows, val_rows = splits["test"], splits.get("val", [])

    wandb_project = meta["config"]["log"].get("wandb_project") if meta.get("run_id") else ""
    precision, why = precision_for_test(precision)
    accelerator = make_accelerator(precision, log_with="wandb" if wandb_project else None,
                                   deterministic=cfg.train.deterministic)
    configure_threads(cfg.train.threads, local_processes(accelerator))
    accelerator.print(f"precision: {describe_precision(precision)} ({why})")
    torch.manual_seed(42)
    model = build_model(meta["model"]["arch"], meta["model"]["encoder_name"], meta["model"]["in_channels"])
    try:
        model.load_state_dict(load_weights(checkpoint_dir), strict=True)
    except RuntimeError as error:
        raise UserError(f"{checkpoint_dir}/model.safetensors does not match {meta['model']}: {str(error)[:300]}") from None
    model = accelerator.prepare(model)
    batch_size = batch_size or cfg.train.batch_size
    loss_fn = loss_from_config(cfg.train)

    def loader_of(rows):
        dataset = PatchDataset(info, rows, band_indices, in_memory=cfg.data.in_memory, reader=cfg.data.reader)
        if cfg.data.in_memory:
            place_in_memory([dataset], accelerator.device, cfg.data.memory_device)
        batches = EvalBatches(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index)
        return dataset, feed(dataset, batches, accelerator.device, cfg.data.num_workers, 42, accelerator.process_index,
                             cfg.train.channels_last)

    choice, tta_threshold = None, None
    if threshold == "val-best":
        # Chosen on the validation split only: the test data cannot move it.
        val_set, val_loader = loader_of(val_rows)
        accelerator.print(f"choosing the threshold on {len(val_rows)} validation patches"
                          + (f" with TTA {tta}" if tta != "none" else ""))
        val = evaluate(model, val_loader, accelerator, len(val_set), loss_fn, "val", tta=tta, calibrate=True)
        # One threshold per kind of probabilities: the TTA-averaged ones (what --tta predicts with, and what goes
        # into threshold.json's top level) and the plain ones.
        chosen_on = val.tta if val.tta is not None else val
        choice = {**C.best_threshold(chosen_on.fine), "chosen_on": "val", "val_patches": len(val_rows), "tta": tta,
                  "checkpoint": str(checkpoint_dir), "checkpoint_step": meta.get("step"),
                  "histogram": chosen_on.fine.tolist()}
        threshold = choice["threshold"]
        if val.tta is not None:
            choice["without_tta"] = {**C.best_threshold(val.fine), "histogram": val.fine.tolist()}
            tta_threshold, threshold = threshold, choice["without_tta"]["threshold"]
    dataset, loader = loader_of(test_rows)
    accelerator.print(f"testing {checkpoint_dir} on {len(test_rows)} patches (test split {split_source})")
    evaluation = evaluate(model, loader, accelerator, len(dataset), loss_fn, "test", objects=True, tta=tta,
                          threshold=threshold if choice or threshold != 0.5 else None, calibrate=True,
                          tta_threshold=tta_threshold)

    metrics = {**evaluation.metrics, **(evaluation.tta.metrics if evaluation.tta is not None else {})}
    if accelerator.is_main_process:
        report(run_dir, checkpoint_dir, meta, cfg, accelerator, model, dataset, info, evaluation, metrics, choice,
               split_source, json_out, figures_dir, wandb_project, precision)
    accelerator.wait_for_everyone()
    return metrics


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


def report(run_dir, checkpoint_dir, meta, cfg, accelerator, model, dataset, info, evaluation, metrics, choice,
           split_source, json_out, figures_dir, wandb_project, precision) -> None:
    """Main process: the metrics file, tables per region and sample, figures, the terminal report, wandb."""
    from smptrain.tracking import Recorder, clean_number

    out_json = Path(json_out) if json_out else run_dir / TEST / TEST_METRICS
    figures_dir = Path(figures_dir) if figures_dir else run_dir / TEST  # never next to --json: no overwrites
    figures_dir.mkdir(parents=True, exist_ok=True)
    label = f"{meta.get('run_name', run_dir.name)}, {checkpoint_dir.name}"
    figures = write_curves(evaluation, figures_dir, "test", label=label)
    best, worst = best_and_worst(evaluation)
    net = accelerator.unwrap_model(model)
    for name, chosen in (("best", best), ("worst", worst)):
        if chosen:
            figures[name] = sample_figure(net, dataset, chosen, evaluation.pixel, accelerator.device,
                                          meta["bands"]["bands"], figures_dir / f"samples_{name}.png",
                                          f"{label}\ntest: {name} samples by IoU", cfg.train.channels_last)
    test_meta = info.metadata.loc[dataset.rows]
    tables = {}
    for column, group_name in (("region", "region"), ("sample_id", "sample_id")):
        rows = by_group(evaluation, test_meta[column].to_numpy(), "test")
        tta_rows = by_group(evaluation.tta, test_meta[column].to_numpy(), "test_tta") if evaluation.tta else None
        tables[column] = (rows, tta_rows)
        write_csv(rows, figures_dir / f"by_{column}.csv", group_name)
        if tta_rows:
            write_csv(tta_rows, figures_dir / f"by_{column}_tta.csv", group_name)
    region_rows, region_tta = tables["region"]
    figures["regions"] = plots.groups(region_rows, "test", figures_dir / "regions.png",
                                      f"{label}\ntest: IoU per region (worst at the top)", "region", region_tta)
    calibration = C.reliability(evaluation.fine)
    figures["reliability"] = plots.reliability(calibration, figures_dir / "reliability.png",
                                               f"{label}\ntest: reliability (10 bins)")
    result = {
        "checkpoint": str(checkpoint_dir), "checkpoint_epoch": meta.get("epoch"), "checkpoint_step": meta.get("step"),
        "split": split_source, "test_patches": len(dataset), "precision": PRECISION_NAMES[precision],
        "metrics": {k: clean_number(v) for k, v in metrics.items()},
        "threshold": {k: v for k, v in choice.items() if k not in ("histogram", "without_tta")} if choice else None,
        "reliability": {"pixels": calibration["pixels"].tolist(),
                        "confidence": [clean_number(float(v)) for v in calibration["confidence"]],
                        "frequency": [clean_number(float(v)) for v in calibration["frequency"]]},
        "figures": {k: str(v) for k, v in figures.items()},
    }
    if choice:
        threshold_file = run_dir / TEST / THRESHOLD
        threshold_file.parent.mkdir(parents=True, exist_ok=True)
        threshold_file.write_text(json.dumps(choice, indent=2) + "\n")
        result["threshold"]["file"] = str(threshold_file)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")

    click.echo(f"test metrics of {checkpoint_dir.name} ({len(dataset)} patches, {PRECISION_NAMES[precision]}):")
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
    click.echo(f"per region, worst first:\n{format_rows(region_rows, 'test', 'region')}")
    click.echo(f"per sample_id, worst first:\n{format_rows(tables['sample_id'][0], 'test', 'sample_id', limit=5)}")
    click.echo(f"wrote {out_json}; figures and by_region.csv, by_sample_id.csv in {figures_dir}")
    meta_cfg = meta["config"]["log"]
    if wandb_project:
        # Append to the training run: same id, resume="allow" (DARTS' test-smp does the same).
        recorder = Recorder(accelerator, run_dir, meta_cfg["wandb_project"], meta_cfg.get("wandb_entity", ""),
                            meta.get("run_name", run_dir.name), meta["run_id"], meta["config"],
                            Path(meta_cfg["artifact_dir"]), job="test")
        recorder.log(metrics, step=None, write_jsonl=False)
        recorder.summary(metrics)
        for key, path in figures.items():
            recorder.image(f"test/{key}", path, step=None)
        for column, (rows, tta_rows) in tables.items():
            recorder.table(f"test/by_{column}", rows)
            if tta_rows:
                recorder.table(f"test_tta/by_{column}", tta_rows)
        recorder.finish()


if __name__ == "__main__":
    main()
