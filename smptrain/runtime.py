"""The Accelerator: device, precision and process group, set up the same way by every command.

Two traps this avoids (environment.md §3): under `accelerate launch --multi_gpu` on a machine without CUDA,
`Accelerator()` silently runs N independent single-process jobs, so we pass `cpu=True` there and get a real gloo
process group; and fp16 on the CPU is a silent no-op in Accelerate, so we refuse it with a clear error.
"""

from __future__ import annotations

import os

import torch

from smptrain.errors import UserError


def resolve_precision(configured: str) -> str:
    """`accelerate launch --mixed_precision X` (X other than 'no') wins over the config's train.mixed_precision."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    precision = launched if launched != "no" else configured
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' on the CPU (about 2x faster here)")
    if precision not in ("no", "bf16", "fp16"):
        raise UserError(f"mixed precision {precision!r} is not supported; use no, bf16 or fp16")
    return precision


def make_accelerator(precision: str = "no", log_with: str | None = None, grad_accum_steps: int = 1):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cpu = not torch.cuda.is_available()
    if torch.cuda.is_available():
        # Fixed input sizes: let cuDNN pick the fastest kernels; TF32 matmuls as DARTS' "medium"/"high" precision.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with=log_with,
        gradient_accumulation_steps=grad_accum_steps,
        # Our samplers shard the data themselves; keep Accelerate from re-wrapping anything.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        step_scheduler_with_optimizer=False,
    )


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Move (x, y, positions) to the device without blocking (pinned memory makes the copy asynchronous)."""
    x, y, positions = batch
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True), positions.to(device, non_blocking=True)
