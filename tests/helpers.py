"""What the tests share besides fixtures: running a command in its own process (forked from the zygote, or a fresh
interpreter), 2-process `accelerate launch`, configurations, and datasets in the DARTS layout written the ways
DARTS' builders write them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from zygote import Zygote

from smptrain.config.dump import toml_value

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# tools/test.sh runs two pytest workers (pytest-xdist) on a 2-core machine: one CPU thread per process then, so the
# workers' subprocesses do not oversubscribe the cores.
THREADS = os.environ.get("OMP_NUM_THREADS") or ("1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")


def cli_env(**extra) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": THREADS}
    env.pop("SMPTRAIN_DEBUG", None)
    env.update(extra)
    return env


def run(args: list[str], cwd: Path | None = None, timeout: float = 600, check: bool = False, **env):
    """Run a command (console script name or python -m) in its own process; returns CompletedProcess with text.

    smptrain's commands and `python -m smptrain...` / `python tools/...` are forked from this worker's zygote (a
    Python that has imported torch, smp, Accelerate and the rest once): each is still a real process with its own
    exit status and output, without paying those 4-5 s of imports again. Anything else, or an environment that
    libraries read at import time (see `read_at_run_time`), starts a fresh interpreter."""
    if args[0].startswith("smptrain-") or args[0] == "accelerate":
        full = [str(BIN / args[0]), *args[1:]]
    elif args[0] == "python":
        full = [sys.executable, *args[1:]]
    else:
        full = list(args)
    target = Zygote.target(args, ROOT)
    if target is not None and all(read_at_run_time(key, value) for key, value in env.items()):
        result = Zygote.get(cli_env(), ROOT).run(full, target, cwd or ROOT, cli_env(**env), timeout)
    else:
        result = subprocess.run(full, cwd=cwd or ROOT, env=cli_env(**env), capture_output=True, text=True,
                                timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def read_at_run_time(key: str, value: str) -> bool:
    """Whether a forked command sees this environment variable as a fresh one would: smptrain's own, wandb's and
    MLflow's (neither is imported by the zygote), or a value the zygote started with."""
    return key.startswith(("SMPTRAIN_", "WANDB_", "MLFLOW_")) or cli_env().get(key) == value


def launch_two(args: list[str], timeout: float = 600, precision: str = "no", **env):
    """`accelerate launch` with 2 real CPU processes (gloo), as environment.md §3 measured it."""
    return run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", precision, "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", *args],
               timeout=timeout, **env)


def write_toml(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(tmp: Path, data_dir: Path, name: str = "tiny.toml", **sections) -> Path:
    """configs/tiny.toml plus a data dir, an artifact dir under tmp and any section overrides."""
    import tomllib

    cfg = tomllib.loads((ROOT / "configs" / "tiny.toml").read_text())
    cfg["data"]["dir"] = str(data_dir)
    cfg["data"]["in_memory"] = True
    cfg["log"]["artifact_dir"] = str(tmp / "artifacts")
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return write_toml(tmp / name, cfg)


def write_arrays(root: Path, x: np.ndarray, y: np.ndarray, zarr_format: int) -> None:
    """data.zarr with DARTS' chunking: one chunk per sample and band for x, one per sample for y."""
    import zarr

    patch = x.shape[-1]
    root.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(root / "data.zarr"), mode="w", zarr_format=zarr_format)
    group.create_array("x", shape=x.shape, dtype="float32", chunks=(1, 1, patch, patch))[:] = x
    group.create_array("y", shape=y.shape, dtype="uint8", chunks=(1, patch, patch))[:] = y


