"""The learning rate of every optimizer step, as a pure function of (step, epoch): resuming at any step gives the
same rates as the run that never stopped, with no scheduler state to save.

- `exponential`: DARTS' `lr * gamma**epoch` (its ExponentialLR stepped once per epoch); the default.
- `cosine`: from `lr` down to 0 over the run's optimizer steps (`max_epochs * steps_per_epoch`, or `cosine_epochs`
  epochs' worth) after the warmup, half a cosine period (timm's and mmsegmentation's usual recipe, no restarts).
  Raising `max_epochs` on resume stretches a cosine that follows it from the resumed step on; a run meant to be
  trained in parts fixes `cosine_epochs`.
- `constant`: `lr` throughout.

`warmup_steps` (or `warmup_epochs`, that many epochs' steps) multiplies the first steps by a linear ramp,
`(step + 1) / warmup`, so step 0 already moves.
"""

from __future__ import annotations

import math


def warmup_of(train, steps_per_epoch: int) -> int:
    """Optimizer steps of the linear warmup: train.warmup_steps, or train.warmup_epochs epochs of them."""
    return train.warmup_steps or train.warmup_epochs * steps_per_epoch


def learning_rate(train, step: int, epoch: int, steps_per_epoch: int) -> float:
    """The rate of optimizer step `step` (counted from 0 over the run) in epoch `epoch` under `train` (TrainConfig)."""
    warmup = warmup_of(train, steps_per_epoch)
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if train.schedule == "exponential":
        return train.lr * train.gamma ** epoch * ramp
    if train.schedule == "constant":
        return train.lr * ramp
    total = max((train.cosine_epochs or train.max_epochs) * steps_per_epoch - warmup, 1)
    progress = min(max(step - warmup, 0) / total, 1.0)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress)) * ramp


def planned(train, steps_per_epoch: int, points: int | None = None, before=None, resumed_at: int = 0,
            until: int | None = None) -> tuple[list[int], list[float]]:
    """The optimizer steps of the run and their rates (drawn as `RUN_DIR/schedule.png`): every step, or about
    `points` evenly spaced ones plus every epoch's first and last (where an exponential schedule steps), the end of
    the warmup and the last step (a long run has millions). `before`: the TrainConfig a resumed run followed until
    `resumed_at`, when its schedule changed there; `until`: only the steps up to that one (those done so far)."""
    total = train.max_epochs * steps_per_epoch
    stride = max(1, total // points) if points else 1
    epochs = [s for e in range(train.max_epochs) for s in (e * steps_per_epoch, (e + 1) * steps_per_epoch - 1)]
    steps = sorted({*range(0, total, stride), *epochs, max(min(warmup_of(train, steps_per_epoch), total) - 1, 0),
                    total - 1, *([resumed_at - 1, resumed_at] if before is not None and 0 < resumed_at < total else [])})
    if until is not None:
        steps = [s for s in steps if s <= until]
    return steps, [learning_rate(before if before is not None and s < resumed_at else train, s, s // steps_per_epoch,
                                 steps_per_epoch) for s in steps]


def changed_on_resume(before, train, step: int, steps_per_epoch: int) -> str | None:
    """A sentence when resuming with other settings (a raised train.max_epochs under a cosine schedule, a warmup)
    moves the learning rate of the step the run continues from; None when it does not."""
    if before is None:
        return None
    epoch = step // steps_per_epoch
    was, now = (learning_rate(t, step, epoch, steps_per_epoch) for t in (before, train))
    if math.isclose(was, now, rel_tol=1e-9):
        return None
    keys = [key for key in ("max_epochs", "cosine_epochs", "warmup_steps", "warmup_epochs", "lr", "gamma")
            if getattr(before, key) != getattr(train, key)]
    changes = ", ".join(f"train.{k} {getattr(before, k)} -> {getattr(train, k)}" for k in keys) or "the settings"
    keep = (f"; to train on along the old one, set train.cosine_epochs = {before.cosine_epochs or before.max_epochs}"
            if train.schedule == "cosine" and "max_epochs" in keys and not train.cosine_epochs else "")
    return (f"note: resumed with {changes}: the {train.schedule} schedule changes at step {step}, where the learning "
            f"rate goes from {was:.3g} to {now:.3g} (schedule.png draws the rates followed){keep}")


def describe(train, steps_per_epoch: int) -> str:
    """The schedule in one line: steps per epoch and in all, the warmup, and the rate at its key points."""
    total = train.max_epochs * steps_per_epoch
    warmup = warmup_of(train, steps_per_epoch)
    points = {"first step": 0}
    if warmup:
        points["end of warmup"] = min(warmup, total) - 1
    points |= {"middle": total // 2, "last step": total - 1}
    rates = ", ".join(f"{name} {learning_rate(train, s, s // steps_per_epoch, steps_per_epoch):.3g}"
                      for name, s in sorted(points.items(), key=lambda item: item[1]))
    ramp = f", warmup {warmup} steps" if warmup else ""
    return (f"schedule: {train.schedule}, {steps_per_epoch} optimizer steps per epoch, {total} in {train.max_epochs} "
            f"epochs{ramp}; learning rate at the {rates}")
