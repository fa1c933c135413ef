"""Noticing that training has diverged without making the training step wait for the device.

`NonFiniteGuard` skips optimizer steps on the device once a gradient norm is not finite; the host learns of it with
the other logging numbers and stops every rank with `diverged()`, which names the first bad step and the last good
checkpoint. `Window` holds a logging window's loss on the device until it is reduced.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from smptrain.core.errors import UserError
from smptrain.training.layout import LAST, checkpoint_link, has_checkpoint
from smptrain.training.loading import read_meta


class TrainingStopped(UserError):
    """Training cannot go on (non-finite loss); the message names the step and the last good checkpoint."""


class Window:
    """The train loss and timers between two logging steps; the loss stays on the device until they are reduced."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self, start: float | None = None) -> None:
        self.loss_sum, self.count, self.wait, self.carried = torch.zeros((), device=self.device), 0, 0.0, 0
        self.start = self.fetch_start = time.perf_counter() if start is None else start

    def carry(self, loss_sum: float, count: float) -> None:
        """Continue a window a stop cut short: its loss sum and micro-batches as they were (not timed here)."""
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float32, device=self.device)
        self.count = self.carried = int(count)

    def arrived(self) -> None:
        self.wait += time.perf_counter() - self.fetch_start

    def fetching(self) -> None:
        self.fetch_start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.count += 1


def gradient_norm(accelerator, model, clip: float) -> torch.Tensor:
    if clip > 0:
        return accelerator.clip_grad_norm_(model.parameters(), clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


class NonFiniteGuard:
    """Skips optimizer steps on the device once a gradient norm is not finite, without the host waiting for the GPU.

    Every step adds to a device counter when its norm is not finite or an earlier one was (so the weights stay
    those of the last good step), and hands the fused AdamW that count as its `found_inf` flag, the way the fp16
    grad scaler skips steps. The host reads the counter with the other logging numbers (`reduce_window`) and then
    stops every rank: gradients are averaged over ranks first, so all of them see the same norm.
    """

    def __init__(self, optimizer, device: torch.device):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)

    def arm(self, norm: torch.Tensor) -> None:
        self.skipped += ((~torch.isfinite(norm)) | (self.skipped > 0)).float()
        self.optimizer.found_inf = (self.skipped > 0).float()


def diverged(first_step: int, run_dir: Path, epoch: int, what: str) -> TrainingStopped:
    last = checkpoint_link(run_dir, LAST)
    if not has_checkpoint(run_dir):
        return TrainingStopped(
            f"training stopped at step {first_step} (epoch {epoch + 1}): {what} the weights were not updated from then "
            f"on. No checkpoint was written yet, so {run_dir} is removed; lower train.lr (or set "
            f"train.grad_clip_norm) or fix the data, then run the same command again")
    return TrainingStopped(
        f"training stopped at step {first_step} (epoch {epoch + 1}): {what} the weights were not updated from then on. "
        f"The last good checkpoint is {last} (step {read_meta(last)['step']}); lower train.lr (or set "
        f"train.grad_clip_norm) or fix the data, then resume with --resume {run_dir}"
    )
