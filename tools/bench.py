"""Benchmark smptrain against a bare PyTorch loop on the same data and model, in one process.

    .venv/bin/python tools/bench.py [--patch-size 128] [--batch-size 8] [--encoder resnet18] [--steps 40]
                                    [--mixed-precision no|bf16|fp16] [--channels-last] [--json OUT]

Measures (same model, data, precision and thread count; machines are noisy, so read the ratios):
  (a) bare: forward, focal loss, backward, AdamW on in-memory tensors; no metrics, logging or loader
      (run before and after (b); the median of both is the baseline)
  (b) smptrain: `smptrain.train.train()` itself, in-memory data; throughput from its own per-window records
      (validation and checkpoints excluded, data loading, augmentation-free steps, logging and checks included)
  (c) the data loaders alone: zarr (DARTS chunking, workers) and in memory
  (d) evaluation (`evaluate()`, all metrics) per sample, against training's forward pass per sample
Prints a table and, with --json, writes the figures with the keys bare_samples_per_s, smptrain_samples_per_s,
ratio, loader_zarr_samples_per_s, loader_memory_samples_per_s, eval_samples_per_s, data_wait_share, peak_rss_mb.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smptrain.config import load_config  # noqa: E402
from smptrain.dataset import EvalBatches, PatchDataset, TrainBatches, make_loader, open_dataset  # noqa: E402
from smptrain.demo import make_demo  # noqa: E402
from smptrain.evaluate import evaluate  # noqa: E402
from smptrain.model import build_model, focal_loss  # noqa: E402
from smptrain.runtime import make_accelerator  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def bare_loop(x_all, y_all, encoder, steps, batch, device, precision, channels_last, warmup=3):
    """The baseline: nothing but forward, loss, backward, optimizer step."""
    torch.manual_seed(0)
    model = build_model("Unet", encoder, x_all.shape[1]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    order = torch.randperm(len(x_all))
    n = len(x_all) // batch
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        index = order[(i % n) * batch:(i % n + 1) * batch]
        x = x_all[index].to(device, non_blocking=True)
        y = y_all[index].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        loss, _, _ = focal_loss(logits.float(), y, None, 2.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def forward_rate(x_all, encoder, steps, batch, device, precision, channels_last):
    """Training's forward pass alone (train mode, autograd on), per sample."""
    torch.manual_seed(0)
    model = build_model("Unet", encoder, x_all.shape[1]).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 2):
        x = x_all[(i * batch) % (len(x_all) - batch):][:batch].to(device)
        sync(device)
        start = time.perf_counter()
        with autocast(device, precision):
            out = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        sync(device)
        times.append(time.perf_counter() - start)
        del out
    return batch / statistics.median(times[2:])


def loader_rate(dataset, batch, workers, epochs=2):
    batches = TrainBatches(len(dataset), batch, 1, 0, seed=0)
    loader = make_loader(dataset, batches, workers, False, 0, 0)
    rates = []
    for epoch in range(epochs + 1):
        batches.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(len(b[0]) for b in loader)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates[1:])  # the first epoch starts the workers


