"""`evaluate()` (shared by validation and testing) and the `smptrain-test` command.

Each rank evaluates whole batches of the set (batch i on rank i % world_size, no padding) and writes per-sample
counts into rows of a buffer indexed by the sample's position. One all-reduce sums the buffers (each row is
non-zero on exactly one rank, so the sum is exact), and every rank reduces the same numbers in the same order:
the metrics are identical for any number of processes, to the last digit.

    smptrain-test RUN_DIR [--checkpoint best|last|PATH] [--config FILE] [--set ...] [--batch-size N] [--json OUT]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from smptrain import metrics as M
from smptrain.checkpoint import load_weights, read_meta, resolve
from smptrain.cli import config_options, resolve_config
from smptrain.config import to_dict
from smptrain.dataset import EvalBatches, PatchDataset, make_loader, open_dataset
from smptrain.errors import UserError, report_user_errors
from smptrain.model import build_model, focal_loss, probabilities, segmentation_logits
from smptrain.runtime import make_accelerator, resolve_precision, to_device
from smptrain.splits import make_splits


@dataclass
class Evaluation:
    metrics: dict[str, float]  # prefix/Name -> value, including prefix/loss
    pixel: np.ndarray  # (N, 46) per-sample pixel counts
    loss: np.ndarray  # (N,) per-sample mean focal loss over valid pixels (NaN without valid pixels)
    instances: np.ndarray | None  # (N, 63) per-sample object counts (objects=True only)
    boundary: np.ndarray | None  # (N, 2) per-sample boundary intersection and union (objects=True only)

    @property
    def total(self) -> np.ndarray:
        return self.pixel.sum(0)


def evaluate(model, loader, accelerator, num_samples: int, focal_alpha, focal_gamma: float, prefix: str,
             objects: bool = False, channels_last: bool = False) -> Evaluation:
    """Metrics of `model` over the set behind `loader` (an EvalBatches loader). All ranks must call it."""
    device = accelerator.device
    # The unwrapped module keeps Accelerate's autocast wrapper but not DDP, whose forward may talk to other ranks:
    # ranks evaluate different numbers of batches.
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    pixel = torch.zeros(num_samples, M.PIXEL_STATS, dtype=torch.long, device=device)
    loss = torch.zeros(num_samples, 2, dtype=torch.float64, device=device)
    extra = torch.zeros(num_samples, M.INSTANCE_STATS + M.BOUNDARY_STATS, dtype=torch.long, device=device) if objects else None
    with torch.inference_mode():
        for batch in tqdm(loader, desc=prefix, leave=False, disable=not accelerator.is_local_main_process):
            x, y, positions = to_device(batch, device, channels_last)
            logits = segmentation_logits(net, x)
            _, sums, counts = focal_loss(logits, y, focal_alpha, focal_gamma)
            probs = probabilities(logits)
            pixel[positions] = M.pixel_stats(probs, y)
            loss[positions] = torch.stack([sums.double(), counts.double()], 1)
            if objects:
                probs_np, y_np = probs.cpu().numpy(), y.cpu().numpy()
                rows = [np.concatenate([M.instance_stats(p, t), M.boundary_stats(p, t)]) for p, t in zip(probs_np, y_np)]
                extra[positions] = torch.from_numpy(np.stack(rows)).to(device)
    # one collective per evaluation, called by every rank
    pixel, loss = accelerator.reduce(pixel, "sum"), accelerator.reduce(loss, "sum")
    pixel, loss = pixel.cpu().numpy(), loss.cpu().numpy()
    net.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_sample_loss = np.where(loss[:, 1] > 0, loss[:, 0] / np.maximum(loss[:, 1], 1), np.nan)
    result = M.pixel_metrics(pixel.sum(0), prefix)
    finite = per_sample_loss[np.isfinite(per_sample_loss)]
    result[f"{prefix}/loss"] = float(finite.mean()) if len(finite) else math.nan
    instances = boundary = None
    if objects:
        extra = accelerator.reduce(extra, "sum").cpu().numpy()
        instances, boundary = extra[:, :M.INSTANCE_STATS], extra[:, M.INSTANCE_STATS:]
        result.update(M.instance_metrics(instances.sum(0), boundary.sum(0), prefix))
    return Evaluation(result, pixel, per_sample_loss, instances, boundary)


def predict(net, dataset: PatchDataset, positions, device, channels_last: bool = False):
    """(xs, ys, probs) as numpy for a few samples, for figures; main process only, unwrapped model, no collectives."""
    x, y, _ = dataset.__getitems__(list(positions))
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        probs = probabilities(segmentation_logits(net, to_device((x, y, torch.zeros(0)), device, channels_last)[0]))
    net.train(was_training)
    return x.numpy(), y.numpy(), probs.cpu().numpy()


def write_curves(evaluation: Evaluation, out_dir: Path, prefix: str, tag: str = "") -> dict[str, Path]:
    """Confusion matrix, ROC and precision-recall PNGs from an evaluation."""
    from smptrain import plots

    total = evaluation.total
    tn, fp, fn, tp = (int(v) for v in total[:4])
    tps, fps, fns, tns = M.curve_counts(total)
    fpr, tpr = M.roc_curve(tps, fps, fns, tns)
    precision, recall = M.pr_curve(tps, fps, fns)
    m = evaluation.metrics
    return {
        "cmx": plots.confusion_matrix(tn, fp, fn, tp, out_dir / f"confusion_matrix{tag}.png",
                                      f"{prefix}: confusion matrix (normalised by label)"),
        "roc": plots.curve(fpr, tpr, out_dir / f"roc{tag}.png", f"{prefix}: ROC (20 thresholds)", "false positive rate",
                           "true positive rate", "AUROC", m[f"{prefix}/AUROC"], diagonal=True),
        "prc": plots.curve(recall, precision, out_dir / f"precision_recall{tag}.png",
                           f"{prefix}: precision-recall (20 thresholds)", "recall", "precision", "AP",
                           m[f"{prefix}/AveragePrecision"]),
    }


def best_and_worst(evaluation: Evaluation, count: int = 4) -> tuple[list[int], list[int]]:
    """Positions of the best and worst samples by IoU among samples with a label or a prediction."""
    iou = M.sample_iou(evaluation.pixel)
    ranked = [int(i) for i in np.argsort(np.where(np.isnan(iou), np.inf, iou), kind="stable") if not np.isnan(iou[i])]
    worst = ranked[:count]
    best = [i for i in ranked[::-1][:count] if i not in worst]
    return best, worst


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:.6f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                     for k, v in metrics.items())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path())
@click.option("--checkpoint", default="best", show_default=True,
              help="best, last, or the path of a checkpoint directory.")
@click.option("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics here instead of RUN_DIR/test/metrics.json.")
@config_options
@report_user_errors
def main(run_dir, checkpoint, batch_size, json_out, config_path, overrides, debug):
    """Evaluate a checkpoint of RUN_DIR on its held-out test split, with DARTS' full metric set."""
    run_dir = Path(run_dir)
    checkpoint_dir = resolve(run_dir if checkpoint in ("best", "last") else checkpoint,
                             checkpoint if checkpoint in ("best", "last") else "best")
    meta = read_meta(checkpoint_dir)
    if not run_dir.is_dir() or not (run_dir / "checkpoints").is_dir():
        run_dir = checkpoint_dir.parent.parent if checkpoint_dir.parent.name == "checkpoints" else checkpoint_dir
    cfg = resolve_config(config_path, overrides, debug, base=meta["config"], base_source=f"{checkpoint_dir}/meta.json")
    info = open_dataset(cfg.data.dir)
    missing = [b for b in meta["bands"]["bands"] if b not in info.bands]
    if missing:
        raise UserError(f"the checkpoint was trained on band(s) {missing}, which {info.root / 'config.toml'} lacks")
    band_indices = [info.bands.index(b) for b in meta["bands"]["bands"]]
    splits_file = run_dir / "splits.json"
    split_keys = ("dir", "split_method", "split_by")  # what defines the test split
    same_data = all(to_dict(cfg)["data"][k] == meta["config"]["data"].get(k) for k in split_keys)
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
                                   log_with="wandb" if wandb_project else None)
    torch.manual_seed(42)
    model = build_model(meta["model"]["arch"], meta["model"]["encoder_name"], meta["model"]["in_channels"])
    try:
        model.load_state_dict(load_weights(checkpoint_dir), strict=True)
    except RuntimeError as error:
        raise UserError(f"{checkpoint_dir}/model.safetensors does not match {meta['model']}: {str(error)[:300]}") from None
    model = accelerator.prepare(model)
    batch_size = batch_size or cfg.train.batch_size
    dataset = PatchDataset(info, test_rows, band_indices, in_memory=cfg.data.in_memory)
    batches = EvalBatches(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index)
    loader = make_loader(dataset, batches, cfg.data.num_workers, torch.cuda.is_available(), 42, accelerator.process_index)
    accelerator.print(f"testing {checkpoint_dir} on {len(test_rows)} patches (test split {split_source})")
    evaluation = evaluate(model, loader, accelerator, len(dataset), cfg.train.focal_alpha, cfg.train.focal_gamma,
                          "test", objects=True, channels_last=cfg.train.channels_last)

    if accelerator.is_main_process:
        from smptrain import plots
        from smptrain.tracking import Recorder, clean_number

        out_json = Path(json_out) if json_out else run_dir / "test" / "metrics.json"
        figures_dir = out_json.parent
        figures = write_curves(evaluation, figures_dir, "test")
        best, worst = best_and_worst(evaluation)
        bands = meta["bands"]["bands"]
        net = accelerator.unwrap_model(model)
        for name, chosen in (("best", best), ("worst", worst)):
            if chosen:
                xs, ys, probs = predict(net, dataset, chosen, accelerator.device, cfg.train.channels_last)
                iou = M.sample_iou(evaluation.pixel[chosen])
                titles = [f"row {dataset.rows[p]}\nIoU {v:.3f}" for p, v in zip(chosen, iou)]
                figures[name] = plots.sample_grid(xs, ys, probs, bands, titles, figures_dir / f"samples_{name}.png",
                                                  f"test: {name} samples by IoU")
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
        click.echo(f"wrote {out_json} and figures in {figures_dir}")
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
    accelerator.end_training()


if __name__ == "__main__":
    main()
