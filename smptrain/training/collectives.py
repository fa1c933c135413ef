"""The collectives of the training loop, each called by every rank at the same point: a rank that skipped one
would leave the others waiting in it for ever.

They are the loop's only exchanges besides the gradients' all-reduce: the logging window's loss and stop flag, the
BatchNorm statistics before a validation, and whether a signal arrived between epochs.
"""

from __future__ import annotations

import torch

from smptrain.training.divergence import Window, diverged


def signalled(run) -> bool:
    """Whether any rank was signalled (all ranks call it: one small reduction). Between epochs; before the first
    step of a run no signal is pending (one then ends the process at once)."""
    raised = torch.tensor([float(run.stop.raised)], device=run.accelerator.device)
    return run.accelerator.reduce(raised, "sum").item() > 0


def average_buffers(accelerator, model) -> None:
    """Average float buffers (BatchNorm running statistics) over ranks, as timm's distribute_bn: each rank updated
    its own from its own batches, so without this rank 1 would validate a model that is not the one saved."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for buffer in accelerator.unwrap_model(model).buffers():
            if buffer.is_floating_point():
                buffer.copy_(accelerator.reduce(buffer.detach().clone(), "mean"))


def reduce_window(run, window: Window, epoch: int) -> tuple[float, bool]:
    """Mean train loss over all ranks' micro-batches since the last record, and whether any rank was signalled.
    The one place the host waits for the device: it also reads the non-finite guard and stops on it."""
    device = window.loss_sum.device
    skipped = run.guard.skipped if run.guard is not None else torch.zeros((), device=device)
    packed = torch.stack([window.loss_sum.float(), torch.tensor(float(window.count), device=device),
                          torch.tensor(float(run.stop.raised), device=device), skipped.float()])
    packed = run.accelerator.reduce(packed, "sum").tolist()
    if packed[3] > 0:  # every rank has the same count: gradients were averaged before the norm
        skipped_steps = round(packed[3] / run.accelerator.num_processes)
        raise diverged(run.state.step - skipped_steps + 1, run.run_dir, epoch, "the gradient norm is not finite;")
    return packed[0] / max(packed[1], 1), packed[2] > 0
