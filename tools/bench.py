"""Benchmark smptrain against the card's (or CPU's) limit, in one process, on the same data and models.

    .venv/bin/python tools/bench.py [--data DIR | --patches 256 --patch-size 128] [--encoders resnet18,resnet50]
                                    [--batch-size 8] [--workers 2] [--mixed-precision auto|no|bf16|fp16]
                                    [--channels-last] [--json OUT]

Per encoder (Unet), with the same precision, memory format and thread count everywhere:
  ceiling   the training step alone: forward, focal loss, backward, AdamW, with the batches already on the device
            (no host work at all); measured before and after the smptrain runs, the median is the baseline
  memory    `smptrain.train.train()` itself with data.in_memory (on the GPU when it fits, else a host-side
            prefetch thread); throughput and data-wait share from its own per-window records (warm-up window,
            validation and checkpoints excluded)
  zarr      the same, streaming from zarr with --workers readers (tensorstore threads)
  eval      `evaluate()` with every metric, per sample, against training's forward pass per sample
Once: the zarr readers alone (tensorstore and zarr-python; per worker and with --workers workers), the
in-memory loader, and one streamed batch stage by stage (decode, check, pin, copy). Prints a table and the
device's name; --json writes every figure.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smptrain.config import load_config  # noqa: E402
from smptrain.core.runtime import choose_precision, describe_cpu, make_accelerator  # noqa: E402
from smptrain.data.batches import EvalBatches, TrainBatches  # noqa: E402
from smptrain.data.darts import open_dataset  # noqa: E402
from smptrain.data.dataset import PatchDataset  # noqa: E402
from smptrain.data.demo import make_demo  # noqa: E402
from smptrain.data.feed import feed, place_in_memory  # noqa: E402
from smptrain.evaluation.evaluate import evaluate  # noqa: E402
from smptrain.model.losses import Loss, focal_loss  # noqa: E402
from smptrain.model.network import build_model  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def device_model(encoder, channels, device, channels_last):
    torch.manual_seed(0)
    model = build_model("Unet", encoder, channels).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def ceiling(batches, encoder, steps, device, precision, channels_last, warmup=3):
    """The limit: smptrain's step (fused AdamW, or the unfused one with a grad scaler under fp16) on resident batches."""
    model = device_model(encoder, batches[0][0].shape[1], device, channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=precision != "fp16")
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = batches[i % len(batches)]
        with autocast(device, precision):
            logits = model(x)
        loss, _, _ = focal_loss(logits.float(), y, None, 2.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return steps * batches[0][0].shape[0] / (time.perf_counter() - start)


def forward_rate(batches, encoder, steps, device, precision, channels_last):
    """Training's forward pass alone (train mode, autograd on), per sample."""
    model = device_model(encoder, batches[0][0].shape[1], device, channels_last).train()
    times = []
    for i in range(steps + 2):
        x, _ = batches[i % len(batches)]
        sync(device)
        start = time.perf_counter()
        with autocast(device, precision):
            out = model(x)
        sync(device)
        times.append(time.perf_counter() - start)
        del out
    return batches[0][0].shape[0] / statistics.median(times[2:])


def loader_rate(dataset, batch, workers, epochs=2):
    """Batches per second through the feed training uses (on the CPU: no copy to a device). `workers` is
    data.num_workers: worker processes for zarr-python, decoding threads for tensorstore (which reads in-process)."""
    batches = TrainBatches(len(dataset), batch, 1, 0, seed=0)
    loader = feed(dataset, batches, torch.device("cpu"), workers, 0, 0)
    rates = []
    for epoch in range(epochs + 1):
        batches.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(len(b[0]) for b in loader)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates[1:])  # the first epoch starts the workers