@click.command()
@click.option("--data", type=click.Path(file_okay=False), default=None, help="A DARTS dataset (default: generated).")
@click.option("--patches", default=256, show_default=True, help="Size of the generated dataset.")
@click.option("--patch-size", default=128, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--encoder", default="resnet18", show_default=True)
@click.option("--steps", default=40, show_default=True, help="Timed steps of the bare loop.")
@click.option("--epochs", default=2, show_default=True, help="Epochs of the smptrain run.")
@click.option("--workers", default=2, show_default=True, help="Workers of the zarr loader.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--channels-last", is_flag=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def main(data, patches, patch_size, batch_size, encoder, steps, epochs, workers, mixed_precision, channels_last, json_out):
    """Bare loop vs smptrain, loaders and evaluation, on one model and dataset."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="smptrain-bench-"))
    root = Path(data) if data else make_demo(tmp / "data", patches, patch_size, seed=0)
    info = open_dataset(root)
    rows = sorted(int(r) for r in info.metadata.index)
    bands = list(range(len(info.bands)))
    memory = PatchDataset(info, rows, bands, in_memory=True)
    x_all, y_all = memory.memory
    if device.type == "cuda":
        x_all, y_all = x_all.pin_memory(), y_all.pin_memory()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"Unet-{encoder}, {len(rows)} patches of {patch_size}x{patch_size} x {len(bands)} bands, batch {batch_size}, "
          f"precision {mixed_precision}{', channels_last' if channels_last else ''}")

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "encoder": encoder,
               "patch_size": patch_size, "batch_size": batch_size, "mixed_precision": mixed_precision,
               "channels_last": channels_last}
    results["loader_zarr_samples_per_s"] = loader_rate(PatchDataset(info, rows, bands), batch_size, workers)
    results["loader_memory_samples_per_s"] = loader_rate(memory, batch_size, 0)
    bare_before = bare_loop(x_all, y_all, encoder, steps, batch_size, device, mixed_precision, channels_last)

    from smptrain.train import train

    cfg = load_config(None, [
        f"data.dir='{root}'", "data.split_method='none'", "data.fold_method='none'", "data.in_memory=true",
        f"model.encoder='{encoder}'", f"train.batch_size={batch_size}", f"train.max_epochs={epochs}",
        f"train.val_every_n_epochs={epochs}", f"train.mixed_precision='{mixed_precision}'",
        f"train.channels_last={'true' if channels_last else 'false'}", "train.early_stopping_patience=0",
        f"log.artifact_dir='{tmp / 'artifacts'}'", "log.run_name='bench'", "log.log_every_n_steps=5",
        "log.preview_every_n_val=0"])
    run_dir = train(cfg)
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "perf/samples_per_s" in w][1:]  # the first window holds the warm-up
    results["smptrain_samples_per_s"] = statistics.median(w["perf/samples_per_s"] for w in windows)
    results["data_wait_share"] = statistics.mean(w["perf/data_wait_share"] for w in windows)
    bare_after = bare_loop(x_all, y_all, encoder, steps, batch_size, device, mixed_precision, channels_last)
    results["bare_samples_per_s"] = statistics.median([bare_before, bare_after])
    results["bare_runs_samples_per_s"] = [bare_before, bare_after]
    results["ratio"] = results["smptrain_samples_per_s"] / results["bare_samples_per_s"]

    accelerator = make_accelerator(mixed_precision)
    model = build_model("Unet", encoder, len(bands))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = accelerator.prepare(model)
    loader = make_loader(memory, EvalBatches(len(memory), batch_size), 0, False, 0, 0)
    evaluate(model, loader, accelerator, len(memory), None, 2.0, "val", channels_last=channels_last)  # warm-up
    start = time.perf_counter()
    evaluate(model, loader, accelerator, len(memory), None, 2.0, "val", channels_last=channels_last)
    sync(device)
    results["eval_samples_per_s"] = len(memory) / (time.perf_counter() - start)
    results["train_forward_samples_per_s"] = forward_rate(x_all, encoder, 10, batch_size, device, mixed_precision,
                                                          channels_last)
    results["eval_vs_train_forward"] = results["eval_samples_per_s"] / results["train_forward_samples_per_s"]
    results["loader_memory_vs_compute"] = results["loader_memory_samples_per_s"] / results["bare_samples_per_s"]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        results["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20

    print(f"  bare loop            {results['bare_samples_per_s']:10.1f} samples/s  (runs: "
          f"{', '.join(f'{r:.1f}' for r in results['bare_runs_samples_per_s'])})")
    print(f"  smptrain loop        {results['smptrain_samples_per_s']:10.1f} samples/s  ratio {results['ratio']:.3f}, "
          f"data wait {results['data_wait_share']:.1%}")
    print(f"  loader, zarr         {results['loader_zarr_samples_per_s']:10.1f} samples/s  ({workers} workers)")
    print(f"  loader, in memory    {results['loader_memory_samples_per_s']:10.1f} samples/s  "
          f"({results['loader_memory_vs_compute']:.0f}x the training rate)")
    print(f"  evaluation           {results['eval_samples_per_s']:10.1f} samples/s  "
          f"({results['eval_vs_train_forward']:.2f}x training's forward pass, {results['train_forward_samples_per_s']:.1f}/s)")
    print(f"  peak RSS             {results['peak_rss_mb']:10.0f} MB" +
          (f", peak GPU memory {results['peak_gpu_memory_mb']:.0f} MB" if device.type == "cuda" else ""))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