def write_foreign_dataset(root: Path, n: int = 40, patch: int = 64, seed: int = 1) -> Path:
    """A DARTS-layout dataset not made by smptrain's generator: zarr format 2, one chunk per sample and band,
    metadata rows stored shuffled with extra columns (geometry as WKB-like bytes, planet_id, fpath)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    bands = ["red", "green", "blue", "nir"]
    x = rng.random((n, len(bands), patch, patch), dtype=np.float32) * 0.5
    y = np.zeros((n, patch, patch), np.uint8)
    regions = ["North", "South", "West", "East"]
    for i in range(n):
        if i % 3:
            r, c = rng.integers(4, patch - 20, 2)
            y[i, r:r + 14, c:c + 10] = 1
            x[i, :, r:r + 14, c:c + 10] += 0.4
        if i % 5 == 0:
            y[i, :6] = 2
    write_arrays(root, x, y, zarr_format=2)
    order = rng.permutation(n)
    metadata = pd.DataFrame({
        "patch_id": order % 7,
        "region": [regions[i % 4] for i in order],
        "sample_id": [f"2019{i % 8:02d}_PS" for i in order],
        "empty": [not (y[i] == 1).any() for i in order],
        "planet_id": [f"p{i}" for i in order],
        "fpath": [f"/data/tile_{i}.tif" for i in order],
        "geometry": [b"\x01\x03\x00" + bytes([i % 256]) for i in order],
    }, index=pd.Index(order, name=None))
    metadata.to_parquet(root / "metadata.parquet")
    (root / "config.toml").write_text(
        "[darts]\n"
        f'train_data_dir = "{root}"\npatch_size = {patch}\noverlap = 8\nn_bands = 4\nexclude_nopositive = false\n'
        'bands = ["red", "green", "blue", "nir"]\nband_factors = [0.0003333, 0.0003333, 0.0003333, 0.0003333]\n'
        'band_offsets = [0.0, 0.0, 0.0, 0.0]\ndata_dir = "/data/planet"\ntpi_outer_radius = 100\n'
    )
    return root


def check_patience_one(run_dir: Path, max_epochs: int, output: str) -> None:
    """With patience 1 (and validation every epoch) a run stops right after the first validation that is not a
    strict improvement, or at max_epochs. BatchNorm statistics move even with a tiny lr, so either can happen."""
    values = [r["val/JaccardIndex"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "val/JaccardIndex" in r]
    assert all(values[i] > max(values[:i]) for i in range(1, len(values) - 1))  # every earlier one improved
    stopped_early = len(values) > 1 and values[-1] <= max(values[:-1])
    assert stopped_early == ("early stopping" in output)
    assert stopped_early or len(values) == max_epochs


CURRENT_BANDS = ["blue", "green", "red", "nir", "ndvi", "relative_elevation", "slope"]


def write_current_dataset(root: Path, n: int = 48, patch: int = 64, seed: int = 5, bands=CURRENT_BANDS) -> Path:
    """A dataset as today's DARTS builder writes it: `bands` as names only (x normalised with DARTS' band table),
    GeoParquet metadata with z_idx, geometry and the builder's other columns, rows stored shuffled."""
    import json as _json

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smptrain.data.bands import VALID_RANGES

    rng = np.random.default_rng(seed)
    regions = ["Peel Plateau", "Taymyr", "Banks Island"]
    x = np.zeros((n, len(bands), patch, patch), np.float32)
    y = np.zeros((n, patch, patch), np.uint8)
    for i in range(n):
        decoded = np.stack([rng.uniform(*VALID_RANGES.get(b, (0.0, 1.0)), (patch, patch)) for b in bands])
        if i % 2:
            r, c = rng.integers(4, patch - 24, 2)
            y[i, r:r + 18, c:c + 14] = 1
            decoded[:, r:r + 18, c:c + 14] *= 0.3
        if i % 7 == 0:
            y[i, -5:] = 2
        low = np.array([VALID_RANGES.get(b, (0.0, 1.0))[0] for b in bands])[:, None, None]
        high = np.array([VALID_RANGES.get(b, (0.0, 1.0))[1] for b in bands])[:, None, None]
        x[i] = np.clip((decoded - low) / (high - low), 0, 1)
    write_arrays(root, x, y, zarr_format=3)
    order = rng.permutation(n)
    frame = pd.DataFrame({
        "patch_id": order % 9, "region": [regions[i % 3] for i in order],
        "sample_id": [f"S2A_{i % 6:02d}" for i in order], "empty": [not (y[i] == 1).any() for i in order],
        "x": (order % 4) * patch, "y": (order // 4 % 4) * patch, "patch_idx_x": order % 4, "patch_idx_y": order // 4 % 4,
        "z_idx": order, "geometry": [bytes([1, 3, 0, 0, 0]) + int(i).to_bytes(4, "little") for i in order],
    }, index=pd.Index(order))
    table = pa.Table.from_pandas(frame)
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}}}
    table = table.replace_schema_metadata({**table.schema.metadata, b"geo": _json.dumps(geo).encode()})
    pq.write_table(table, root / "metadata.parquet")
    (root / "config.toml").write_text(
        "[darts]\n"
        f'train_data_dir = "{root}"\npatch_size = {patch}\noverlap = 0\nexclude_nopositive = false\n'
        f"bands = [{', '.join(repr(b).replace(chr(39), chr(34)) for b in bands)}]\n"
        'sources = ["sentinel2", "arcticdem"]\n')
    return root
