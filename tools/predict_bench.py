"""Benchmark `smptrain-predict` on a scene too large for memory to matter: a GeoTIFF of SIZE x SIZE pixels, predicted
in stripes, against the model's forward pass alone on the same patches.

    .venv/bin/python tools/predict_bench.py [--size 10000] [--bands 3] [--patch-size 256] [--overlap 16]
                                            [--batch-size 8] [--encoder resnet18] [--json OUT]

Writes a uint16 GeoTIFF scene (tiled, deflate) and a converted file of a Unet with random weights (the forward
pass costs the same as a trained one's) to a scratch folder, then in one process:
  forward   batches of patches already normalised in memory through the model (sigmoid included): the ceiling
  scene     `smptrain.export.scene.predict_scene` on the whole scene, in a process of its own (so that its peak
            RSS is its own): reading, normalising, the patch grid, blending, and writing the probability GeoTIFF,
            its mask and the outlines
It prints patches/s of both, their ratio, the predicting process's peak RSS (and its RSS once torch and the model
are loaded) against the scene's size as float32, and the CPU.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smptrain.core.runtime import describe_cpu  # noqa: E402
from smptrain.data.grid import patch_origins  # noqa: E402
from smptrain.export.convert import build_converted  # noqa: E402
from smptrain.export.predict import load_converted  # noqa: E402
from smptrain.export.scene import predict_scene  # noqa: E402
from smptrain.model.network import described_model  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_scene(path: Path, size: int, bands: int) -> None:
    """A scene with structure at the scale of a patch (a coarse random field, 64 px a cell, with fine noise on top),
    as landscapes have, written in stripes so that making it needs little memory."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    cell = 64
    coarse = rng.integers(300, 2700, (bands, size // cell + 1, size // cell + 1)).astype(np.float32)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=bands, dtype="uint16",
                       crs="EPSG:32608", transform=from_origin(500_000, 7_600_000, 3, 3), tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", nodata=0) as scene:
        scene.descriptions = [f"band_{i + 1}" for i in range(bands)]
        for top in range(0, size, 512):
            rows = min(512, size - top)
            field = np.repeat(np.repeat(coarse[:, top // cell:(top + rows - 1) // cell + 1], cell, 1), cell, 2)
            field = field[:, top % cell:top % cell + rows, :size]
            values = (field + rng.normal(0, 60, field.shape)).clip(1, 65535).astype(np.uint16)
            scene.write(values, window=Window(0, top, size, rows))


def converted_model(path: Path, encoder: str, bands: int, patch: int) -> None:
    model = {"arch": "Unet", "encoder_name": encoder, "in_channels": bands, "classes": 1}
    description = {"bands": [f"band_{i + 1}" for i in range(bands)], "band_factors": [1 / 3000] * bands,
                   "band_offsets": [0.0] * bands}
    network = described_model(model, None, "bench")
    torch.save(build_converted(model, description, network.state_dict(), "bench", "smp", {"patch_size": patch}), path)


def forward_rate(converted: Path, bands: int, patch: int, batch_size: int, batches: int) -> float:
    """Patches/s of the model alone (sigmoid of the logits), on batches already in memory."""
    model, _ = load_converted(converted)
    batch = torch.rand(batch_size, bands, patch, patch)
    with torch.no_grad():
        torch.sigmoid(model(batch))  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            torch.sigmoid(model(batch)).squeeze(1).float()
    return batches * batch_size / (time.perf_counter() - start)


def predict_child(scratch: Path, patch_size: int, overlap: int, batch_size: int) -> None:
    load_converted(scratch / "model.ckpt")  # what every prediction holds: torch, the libraries, the model
    loaded = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    started = time.perf_counter()
    done = predict_scene(scratch / "model.ckpt", scratch / "scene.tif", scratch / "probabilities.tif",
                         mask=str(scratch / "mask.tif"), polygons=str(scratch / "outlines.gpkg"),
                         patch_size=patch_size, overlap=overlap, batch_size=batch_size, say=lambda line: None)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "rss_loaded_mib": loaded,
                      "peak_rss_mib": round(peak_rss_mib()), "outlines": done.outlines}))


@click.command()
@click.option("--size", default=10_000, show_default=True, help="Scene side in pixels.")
@click.option("--bands", default=7, show_default=True, help="Bands of the scene (DARTS trains on 7 or more).")
@click.option("--patch-size", default=256, show_default=True)
@click.option("--overlap", default=16, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--encoder", default="resnet18", show_default=True)
@click.option("--forward-batches", default=40, show_default=True, help="Batches the forward-only rate is timed on.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--predict", "predict_in", type=click.Path(file_okay=False), default=None, hidden=True,
              help="(the child process) predict the scene in this scratch folder and print its figures")
def main(size, bands, patch_size, overlap, batch_size, encoder, forward_batches, json_out, predict_in):
    if predict_in:
        return predict_child(Path(predict_in), patch_size, overlap, batch_size)
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        write_scene(scratch / "scene.tif", size, bands)
        print(f"scene {size} x {size} x {bands} written in {time.perf_counter() - started:.0f} s", flush=True)
        converted_model(scratch / "model.ckpt", encoder, bands, patch_size)
        forward = forward_rate(scratch / "model.ckpt", bands, patch_size, batch_size, forward_batches)
        child = subprocess.run([sys.executable, __file__, "--predict", str(scratch), "--patch-size", str(patch_size),
                                "--overlap", str(overlap), "--batch-size", str(batch_size)],
                               capture_output=True, text=True, check=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        seconds, before = measured["seconds"], measured["rss_loaded_mib"]
        padded = size + 2
        patches = len(patch_origins(padded, patch_size, overlap)) ** 2
        result = {"cpu": describe_cpu(), "torch": torch.__version__, "size": size, "bands": bands,
                  "patch_size": patch_size, "overlap": overlap, "batch_size": batch_size, "encoder": encoder,
                  "patches": patches, "seconds": round(seconds, 1), "forward_patches_per_s": round(forward, 2),
                  "scene_patches_per_s": round(patches / seconds, 2), "ratio": round(patches / seconds / forward, 3),
                  "peak_rss_mib": measured["peak_rss_mib"], "rss_loaded_mib": round(before),
                  "scene_float32_mib": round(size * size * bands * 4 / 2**20), "outlines": measured["outlines"]}
    print(f"{result['cpu']}; torch {result['torch']}")
    print(f"scene {size} x {size} x {bands}, Unet-{encoder}, patches of {patch_size} (overlap {overlap}), "
          f"batch {batch_size}: {patches} patches in {seconds:.0f} s")
    print(f"forward alone {forward:.2f} patches/s, smptrain-predict {patches / seconds:.2f} patches/s: "
          f"ratio {result['ratio']:.3f}")
    print(f"predicting process: peak RSS {result['peak_rss_mib']} MiB, {result['rss_loaded_mib']} MiB of it torch and "
          f"the model loaded (the scene as float32: {result['scene_float32_mib']} MiB)")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
