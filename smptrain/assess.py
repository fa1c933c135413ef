"""`smptrain-test`: evaluate a checkpoint on its run's held-out test split, with DARTS' full metric set.

    smptrain-test RUN_DIR [--checkpoint best|last|PATH] [--config FILE] [--set ...] [--batch-size N] [--json OUT]

The test split is re-read from the run's `splits.json` unless the keys that define it change. Pixel metrics come
from the same exact, process-count-independent counts as validation, plus object and boundary metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from smptrain.checkpoint import load_weights, read_meta, resolve
from smptrain.cli import config_options, resolve_config
from smptrain.config import to_dict
from smptrain.dataset import EvalBatches, PatchDataset, open_dataset
from smptrain.errors import UserError, report_user_errors
from smptrain.evaluate import best_and_worst, evaluate, format_table, sample_figure, write_curves
from smptrain.feed import feed, place_in_memory
from smptrain.losses import loss_from_config
from smptrain.model import build_model
from smptrain.runs import find_data, is_same_data
from smptrain.runtime import configure_threads, end_processes, local_processes, make_accelerator, resolve_precision
from smptrain.splits import make_splits


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path())
@click.option("--checkpoint", default="best", show_default=True,
              help="best, last, or the path of a checkpoint directory.")
@click.option("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics here instead of RUN_DIR/test/metrics.json (figures still go to RUN_DIR/test).")
@click.option("--figures", "figures_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the figures (default: RUN_DIR/test).")
@config_options
@report_user_errors
def main(run_dir, checkpoint, batch_size, json_out, figures_dir, config_path, overrides, debug):
    """Evaluate a checkpoint of RUN_DIR on its held-out test split, with DARTS' full metric set."""
    test_checkpoint(Path(run_dir), checkpoint, batch_size, json_out, config_path, overrides, debug, figures_dir)
    end_processes()


