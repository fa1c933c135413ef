"""The device side of training: precision choice, the sync-free non-finite guard, feeds and zarr readers."""

from __future__ import annotations

import os

import pytest
import torch

from smptrain.core.runtime import choose_precision, cpu_has_native_bf16
from smptrain.data.batches import EvalBatches, TrainBatches, make_loader
from smptrain.data.darts import open_dataset
from smptrain.data.dataset import PatchDataset
from smptrain.data.feed import DeviceFeed, PrefetchFeed, feed
from smptrain.training.divergence import NonFiniteGuard


def CUDA(test):
    """A test for a CUDA GPU: skipped without one, and marked `cuda`, which the GPU check selects (-k cuda)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not cpu_has_native_bf16(AVX2_ONLY)
    assert cpu_has_native_bf16(SAPPHIRE) and cpu_has_native_bf16(GRAVITON)
    assert not cpu_has_native_bf16("")


def test_auto_precision_says_what_it_chose(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    precision, why = choose_precision("auto")
    assert precision in ("no", "bf16") and why.startswith("auto:")
    if not torch.cuda.is_available():
        assert (precision == "bf16") == cpu_has_native_bf16()
    assert choose_precision("no") == ("no", "train.mixed_precision")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert choose_precision("auto")[0] == "bf16"  # the launcher wins


def test_non_finite_step_and_every_step_after_it_leave_the_weights_alone():
    """The guard never reads the device; a bad norm freezes the weights (and AdamW's state) where they were."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = NonFiniteGuard(optimizer, torch.device("cpu"))

    def step(grad_value):
        for p in model.parameters():
            p.grad = torch.full_like(p, grad_value)
        guard.arm(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        optimizer.step()

    step(1.0)
    after_good = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    step(float("nan"))
    step(1.0)  # finite again, but the run is already diverged: still skipped
    assert all(torch.equal(a, p) for a, p in zip(after_good, model.parameters()))
    assert all(torch.equal(state[k], optimizer.state[model.weight][k]) for k in state)
    assert guard.skipped.item() == 2


def batches_of(loader):
    return [(x.clone(), y.clone(), p.clone()) for x, y, p in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya, pa), (xb, yb, pb) in zip(a, b):
        assert torch.equal(xa.cpu(), xb.cpu()) and torch.equal(ya.cpu(), yb.cpu()) and torch.equal(pa.cpu(), pb.cpu())


def test_feeds_deliver_the_loaders_batches_in_order(demo_dir):
    info = open_dataset(demo_dir)
    rows = sorted(int(r) for r in info.metadata.index)[:30]
    memory = PatchDataset(info, rows, [0, 2, 4], in_memory=True)
    sampler = TrainBatches(len(memory), 4, 1, 0, seed=5)
    sampler.set_epoch(3)
    reference = batches_of(make_loader(memory, sampler, 0, False, 0, 0))
    assert_same_batches(reference, batches_of(DeviceFeed(memory, sampler, channels_last=False)))
    assert_same_batches(reference, batches_of(PrefetchFeed(make_loader(memory, sampler, 0, False, 0, 0),
                                                           torch.device("cpu"), False, depth=2)))
    streamed = PatchDataset(info, rows, [0, 2, 4])
    assert_same_batches(reference, batches_of(feed(streamed, sampler, torch.device("cpu"), 2, 0, 0)))
    last = batches_of(feed(memory, EvalBatches(len(memory), 4), torch.device("cpu"), 0, 0, 0, channels_last=True))
    assert last[-1][0].shape[0] == 2 and last[0][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("in_memory", [True, False])  # host memory, tensorstore read ahead on threads
def test_an_early_exit_from_a_prefetch_feed_stops_its_threads(demo_dir, in_memory):
    import threading

    info = open_dataset(demo_dir)
    data = PatchDataset(info, sorted(int(r) for r in info.metadata.index), [0], in_memory=in_memory)
    loader = feed(data, EvalBatches(len(data), 2), torch.device("cpu"), 1, 0, 0, depth=1)
    for _ in loader:
        break
    assert not any(t.name.startswith(("smptrain-prefetch", "smptrain-read")) for t in threading.enumerate())


def test_read_ahead_hands_out_batches_in_sampler_order_whatever_order_reads_finish(demo_dir):
    """ReadAhead keeps several reads in flight; a later batch that is ready first still waits for its turn."""
    import time

    from smptrain.data.batches import ReadAhead

    info = open_dataset(demo_dir)
    rows = sorted(int(r) for r in info.metadata.index)[:24]
    data = PatchDataset(info, rows, [0, 1])
    sampler = TrainBatches(len(data), 4, 1, 0, seed=2)
    reference = batches_of(make_loader(PatchDataset(info, rows, [0, 1], in_memory=True), sampler, 0, False, 0, 0))
    slow_first = ReadAhead(data, sampler, pin_memory=False, ahead=3)
    read = data.__getitems__
    data.__getitems__ = lambda positions: (time.sleep(0.2 if positions[0] == reference[0][2][0] else 0),
                                           read(positions))[1]
    assert_same_batches(reference, batches_of(slow_first))


@pytest.mark.parametrize("which", ["demo_dir", "foreign_dir"])  # zarr v3 and v2, one chunk per sample and band
def test_tensorstore_and_zarr_python_read_the_same_values(which, request):
    info = open_dataset(request.getfixturevalue(which))
    rows = [int(r) for r in info.metadata.index[:9]]
    a = PatchDataset(info, rows, [1, 2], reader="tensorstore")
    b = PatchDataset(info, rows, [1, 2], reader="zarr")
    xa, ya, _ = a.__getitems__([4, 0, 8, 3])
    xb, yb, _ = b.__getitems__([4, 0, 8, 3])
    assert a._reader.kind == "tensorstore" and b._reader.kind == "zarr"
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.float32


def test_workers_forked_after_the_main_process_used_tensorstore_still_read(foreign_dir):
    """tensorstore aborts in a child forked from a process that used it; such workers read with zarr-python.
    (smptrain reads tensorstore in-process and forks no workers for it; this is the defence for anyone who does.)"""
    import subprocess
    import sys

    script = f"""
import numpy as np, torch
from smptrain.data.darts import open_dataset
from smptrain.data.dataset import PatchDataset
from smptrain.data.batches import TrainBatches
info = open_dataset({str(foreign_dir)!r})
rows = sorted(int(r) for r in info.metadata.index)
main = PatchDataset(info, rows, [0, 1, 2, 3], reader="auto")
main.__getitems__([0, 1])
assert main._reader.kind == "tensorstore"
data = PatchDataset(info, rows, [0, 1, 2, 3])  # worker processes forked now must not touch tensorstore
loader = torch.utils.data.DataLoader(data, batch_sampler=TrainBatches(len(rows), 4, 1, 0, 0), num_workers=2,
                                     collate_fn=lambda items: items)
total = sum(float(x.sum()) for x, y, p in loader)
print("ok", total > 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok True" in result.stdout, result.stderr[-2000:]


@CUDA
def test_feeds_on_cuda_equal_the_cpu_batches(demo_dir):
    from smptrain.data.feed import place_in_memory

    info = open_dataset(demo_dir)
    rows = sorted(int(r) for r in info.metadata.index)
    sampler = TrainBatches(len(rows), 8, 1, 0, seed=1)
    reference = batches_of(make_loader(PatchDataset(info, rows, [0, 1, 2], in_memory=True), sampler, 0, False, 0, 0))
    device = torch.device("cuda")
    streamed = batches_of(feed(PatchDataset(info, rows, [0, 1, 2]), sampler, device, 2, 0, 0))
    memory = PatchDataset(info, rows, [0, 1, 2], in_memory=True)
    assert place_in_memory([memory], device, "device") == "device"
    resident_feed = feed(memory, sampler, device, 0, 0, 0)  # device as Accelerate gives it on one GPU: no index
    assert isinstance(resident_feed, DeviceFeed)
    resident = batches_of(resident_feed)
    assert all(x.is_cuda for x, _, _ in streamed + resident)
    assert_same_batches(reference, streamed)
    assert_same_batches(reference, resident)


@CUDA
def test_pixel_stats_on_cuda_equal_the_cpu():
    from smptrain.evaluation import metrics as M

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (4, 64, 64), generator=g).to(torch.uint8)
    probs = torch.round(torch.rand(4, 64, 64, generator=g) * 19) / 19
    assert torch.equal(M.pixel_stats(probs.cuda(), y.cuda()).cpu(), M.pixel_stats(probs, y))


def test_pixel_stats_have_no_host_sync_on_a_meta_device():
    """Shapes do not depend on the data: the counts can be computed on the meta device, where nothing is known."""
    from smptrain.evaluation import metrics as M

    out = M.pixel_stats_compare(torch.empty(2, 8, 8, device="meta"), torch.empty(2, 8, 8, dtype=torch.uint8,
                                                                                   device="meta"))
    assert out.shape == (2, M.PIXEL_STATS) and out.dtype == torch.int64


# --- the GPU path, checked on the CPU where the logic allows it (issue 19) -------------------------------------------


def test_accelerates_unindexed_cuda_device_is_the_device_the_patches_report(monkeypatch):
    """One GPU: Accelerate's device is `cuda`, the patches' is `cuda:0`; the device-resident feed must be chosen."""
    from types import SimpleNamespace

    from smptrain.core.runtime import indexed, same_device
    from smptrain.data.feed import resident_on

    assert torch.device("cuda:0") != torch.device("cuda")  # why a plain comparison chose the wrong feed
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # Accelerate has set the rank's GPU (0)
    assert indexed(torch.device("cuda")) == torch.device("cuda:0") and indexed("cpu") == torch.device("cpu")
    assert same_device(torch.device("cuda:0"), torch.device("cuda"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda"))
    on_gpu0 = SimpleNamespace(memory=(SimpleNamespace(device=torch.device("cuda:0")),))
    assert resident_on(on_gpu0, torch.device("cuda")) and not resident_on(on_gpu0, torch.device("cuda:1"))
    assert not resident_on(SimpleNamespace(memory=None), torch.device("cuda"))
    on_host = SimpleNamespace(memory=(SimpleNamespace(device=torch.device("cpu")),))
    assert not resident_on(on_host, torch.device("cpu"))  # host memory goes through the prefetch feed


@pytest.mark.parametrize("local_rank, cards, expected", [
    ("0", [(7, "Tesla V100-SXM2-32GB")], "no"),  # emulated bf16 is not bf16
    ("0", [(7, "Tesla T4")], "no"),
    ("0", [(8, "NVIDIA A100-SXM4-80GB")], "bf16"),
    ("1", [(7, "Tesla V100"), (9, "NVIDIA H200")], "bf16"),  # rank 1 asks its own GPU, not GPU 0
    ("1", [(9, "NVIDIA H200"), (7, "Tesla V100")], "no"),
])
def test_auto_precision_asks_the_ranks_own_gpu_and_never_counts_emulation(monkeypatch, local_rank, cards, expected):
    from types import SimpleNamespace

    def must_not_be_called(*args, **kwargs):  # both ask the current device, which is GPU 0 in every rank
        raise AssertionError("asked the current device")

    asked = []

    def properties(index):
        asked.append(index)
        return SimpleNamespace(major=cards[index][0], name=cards[index][1])

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", must_not_be_called)
    monkeypatch.setattr(torch.cuda, "current_device", must_not_be_called)
    monkeypatch.setattr(torch.cuda, "get_device_name", must_not_be_called)
    monkeypatch.setattr(torch.version, "hip", None)
    precision, why = choose_precision("auto")
    assert precision == expected and asked == [int(local_rank)] and cards[int(local_rank)][1] in why


def test_determinism_is_set_for_every_run_before_any_cuda_work(monkeypatch):
    """Cross-validation and tuning run several trainings in one process: a non-deterministic run first must still
    leave cuBLAS's workspace setting in place for a deterministic one, and a deterministic one must not leave a fast
    one deterministic."""
    from smptrain.core.runtime import configure_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_determinism(False)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.are_deterministic_algorithms_enabled()
        configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        configure_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        configure_determinism(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own value is kept
    finally:
        torch.use_deterministic_algorithms(False)


def test_architectures_without_deterministic_cuda_kernels_are_named_once():
    from smptrain.model.network import determinism_note, nondeterministic_on_cuda

    for arch in ("Unet", "UnetPlusPlus", "MAnet", "Linknet"):  # nearest upsampling, transposed convolutions
        assert nondeterministic_on_cuda(arch, "resnet18", 7, 64) == [], arch
    for arch in ("FPN", "DeepLabV3", "DeepLabV3Plus", "PAN", "Segformer"):  # PAN's pyramid needs 256 px
        assert nondeterministic_on_cuda(arch, "resnet18", 7, 256) == ["bilinear upsampling"], arch
    for arch in ("PSPNet", "UPerNet"):  # pyramid pooling to 2x2, 3x3, 6x6
        assert nondeterministic_on_cuda(arch, "resnet18", 3, 64) == [
            "adaptive average pooling to more than 1x1", "bilinear upsampling"], arch
    assert nondeterministic_on_cuda("Unet", "efficientnet-b0", 7, 64) == []  # squeeze-excitation pools to 1x1: a mean
    note = determinism_note("DeepLabV3Plus", "resnet34", 7, 64, "cuda", True)
    assert "bilinear upsampling" in note and "not bitwise exact" in note and "DeepLabV3Plus" in note
    assert determinism_note("DeepLabV3Plus", "resnet34", 7, 64, "cpu", True) is None  # exact on the CPU
    assert determinism_note("DeepLabV3Plus", "resnet34", 7, 64, "cuda", False) is None
    assert determinism_note("Unet", "resnet34", 7, 64, "cuda", True) is None


def test_the_in_memory_rule_counts_cached_blocks_as_free_and_keeps_room_for_the_optimizer_state():
    from smptrain.data.feed import optimizer_state_to_come, room_for_patches

    gib = 2**30
    # the second training of a CV process: the driver sees 10 GiB free, PyTorch holds 30 GiB cached but unused
    assert room_for_patches(free=10 * gib, reserved=32 * gib, allocated=2 * gib, still_to_come=0) == 20 * gib
    # AdamW's two moment buffers come at the first step: 9 GiB of patches no longer fit in 20 GiB with 4 GiB to come
    assert room_for_patches(20 * gib, 0, 0, 4 * gib) == 8 * gib < 9 * gib
    assert room_for_patches(gib, 0, 0, 4 * gib) == 0

    model = torch.nn.Conv2d(3, 8, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    parameters = sum(p.numel() * 4 for p in model.parameters())
    assert optimizer_state_to_come(optimizer) == 2 * parameters
    model(torch.zeros(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    assert optimizer_state_to_come(optimizer) == 0


def test_a_nan_probability_is_counted_the_same_by_every_implementation():
    """NaN is below every threshold (as `prob > t` treats it): the CPU's scatter, the GPU's comparisons and the fine
    histogram agree, so a diverged model's metrics do not depend on the device."""
    from smptrain.evaluation import calibration as C
    from smptrain.evaluation import metrics as M

    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (3, 16, 16), generator=g).to(torch.uint8)
    probs = torch.rand(3, 16, 16, generator=g)
    probs[0, :4] = float("nan")
    probs[2] = float("nan")
    assert torch.equal(M.pixel_stats_scatter(probs, y), M.pixel_stats_compare(probs, y))
    fine = C.fine_histogram(probs, y).numpy()
    nan = torch.isnan(probs)
    assert fine[0, 0] == int(((y == 0) & (nan | (probs == 0))).sum())
    assert fine[1, 0] == int(((y == 1) & (nan | (probs == 0))).sum())
    tp, fp, _, _ = C.counts_above(fine)
    assert tp[500] == int(((probs > C.EDGES[500]) & (y == 1)).sum())
    assert torch.equal(C.confusion_at(probs, y, 0.5), M.pixel_stats(probs, y)[:, :4])


def test_constant_tables_are_copied_once_per_device():
    from smptrain.evaluation import metrics as M

    cache = {}
    meta = torch.device("meta")
    first = M.on_device(M.THRESHOLDS, meta, cache)
    assert first.device == meta and M.on_device(M.THRESHOLDS, meta, cache) is first
    assert M.on_device(M.THRESHOLDS, torch.device("cpu"), cache) is M.THRESHOLDS


@CUDA
def test_a_prefetch_feed_keeps_one_stream_and_flat_reserved_memory_over_epochs(demo_dir):
    info = open_dataset(demo_dir)
    rows = sorted(int(r) for r in info.metadata.index)
    sampler = TrainBatches(len(rows), 8, 1, 0, seed=1)
    loader = feed(PatchDataset(info, rows, [0, 1, 2], in_memory=True), sampler, torch.device("cuda"), 0, 0, 0)
    assert isinstance(loader, PrefetchFeed)  # patches in host memory
    reserved, streams = [], []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for x, y, _ in loader:
            (x.float().sum() + y.sum()).item()  # use the batch on the main stream
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
        streams.append(loader.stream)
    assert all(s is streams[0] for s in streams) and streams[0] is not None
    assert reserved[-1] == reserved[2], reserved


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_feed_on_the_second_gpu_creates_no_context_on_the_first(demo_dir):
    """What rank 1 of a 2-GPU run does: patches streamed to cuda:1 by the prefetch thread, then evaluated."""
    import subprocess
    import sys

    script = f"""
import torch
from smptrain.data.darts import open_dataset
from smptrain.data.dataset import PatchDataset
from smptrain.data.batches import EvalBatches
from smptrain.data.feed import feed
from smptrain.evaluation import metrics as M
torch.cuda.set_device(1)  # as Accelerate does for local rank 1
info = open_dataset({str(demo_dir)!r})
rows = sorted(int(r) for r in info.metadata.index)
data = PatchDataset(info, rows, [0, 1, 2], in_memory=True)
for x, y, p in feed(data, EvalBatches(len(rows), 8), torch.device("cuda:1"), 0, 0, 0):
    M.pixel_stats(torch.sigmoid(x[:, 0]), y)
torch.cuda.synchronize()
print("context on GPU 0:", torch._C._cuda_hasPrimaryContext(0))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "context on GPU 0: False" in result.stdout, result.stdout + result.stderr[-3000:]


@CUDA
def test_evaluation_counts_make_no_host_to_device_copies():
    from torch.profiler import ProfilerActivity, profile

    from smptrain.evaluation import calibration as C
    from smptrain.evaluation import metrics as M

    g = torch.Generator(device="cuda").manual_seed(0)
    probs = torch.rand(4, 64, 64, device="cuda", generator=g)
    y = torch.randint(0, 3, (4, 64, 64), device="cuda", generator=g).to(torch.uint8)
    M.pixel_stats(probs, y), C.fine_histogram(probs, y)  # warm: the constant tables are copied once here
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            M.pixel_stats(probs, y), C.fine_histogram(probs, y), C.confusion_at(probs, y, 0.4)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "HtoD" in e.name]
    assert not copies, copies


@CUDA
def test_auto_precision_on_this_gpu_matches_its_compute_capability(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    precision, why = choose_precision("auto")
    assert precision == ("bf16" if torch.cuda.get_device_capability(0)[0] >= 8 else "no"), why


def test_one_process_may_make_accelerators_of_another_precision_in_turn():
    """A recipe comparison (or tuning's retrain-and-test) tests in fp32, in the same process, what it trained in
    bf16: Accelerate's per-process state, made for bf16, must not refuse the fp32 one."""
    from smptrain.core.runtime import make_accelerator

    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"


def test_threads_under_accelerate_launch_are_the_cores_not_its_one_thread(monkeypatch):
    """`accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core machine: with
    train.threads = 0 a launched process takes the cores divided among the machine's processes, while a user's own
    OMP_NUM_THREADS is kept outside a launcher. (That a launched run then computes what `python -m` computes, bit
    for bit, tests/test_stops.py shows on its resumed runs.)"""
    import os

    import torch

    from smptrain.core.runtime import configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        assert configure_threads(0, 1) == max(1, os.cpu_count() or 1) == torch.get_num_threads()
        assert configure_threads(0, 2) == max(1, (os.cpu_count() or 1) // 2)
        assert configure_threads(3, 1) == 3
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        assert configure_threads(0, 1) == 1  # the user's own choice, outside a launcher
    finally:
        torch.set_num_threads(before)
