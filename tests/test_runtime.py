"""The device side of training: precision choice, the sync-free non-finite guard, feeds and zarr readers."""

from __future__ import annotations

import pytest
import torch

from smptrain.dataset import EvalBatches, PatchDataset, TrainBatches, make_loader, open_dataset
from smptrain.feed import DeviceFeed, PrefetchFeed, feed
from smptrain.runtime import choose_precision, cpu_has_native_bf16
from smptrain.train import NonFiniteGuard

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

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


def test_an_early_exit_from_a_prefetch_feed_stops_its_thread(demo_dir):
    import threading

    info = open_dataset(demo_dir)
    memory = PatchDataset(info, sorted(int(r) for r in info.metadata.index), [0], in_memory=True)
    loader = feed(memory, EvalBatches(len(memory), 2), torch.device("cpu"), 0, 0, 0, depth=1)
    for _ in loader:
        break
    assert not any(t.name == "smptrain-prefetch" for t in threading.enumerate())


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
from smptrain.dataset import PatchDataset, TrainBatches, open_dataset
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
    from smptrain.feed import place_in_memory

    info = open_dataset(demo_dir)
    rows = sorted(int(r) for r in info.metadata.index)
    sampler = TrainBatches(len(rows), 8, 1, 0, seed=1)
    reference = batches_of(make_loader(PatchDataset(info, rows, [0, 1, 2], in_memory=True), sampler, 0, False, 0, 0))
    device = torch.device("cuda")
    streamed = batches_of(feed(PatchDataset(info, rows, [0, 1, 2]), sampler, device, 2, 0, 0))
    memory = PatchDataset(info, rows, [0, 1, 2], in_memory=True)
    assert place_in_memory([memory], device, "device") == "device"
    resident = batches_of(feed(memory, sampler, device, 0, 0, 0))
    assert all(x.is_cuda for x, _, _ in streamed + resident)
    assert_same_batches(reference, streamed)
    assert_same_batches(reference, resident)


@CUDA
def test_pixel_stats_on_cuda_equal_the_cpu():
    from smptrain import metrics as M

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (4, 64, 64), generator=g).to(torch.uint8)
    probs = torch.round(torch.rand(4, 64, 64, generator=g) * 19) / 19
    assert torch.equal(M.pixel_stats(probs.cuda(), y.cuda()).cpu(), M.pixel_stats(probs, y))


def test_pixel_stats_have_no_host_sync_on_a_meta_device():
    """Shapes do not depend on the data: the counts can be computed on the meta device, where nothing is known."""
    from smptrain import metrics as M

    out = M.pixel_stats_compare(torch.empty(2, 8, 8, device="meta"), torch.empty(2, 8, 8, dtype=torch.uint8,
                                                                                   device="meta"))
    assert out.shape == (2, M.PIXEL_STATS) and out.dtype == torch.int64
