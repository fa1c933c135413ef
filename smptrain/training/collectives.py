"""The collectives of the training loop, each called by every rank at the same point: a rank that skipped one
would leave the others waiting in it for ever.

They are the loop's only exchanges besides the gradients' all-reduce: whether a signal arrived (after every
optimizer step), the logging window's loss, the window a stop cut short, and the BatchNorm statistics before a
validation.

The stop flag goes through a process group on the CPU (gloo): exchanged after every step, it must not make the host
wait for the GPU, which reading a flag reduced over NCCL would (a sync per step). Under torch elastic's launcher a
Ctrl-C leaves 30 s, and under Accelerate's one-process launcher 5 s, before the processes are killed: the stop has
to come at the next step, not at the next logging step.
"""

from __future__ import annotations

import torch

from smptrain.training.divergence import Window, diverged

_STOP_GROUPS: dict[int, object] = {}  # a CPU process group per default group (CV and tuning train many runs in one)


def stop_group():
    """The gloo group the stop flag goes through: the default group when it is gloo already (CPU training), else a
    gloo group of the same processes, made once (every rank must call this the first time, at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = id(dist.group.WORLD)
    if key not in _STOP_GROUPS:
        _STOP_GROUPS[key] = dist.new_group(backend="gloo")
    return _STOP_GROUPS[key]


def stop_agreed(run) -> bool:
    """Whether any rank was signalled; every rank calls it after every optimizer step (and between epochs). One
    process asks its own flag; several sum theirs on the CPU group, so all stop at the same step."""
    if run.accelerator.num_processes == 1:
        return run.stop.raised
    import torch.distributed as dist

    flag = torch.tensor([float(run.stop.raised)])
    dist.all_reduce(flag, group=stop_group())
    return flag.item() > 0


def average_buffers(accelerator, model) -> None:
    """Average float buffers (BatchNorm running statistics) over ranks, as timm's distribute_bn: each rank updated
    its own from its own batches, so without this rank 1 would validate a model that is not the one saved."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for buffer in accelerator.unwrap_model(model).buffers():
            if buffer.is_floating_point():
                buffer.copy_(accelerator.reduce(buffer.detach().clone(), "mean"))


def reduce_window(run, window: Window, epoch: int) -> float:
    """Mean train loss over all ranks' micro-batches since the last record. The one place the host waits for the
    device: it also reads the non-finite guard and stops on it."""
    device = window.loss_sum.device
    packed = torch.stack([window.loss_sum.float(), torch.tensor(float(window.count), device=device),
                          guard_count(run, device)])
    packed = run.accelerator.reduce(packed, "sum").tolist()
    check_guard(run, packed[2], epoch)
    return packed[0] / max(packed[1], 1)


def keep_window(run, window: Window, epoch: int) -> None:
    """A stop between logging steps: every rank's share of the window so far (its loss sum and micro-batches,
    exactly as summed) into the train state the stop's checkpoint records, so that the resumed run continues the
    window and logs the record an uninterrupted run logs; the guard is read first, as at a logging step."""
    device = window.loss_sum.device
    check_guard(run, run.accelerator.reduce(guard_count(run, device)[None], "sum").item(), epoch)
    share = torch.stack([window.loss_sum.float(), torch.tensor(float(window.count), device=device)])
    run.state.window = run.accelerator.gather(share[None]).view(-1, 2).tolist()


def guard_count(run, device) -> torch.Tensor:
    return (run.guard.skipped if run.guard is not None else torch.zeros((), device=device)).float()


def check_guard(run, skipped_sum: float, epoch: int) -> None:
    if skipped_sum > 0:  # every rank has the same count: gradients were averaged before the norm
        skipped_steps = round(skipped_sum / run.accelerator.num_processes)
        raise diverged(run.state.step - skipped_steps + 1, run.run_dir, epoch, "the gradient norm is not finite;")
