"""Which process this is among the launched ones, and work the main process does for all of them.

Imports neither torch nor Accelerate until asked (reading a configuration asks `is_main_process`, and must stay light).
"""

from __future__ import annotations

import os

from smptrain.core.errors import UserError


def is_main_process() -> bool:
    """Whether this is the main process of the launched ones, asked before or without an Accelerator: the launchers
    (accelerate, torchrun, smptrain-launch) give every process its RANK, and a process started alone is the main
    one. With an Accelerator, `accelerator.is_main_process` says the same."""
    return os.environ.get("RANK", "0") == "0"


def process_state():
    """Accelerate's view of this process among the launched ones (rank, count, device), the one the Accelerator
    then shares. Without a GPU it must be asked with cpu=True: a bare PartialState() on CPU ignores the launcher's
    WORLD_SIZE, and the Accelerator made later inherits that one-process state (every rank its own main process)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def on_main(work, what):
    """`work()` on the main process alone, its (picklable) result for every rank. A refusal there, a `UserError` or
    an `OSError` while writing `what`, is raised on every rank as one sentence, and any other failure as a
    RuntimeError on the others (the main process raises its own error): the others would otherwise go on to the
    next collective and wait for the main process for ever. Every rank calls it; with several processes it is also
    a barrier (the others receive only once the work is done)."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    outcome, failure = [None, None, None], None  # [result, a user's sentence, a bug's description]
    if state.is_main_process:
        try:
            outcome[0] = work()
        except UserError as error:
            failure, outcome[1] = error, str(error)
        except OSError as error:
            outcome[1] = f"cannot write {what}: {error.strerror or error}"
            failure = UserError(outcome[1])
        except Exception as error:  # a bug: the main process shows its traceback, the others stop too
            failure, outcome[2] = error, f"{type(error).__name__}: {error}"
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise UserError(outcome[1])
    if outcome[2] is not None:
        raise RuntimeError(f"the main process failed at {what}: {outcome[2]}")
    return outcome[0]
