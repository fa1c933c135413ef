"""`smptrain-launch`: `accelerate launch` without a deadline on the stop.

    smptrain-launch [accelerate launch options] -m smptrain.train --config FILE [--set ...]

The same arguments as `accelerate launch` (its parser and launchers are used as they are, but for the one-process
launcher, see `one_process`). What differs is what a signal does to the launcher itself:

- Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the launcher and every training
  process. `accelerate launch` (1.16) answers it with SIGTERM to its one process and SIGKILL 5 s later, or (several
  processes, torch elastic's agent) passes SIGINT on and kills them after 30 s, logging a line per process. The
  training processes stop after their current step either way (`smptrain.training.signals`); `smptrain-launch`
  lets them take whatever time their checkpoint takes and waits for them: the prompt returns after they are done,
  with their exit status and no log lines or traceback.
- A SIGINT or SIGTERM sent to the launcher alone (`kill PID`, a scheduler signalling only the top process) is
  passed on to the training processes, so they stop the same way. When the whole group got the signal too, each
  training process sees it twice within a moment; smptrain counts that as one request (see `StopSignal`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc; elsewhere none are found and nothing is forwarded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def exit_status(error: BaseException, forwarded: set[int] = frozenset()) -> int:
    """The training processes' own exit status from the launcher's exception (130 if any was interrupted). A process
    that ended by a signal the launcher passed on to it (128 + N) was stopped at the launcher's request: 130 too,
    the status every smptrain command gives an interrupted run (its checkpoint was written, or it was too early)."""
    if isinstance(error, subprocess.CalledProcessError):
        codes = [error.returncode]
    else:  # torch elastic's ChildFailedError: one failure per rank
        codes = [failure.exitcode for failure in getattr(error, "failures", {}).values()] or [1]
    codes = [128 - code if code < 0 else code for code in codes]  # killed by signal N -> 128 + N, as a shell reports
    codes = [130 if code - 128 in forwarded else code for code in codes]
    return 130 if 130 in codes else max(codes)


def one_process(args) -> None:
    """One training process, the command and environment `accelerate launch` would give it, waited for as it
    finishes. Accelerate's own (1.16 at least) kills the process 5 s after passing a signal on, which a large
    checkpoint on a slow filesystem can take longer than; here `launch`'s handlers stay in charge."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    process = subprocess.Popen(cmd, env=env)
    process.wait()  # a signal runs `forward` and the wait goes on (PEP 475)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, cmd)


def said_by_default(args) -> None:
    """Without an accelerate config file, the values `accelerate launch` would take by default (and then list in a
    six-line warning at every start): one machine, the GPUs there are (else one process), no launcher precision
    (train.mixed_precision decides), no dynamo. A config file, or a value given, is left to Accelerate."""
    import torch
    from accelerate.commands.config import default_config_file

    if Path(args.config_file or default_config_file).is_file():
        return
    if args.num_processes is None:
        args.num_processes = max(torch.cuda.device_count(), 1)
    if args.num_machines is None:
        args.num_machines = 1
    if args.mixed_precision is None:
        args.mixed_precision = "no"
    if args.dynamo_backend is None:
        args.dynamo_backend = "no"


def launch(argv: list[str] | None = None) -> int:
    """Run `accelerate launch` with `argv` (its own arguments, then the training module's), with the orderly stop
    described above; returns the training processes' exit status (130 when a signal stopped them)."""
    import accelerate.commands.launch as accelerate_launch
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    parser.prog = "smptrain-launch"
    args = parser.parse_args(argv)
    said_by_default(args)
    # torch elastic's agent (several processes) would catch these itself, forward them and kill the workers after
    # 30 s; left to us, the workers stop in their own time and the agent sees them exit.
    # (torch.distributed.run's --signals-to-handle, read from PET_SIGNALS_TO_HANDLE when accelerate builds its args)
    os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"

    forwarded: set[int] = set()

    def forward(signum, frame):
        forwarded.add(signum)
        # The workers now stop on their own and exit 130; torch elastic would log that as a failure of theirs.
        for name in list(logging.Logger.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        for pid in children(os.getpid()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    accelerate_launch.simple_launcher = one_process  # what launch_command calls for one process (or mpirun)
    try:
        launch_command(args)
        code = 0
    except subprocess.CalledProcessError as error:
        code = exit_status(error, forwarded)
    except Exception as error:  # torch elastic's ChildFailedError; its agent has already logged the failure
        if type(error).__name__ != "ChildFailedError":
            raise
        code = exit_status(error, forwarded)
    return code