def test_checkpoint(run_dir: Path, checkpoint: str = "best", batch_size: int | None = None, json_out=None,
                    config_path=None, overrides=(), debug: bool = False, figures_dir=None) -> dict:
    """Test a run's checkpoint (every rank calls it); returns the test metrics and writes them with the figures."""
    checkpoint_dir = resolve(run_dir if checkpoint in ("best", "last") else checkpoint,
                             checkpoint if checkpoint in ("best", "last") else "best")
    meta = read_meta(checkpoint_dir)
    if not run_dir.is_dir() or not (run_dir / "checkpoints").is_dir():
        run_dir = checkpoint_dir.parent.parent if checkpoint_dir.parent.name == "checkpoints" else checkpoint_dir
    cfg = resolve_config(config_path, overrides, debug, base=meta["config"], base_source=f"{checkpoint_dir}/meta.json")
    if cfg.data.dir == meta["config"]["data"].get("dir"):
        cfg = find_data(run_dir, cfg)  # moved together with the run: found next to it
    info = open_dataset(cfg.data.dir, cfg.data.band_normalisation)
    band_indices = info.indices_of(meta["bands"]["bands"], "the checkpoint was trained on")
    splits_file = run_dir / "splits.json"
    # The run's own test split is reused when the split settings are unchanged and the dataset is the run's (the
    # same path, or one with the same fingerprint after a move); otherwise it is recomputed and said so.
    same_split = all(to_dict(cfg)["data"][k] == meta["config"]["data"].get(k) for k in ("split_method", "split_by"))
    known = is_same_data(run_dir, info)  # None for runs made before fingerprints: then the path decides
    same_dataset = cfg.data.dir == meta["config"]["data"].get("dir") if known is None else known
    same_data = same_split and same_dataset
    if same_data and splits_file.is_file():
        test_rows, split_source = json.loads(splits_file.read_text())["test"], str(splits_file)
    else:
        test_rows = make_splits(info.metadata, cfg.data, cfg.train.seed)["test"]
        split_source = "recomputed from the data.* settings"
    if not test_rows:
        raise UserError("the test split is empty")
    bad_rows = [r for r in test_rows if r not in info.metadata.index]
    if bad_rows:
        raise UserError(f"{splits_file} lists zarr rows {bad_rows[:5]} that {info.root} does not have; pass --config for this dataset")

    wandb_project = meta["config"]["log"].get("wandb_project") if meta.get("run_id") else ""
    accelerator = make_accelerator(resolve_precision(meta.get("mixed_precision", "no")),
                                   log_with="wandb" if wandb_project else None, deterministic=cfg.train.deterministic)
    configure_threads(cfg.train.threads, local_processes(accelerator))
    torch.manual_seed(42)
    model = build_model(meta["model"]["arch"], meta["model"]["encoder_name"], meta["model"]["in_channels"])
    try:
        model.load_state_dict(load_weights(checkpoint_dir), strict=True)
    except RuntimeError as error:
        raise UserError(f"{checkpoint_dir}/model.safetensors does not match {meta['model']}: {str(error)[:300]}") from None
    model = accelerator.prepare(model)
    batch_size = batch_size or cfg.train.batch_size
    dataset = PatchDataset(info, test_rows, band_indices, in_memory=cfg.data.in_memory, reader=cfg.data.reader)
    if cfg.data.in_memory:
        place_in_memory([dataset], accelerator.device, cfg.data.memory_device)
    batches = EvalBatches(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index)
    loader = feed(dataset, batches, accelerator.device, cfg.data.num_workers, 42, accelerator.process_index,
                  cfg.train.channels_last)
    accelerator.print(f"testing {checkpoint_dir} on {len(test_rows)} patches (test split {split_source})")
    evaluation = evaluate(model, loader, accelerator, len(dataset), loss_from_config(cfg.train), "test", objects=True)

    if accelerator.is_main_process:
        from smptrain.tracking import Recorder, clean_number

        out_json = Path(json_out) if json_out else run_dir / "test" / "metrics.json"
        figures_dir = Path(figures_dir) if figures_dir else run_dir / "test"  # never next to --json: no overwrites
        figures_dir.mkdir(parents=True, exist_ok=True)
        label = f"{meta.get('run_name', run_dir.name)}, {checkpoint_dir.name}"
        figures = write_curves(evaluation, figures_dir, "test", label=label)
        best, worst = best_and_worst(evaluation)
        bands = meta["bands"]["bands"]
        net = accelerator.unwrap_model(model)
        for name, chosen in (("best", best), ("worst", worst)):
            if chosen:
                figures[name] = sample_figure(net, dataset, chosen, evaluation.pixel, accelerator.device, bands,
                                              figures_dir / f"samples_{name}.png",
                                              f"{label}\ntest: {name} samples by IoU",
                                              cfg.train.channels_last)
        result = {
            "checkpoint": str(checkpoint_dir), "checkpoint_epoch": meta.get("epoch"), "checkpoint_step": meta.get("step"),
            "split": split_source, "test_patches": len(test_rows),
            "metrics": {k: clean_number(v) for k, v in evaluation.metrics.items()},
            "figures": {k: str(v) for k, v in figures.items()},
        }
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"test metrics of {checkpoint_dir.name} ({len(test_rows)} patches):")
        click.echo(format_table(evaluation.metrics))
        click.echo(f"wrote {out_json}, figures in {figures_dir}")
        meta_cfg = meta["config"]["log"]
        if wandb_project:
            # Append to the training run: same id, resume="allow" (DARTS' test-smp does the same).
            recorder = Recorder(accelerator, run_dir, meta_cfg["wandb_project"], meta_cfg.get("wandb_entity", ""),
                                meta.get("run_name", run_dir.name), meta["run_id"], meta["config"],
                                Path(meta_cfg["artifact_dir"]), job="test")
            recorder.log(evaluation.metrics, step=None, write_jsonl=False)
            recorder.summary(evaluation.metrics)
            for key, path in figures.items():
                recorder.image(f"test/{key}", path, step=None)
            recorder.finish()
    accelerator.wait_for_everyone()
    return evaluation.metrics


if __name__ == "__main__":
    main()
