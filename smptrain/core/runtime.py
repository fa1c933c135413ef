"""The Accelerator: device, precision, determinism and process group, set up the same way by every command.

Two traps this avoids (environment.md §3): under `accelerate launch --multi_gpu` on a machine without CUDA,
`Accelerator()` silently runs N independent single-process jobs, so we pass `cpu=True` there and get a real gloo
process group; and fp16 on the CPU is a silent no-op in Accelerate, so we refuse it with a clear error.

`mixed_precision = "auto"` picks bf16 where the hardware computes it natively and fp32 elsewhere: CPUs without
native bf16 (AVX2-only x86, for instance) emulate it about 15x slower than fp32.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from smptrain.core.choices import PRECISIONS
from smptrain.core.errors import UserError


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware: the x86 flags `avx512_bf16` or `amx_bf16`, or the Arm feature
    `bf16` (read from /proc/cpuinfo; False where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def describe_cpu() -> str:
    """This machine's CPU, for every figure measured on it: model name, cores, and the instruction sets that change
    speed and bf16 (AVX-512, native bf16)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    features = "AVX-512" if "avx512f" in cpuinfo else "AVX2 only" if "avx2" in cpuinfo else "no AVX2"
    bf16 = ", native bf16" if cpu_has_native_bf16(cpuinfo) else ""
    return f"{model}, {os.cpu_count()} cores, {features}{bf16}"


def rank_cuda_index() -> int:
    """The GPU this process trains on, known before Accelerate sets it: the launcher's LOCAL_RANK (Accelerate
    uses cuda:LOCAL_RANK), else the first visible GPU."""
    return min(int(os.environ.get("LOCAL_RANK", "0") or 0), max(torch.cuda.device_count() - 1, 0))


def cuda_native_bf16(index: int) -> tuple[bool, str]:
    """(native bf16, card name) of GPU `index`, from its properties alone. Ampere (compute capability 8.0) and newer
    compute bf16 natively; `torch.cuda.is_bf16_supported()` also counts the emulation on V100/T4 (unless
    `including_emulation=False`) and asks the current device, which before Accelerate sets the rank's device is
    GPU 0: every rank would create a CUDA context there."""
    properties = torch.cuda.get_device_properties(index)
    return bool(torch.version.hip) or properties.major >= 8, properties.name


def choose_precision(configured: str) -> tuple[str, str]:
    """(precision, why) for the config's train.mixed_precision. `accelerate launch --mixed_precision X` (X other
    than 'no') wins; 'auto' becomes bf16 or 'no' (fp32) by what the hardware computes natively."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched != "no":
        precision, why = launched, "from accelerate launch --mixed_precision"
    elif configured == "auto":
        if torch.cuda.is_available():
            native, name = cuda_native_bf16(rank_cuda_index())
            precision = "bf16" if native else "no"
            why = f"auto: {name} {'computes bf16 natively' if native else 'has no native bf16 (before compute capability 8.0)'}"
        else:
            native = cpu_has_native_bf16()
            precision = "bf16" if native else "no"
            why = (f"auto: this CPU ({platform.machine()}) "
                   f"{'has native bf16' if native else 'has no native bf16, which would be emulated slowly'}")
    else:
        precision, why = configured, "train.mixed_precision"
    if precision not in PRECISIONS:
        raise UserError(f"mixed precision {precision!r} is not supported; use auto, no, bf16 or fp16")
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'auto' on the CPU")
    return precision, why


def describe_precision(precision: str) -> str:
    return {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}[precision]


def configure_determinism(deterministic: bool) -> None:
    """Deterministic CUDA kernels (cuDNN, cuBLAS, scatter/index ops), or the fastest ones; set for every run, so a
    fast run after an exact one in the same process (cross-validation, tuning) is fast again, and the reverse.

    On the CPU smptrain's results are exact without this. On CUDA, cuDNN's benchmark mode picks kernels by timing
    and several backward kernels accumulate with atomics, so two runs (or a run and its resumed continuation)
    differ in the last bits and then drift apart. `warn_only`: an op without a deterministic kernel (bilinear
    upsampling's backward, adaptive average pooling; `model.nondeterministic_on_cuda` names them for a model, and
    training says so once) warns instead of stopping the run.
    """
    # cuBLAS sizes its workspace from this once per process, at the first matmul: a deterministic run after a
    # non-deterministic one in the same process would set it too late, so every run sets it before any CUDA work
    # (32 MiB, the workspace cuBLAS recommends on Hopper anyway). A value the user set is kept.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = deterministic
        # Fixed input sizes: unless exactness is asked for, let cuDNN time and pick the fastest kernels.
        torch.backends.cudnn.benchmark = not deterministic
        # TF32 matmuls as DARTS' "medium"/"high" precision; deterministic either way.
        torch.set_float32_matmul_precision("high")


def make_accelerator(precision: str = "no", grad_accum_steps: int = 1, deterministic: bool = False):
    """The Accelerator of a command. Its trackers start later, once the run directory is known
    (smptrain.training.tracking)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    configure_determinism(deterministic)
    made = AcceleratorState._shared_state.get("_mixed_precision")
    if made is not None and made != precision:
        # Accelerate keeps one state per process, made for the first precision asked; one process may do several
        # commands' work in turn (a recipe comparison tests in fp32 what it trained in bf16), so the state, not the
        # process group, is made again (the reset Accelerate's own tests use).
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum_steps,
        # Our samplers shard the data themselves; keep Accelerate from re-wrapping anything.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        step_scheduler_with_optimizer=False,
    )


def start_accelerator(precision: str, why: str, threads: int = 0, grad_accum_steps: int = 1,
                      deterministic: bool = False):
    """The Accelerator of a command (training or testing), with torch's CPU threads set (`threads`, 0 = the cores
    shared among this machine's processes) and both choices said once: "precision: ... (why); N CPU thread(s)"."""
    accelerator = make_accelerator(precision, grad_accum_steps, deterministic)
    count = configure_threads(threads, local_processes(accelerator))
    accelerator.print(f"precision: {describe_precision(precision)} ({why}); {count} CPU thread(s) per process")
    return accelerator


def configure_threads(requested: int, local_processes: int) -> int:
    """torch's CPU threads, set explicitly: `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which
    halves a 2-core machine and changes the numbers against `python -m`. 0 = an OMP_NUM_THREADS the user set, else
    the cores divided among the processes on this machine."""
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ  # accelerate launch always sets it
    if requested:
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and not launched:  # the user's own choice
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_processes))
    torch.set_num_threads(threads)
    return threads


def local_processes(accelerator) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def end_processes() -> None:
    """Close the process group at the end of a command (every rank). `train()` leaves it open, so that
    cross-validation and tuning can run several trainings in the same launched processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def indexed(device) -> torch.device:
    """The device with its index: Accelerate's device on one GPU is `cuda` (no index), the one tensors report is
    `cuda:0`, and the two compare unequal. `cuda` means the current device, which Accelerate has set to the rank's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(a, b) -> bool:
    return indexed(a) == indexed(b)


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Move (x, y, positions) to the device without blocking (pinned memory makes the copy asynchronous)."""
    x, y, positions = batch
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True), positions.to(device, non_blocking=True)