def batch_stages(dataset, batch, device):
    """Milliseconds of each stage a streamed batch goes through, one after another on one batch: decoding (the
    reader's own threads), the value check, pinning and the copy to the device (the last two on CUDA only)."""
    from smptrain.data.dataset import check_values

    dataset.open_reader()
    rows = dataset.rows[:batch]
    dataset._reader.read(rows, None)  # warm-up
    stages = {}
    start = time.perf_counter()
    x, y = dataset._reader.read(rows, None)
    stages["decode_ms"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    check_values(x, y, rows, "bench")
    stages["check_ms"] = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        tensor = torch.from_numpy(x)
        tensor.pin_memory().to(device, non_blocking=True)  # warm-up of the pinned pool and the copy
        sync(device)
        start = time.perf_counter()
        pinned = tensor.pin_memory()
        stages["pin_ms"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        pinned.to(device, non_blocking=True)
        sync(device)
        stages["copy_ms"] = (time.perf_counter() - start) * 1e3
    return stages


LOG_EVERY = 5  # optimizer steps per logging window of the smptrain runs


def check_sizes(patches: int, batch_size: int, epochs: int) -> None:
    """Refuse, before measuring anything, data too small for the figures: each smptrain run needs two logging
    windows (the first holds the warm-up), and the ceiling one full batch."""
    steps = patches // batch_size * epochs
    if patches < batch_size:
        raise click.ClickException(f"the data have {patches} patches, fewer than --batch-size {batch_size}; lower "
                                   f"--batch-size to {patches} or less, or give more --patches")
    if steps // LOG_EVERY < 2:
        epochs_needed = -(-2 * LOG_EVERY // (patches // batch_size))
        raise click.ClickException(
            f"{patches} patches in batches of {batch_size} over {epochs} epoch(s) give {steps} training steps, "
            f"{steps // LOG_EVERY} logging window(s) of {LOG_EVERY} steps, and the figures need 2 (the first is "
            f"warm-up); raise --epochs to {epochs_needed} (or --patches, or lower --batch-size)")


def smptrain_rate(root, tmp, name, encoder, batch_size, epochs, precision, channels_last, in_memory, workers):
    from smptrain.train import train

    cfg = load_config(None, [
        f"data.dir='{root}'", "data.split_method='none'", "data.fold_method='none'",
        f"data.in_memory={'true' if in_memory else 'false'}", f"data.num_workers={workers}",
        # The main process must not use tensorstore before workers fork (it aborts in forked children).
        f"data.reader='{'zarr' if in_memory else 'auto'}'",
        f"model.encoder='{encoder}'", f"train.batch_size={batch_size}", f"train.max_epochs={epochs}",
        f"train.val_every_n_epochs={epochs}", f"train.mixed_precision='{precision}'",
        f"train.channels_last={'true' if channels_last else 'false'}", "train.early_stopping_patience=0",
        f"log.artifact_dir='{tmp / 'artifacts'}'", f"log.run_name='{name}'", f"log.log_every_n_steps={LOG_EVERY}",
        "log.preview_every_n_val=0"])
    run_dir = train(cfg).run_dir
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "perf/samples_per_s" in w][1:]  # the first window holds the warm-up
    return (statistics.median(w["perf/samples_per_s"] for w in windows),
            statistics.mean(w["perf/data_wait_share"] for w in windows))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="A DARTS dataset (default: a generated one); its own patch size is used and reported.")
@click.option("--patches", default=256, show_default=True, help="Size of the generated dataset.")
@click.option("--patch-size", default=128, show_default=True, help="Patch size of the generated dataset.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--encoders", default="resnet18,resnet50", show_default=True, help="Comma-separated Unet encoders.")
@click.option("--steps", default=40, show_default=True, help="Timed steps of the ceiling loop.")
@click.option("--epochs", default=2, show_default=True, help="Epochs of each smptrain run.")
@click.option("--workers", default=2, show_default=True, help="DataLoader workers reading zarr.")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--channels-last", is_flag=True, help="NHWC memory format for model and inputs.")
@click.option("--loaders-only", is_flag=True, help="Measure the readers alone (no model, no training).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write every figure here.")
def main(data, patches, patch_size, batch_size, encoders, steps, epochs, workers, mixed_precision, channels_last,
         loaders_only, json_out):
    """smptrain against the step's ceiling, the loaders and evaluation, per encoder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, why = choose_precision(mixed_precision)
    tmp = Path(tempfile.mkdtemp(prefix="smptrain-bench-"))
    # the generated data and the runs' directories go when the command ends, also on an error
    click.get_current_context().call_on_close(lambda: shutil.rmtree(tmp, ignore_errors=True))
    root = Path(data) if data else make_demo(tmp / "data", patches, patch_size, seed=0)
    info = open_dataset(root)
    rows = sorted(int(r) for r in info.metadata.index)
    if not loaders_only:
        check_sizes(len(rows), batch_size, epochs)
    bands = list(range(len(info.bands)))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = {"device": name, "cpu": describe_cpu(), "patch_size": info.patch_size, "patches": len(rows),
               "bands": len(bands), "batch_size": batch_size, "mixed_precision": precision, "channels_last": channels_last,
               "workers": workers, "cpu_count": os.cpu_count(), "encoders": {}}
    print(f"{name} ({results['cpu']}); {len(rows)} patches of {info.patch_size}x{info.patch_size}"
          f" x {len(bands)} bands, batch {batch_size}, {precision} ({why}){', channels_last' if channels_last else ''}")

    # Loaders alone: tensorstore in-process (1 decoding thread, then --workers threads), zarr-python in 1 and
    # --workers worker processes (forked before this process uses tensorstore for anything else).
    for reader in ("zarr", "tensorstore"):
        results[f"loader_{reader}_1_worker_samples_per_s"] = loader_rate(PatchDataset(info, rows, bands, reader=reader),
                                                                        batch_size, 1)
        results[f"loader_{reader}_{workers}_workers_samples_per_s"] = loader_rate(
            PatchDataset(info, rows, bands, reader=reader), batch_size, workers)
    streamed = PatchDataset(info, rows, bands, reader="tensorstore")
    streamed.read_threads = workers
    results["batch_stages"] = batch_stages(streamed, batch_size, device)
    memory = PatchDataset(info, rows, bands, in_memory=True, reader="zarr")
    results["loader_memory_samples_per_s"] = loader_rate(memory, batch_size, 0)
    for reader in ("tensorstore", "zarr") if loaders_only else ():
        unit = "thread" if reader == "tensorstore" else "worker"
        print(f"  zarr via {reader:<11}  1 {unit} {results[f'loader_{reader}_1_worker_samples_per_s']:8.1f} samples/s,"
              f" {workers} {unit}s {results[f'loader_{reader}_{workers}_workers_samples_per_s']:8.1f} samples/s")
    if loaders_only:
        encoders = ""
    place_in_memory([memory], device, "auto")
    resident = [(x, y) for x, y, _ in feed(memory, EvalBatches(len(memory), batch_size), device, 0, 0, 0, channels_last)]
    resident = [b for b in resident if b[0].shape[0] == batch_size]

    for encoder in [e for e in encoders.split(",") if e]:
        r = {}
        before = ceiling(resident, encoder, steps, device, precision, channels_last)
        r["smptrain_memory_samples_per_s"], r["data_wait_memory"] = smptrain_rate(
            root, tmp, f"{encoder}-memory", encoder, batch_size, epochs, precision, channels_last, True, 0)
        r["smptrain_zarr_samples_per_s"], r["data_wait_zarr"] = smptrain_rate(
            root, tmp, f"{encoder}-zarr", encoder, batch_size, epochs, precision, channels_last, False, workers)
        after = ceiling(resident, encoder, steps, device, precision, channels_last)
        r["ceiling_runs_samples_per_s"] = [before, after]
        r["ceiling_samples_per_s"] = statistics.median([before, after])
        r["memory_vs_ceiling"] = r["smptrain_memory_samples_per_s"] / r["ceiling_samples_per_s"]
        r["zarr_vs_ceiling"] = r["smptrain_zarr_samples_per_s"] / r["ceiling_samples_per_s"]

        accelerator = make_accelerator(precision)
        model = accelerator.prepare(device_model(encoder, len(bands), device, channels_last))
        loader = feed(memory, EvalBatches(len(memory), batch_size), device, 0, 0, 0, channels_last)
        evaluate(model, loader, accelerator, len(memory), Loss("focal"), "val")  # warm-up
        sync(device)
        start = time.perf_counter()
        evaluate(model, loader, accelerator, len(memory), Loss("focal"), "val")
        sync(device)
        r["eval_samples_per_s"] = len(memory) / (time.perf_counter() - start)
        r["train_forward_samples_per_s"] = forward_rate(resident, encoder, 10, device, precision, channels_last)
        r["eval_vs_train_forward"] = r["eval_samples_per_s"] / r["train_forward_samples_per_s"]
        results["encoders"][encoder] = r
        print(f"Unet-{encoder}")
        print(f"  ceiling (batches on the device)  {r['ceiling_samples_per_s']:9.1f} samples/s  (runs "
              f"{before:.1f}, {after:.1f})")
        print(f"  smptrain, in memory              {r['smptrain_memory_samples_per_s']:9.1f} samples/s  "
              f"{r['memory_vs_ceiling']:.3f} x ceiling, data wait {r['data_wait_memory']:.1%}")
        print(f"  smptrain, zarr + {workers} workers       {r['smptrain_zarr_samples_per_s']:9.1f} samples/s  "
              f"{r['zarr_vs_ceiling']:.3f} x ceiling, data wait {r['data_wait_zarr']:.1%}")
        print(f"  evaluation, all metrics          {r['eval_samples_per_s']:9.1f} samples/s  "
              f"{r['eval_vs_train_forward']:.2f} x training's forward pass ({r['train_forward_samples_per_s']:.1f}/s)")

    print("loaders alone")
    for reader in ("tensorstore", "zarr") if not loaders_only else ():
        unit = "thread" if reader == "tensorstore" else "worker"
        print(f"  zarr via {reader:<11}  1 {unit} {results[f'loader_{reader}_1_worker_samples_per_s']:8.1f} samples/s,"
              f" {workers} {unit}s {results[f'loader_{reader}_{workers}_workers_samples_per_s']:8.1f} samples/s")
    print(f"  in memory (host)                 {results['loader_memory_samples_per_s']:9.1f} samples/s")
    print("  one streamed batch, stage by stage: " + ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in results["batch_stages"].items()))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        results["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB" +
          (f", peak GPU memory {results['peak_gpu_memory_mb']:.0f} MB" if device.type == "cuda" else ""))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
