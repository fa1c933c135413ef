"""Which patches form each batch, and the DataLoader that reads them.

Samplers are ours, not Accelerate's: the training order is a pure function of (seed, epoch) so a resumed run sees
the same batches, and evaluation hands whole batches to ranks without padding so that metrics do not depend on the
number of processes.
"""

from __future__ import annotations

import math
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from smptrain.data.dataset import PatchDataset


class TrainBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of one epoch: a seeded permutation of (seed, epoch), dealt batch by batch.

    Global batch j goes to rank j % world_size. Every epoch has the same number of optimizer steps
    (incomplete batches and an incomplete accumulation group at the end are dropped, like DARTS' drop_last).
    `start` skips this rank's first micro-batches, which is how a run resumes mid-epoch without reading them.

    With `positive_slots` (data.positive_fraction; `positives` the patches with positive pixels), the last
    `positive_slots` places of every micro-batch hold patches drawn from `positives` instead, as nnU-Net oversamples
    foreground: see `_with_positives`.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, accum: int = 1,
                 positives: list[int] = (), positive_slots: int = 0):
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.accum = seed, accum
        self.steps_per_epoch = num_samples // (batch_size * world_size * accum)
        self.epoch, self.start = 0, 0
        self.positives, self.positive_slots = list(positives), positive_slots
        if positive_slots and len(self.positives) < positive_slots * world_size * accum:
            raise ValueError("fewer positive patches than one optimizer step draws")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.positive_slots:
            order = self._with_positives(order)
        for i in range(self.start, self.steps_per_epoch * self.accum):
            j = i * self.world_size + self.rank
            yield order[j * self.batch_size:(j + 1) * self.batch_size]

    def _with_positives(self, order: list[int]) -> list[int]:
        """The epoch's global batches, laid end to end as `__iter__` deals them, with positive places. Each optimizer
        step (all ranks' micro-batches of it) draws its positive patches without repeats from `positives` (its own
        seeded draw: a pure function of (seed, epoch, step)) and fills the other places from `order`, skipping the
        patches this step already drew: no patch appears twice in a step. Every step consumes at most one step's worth
        of `order`, so it never runs out."""
        size, slots = self.batch_size, self.positive_slots
        batches = self.world_size * self.accum  # global micro-batches per optimizer step
        drawer = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919_000_000)
        laid, cursor = [], 0
        for _ in range(self.steps_per_epoch):
            drawn = [self.positives[i] for i in torch.randperm(len(self.positives), generator=drawer)[:slots * batches].tolist()]
            taken = set(drawn)
            for b in range(batches):
                rest = []
                while len(rest) < size - slots:
                    if order[cursor] not in taken:
                        rest.append(order[cursor])
                    cursor += 1
                laid += rest + drawn[b * slots:(b + 1) * slots]
        return laid


class EvalBatches(torch.utils.data.Sampler):
    """Sequential batches of the whole set, batch i to rank i % world_size: no padding, no duplicates, and each
    sample sits in the same batch whatever the number of processes."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0):
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank

    def __len__(self) -> int:
        total = math.ceil(self.num_samples / self.batch_size)
        return len(range(self.rank, total, self.world_size))

    def __iter__(self):
        total = math.ceil(self.num_samples / self.batch_size)
        for i in range(self.rank, total, self.world_size):
            yield list(range(i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)))


def _batch(items):
    return items


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C and SIGTERM (SLURM sends it to every process of the job) are handled by the main process, which stops
    # at a step boundary, writes a checkpoint and then shuts its workers down; a worker dying first would break that.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Workers only read data, but seed them anyway (distinct per rank and worker) so that any randomness a user
    # adds to a dataset is reproducible.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL DataLoader workers still alive (they only read). Workers ignore SIGTERM, which is what
    multiprocessing's own exit handler would send them before joining, so without this an exit that did not shut
    a loader down (an error raised while iterating it) would wait for them forever."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class ReadAhead:
    """Whole batches read in this process, `ahead` of them at once on as many threads, handed out in sampler order.

    What the in-process readers need to keep a GPU fed: tensorstore decodes one batch's chunks on its own threads, but
    read, check, pin and copy one after another leave those threads idle while this process checks values and pins
    memory. With several batches in flight the decoding of the next ones overlaps the checking and pinning of this
    one (all of which release the GIL). Pinned on the CUDA device current when the reader was made, as a DataLoader
    would (a new thread's current device is GPU 0, whatever the rank's).
    """

    def __init__(self, dataset: PatchDataset, batches, pin_memory: bool, ahead: int = 3):
        self.dataset, self.batches, self.ahead = dataset, batches, max(ahead, 1)
        self.pin_device = torch.cuda.current_device() if pin_memory and torch.cuda.is_available() else None

    def __len__(self) -> int:
        return len(self.batches)

    def _start_thread(self) -> None:
        if self.pin_device is not None:
            torch.cuda.set_device(self.pin_device)

    def _load(self, positions):
        batch = self.dataset.__getitems__(positions)
        return tuple(t.pin_memory() for t in batch) if self.pin_device is not None else batch

    def __iter__(self):
        self.dataset.open_reader()  # once, here: threads racing to open it would each open one
        executor = ThreadPoolExecutor(self.ahead, thread_name_prefix="smptrain-read", initializer=self._start_thread)
        pending: deque = deque()
        try:
            order = iter(self.batches)
            for positions in order:
                pending.append(executor.submit(self._load, positions))
                if len(pending) == self.ahead:
                    break
            while pending:
                batch = pending.popleft().result()
                positions = next(order, None)
                if positions is not None:
                    pending.append(executor.submit(self._load, positions))
                yield batch
        finally:
            executor.shutdown(wait=True, cancel_futures=True)  # an early exit waits only for the reads under way


def make_loader(dataset: PatchDataset, batches, num_workers: int, pin_memory: bool, seed: int, rank: int):
    """The batches of `batches`, read from `dataset`: in this process (`ReadAhead`) from memory or by tensorstore's
    threads, else by persistent DataLoader worker processes (zarr-python), so that an epoch starts at once."""
    if dataset.reads_in_process():  # tensorstore: data.num_workers decoding threads (0 = all cores), no processes
        dataset.read_threads = num_workers or None
        return ReadAhead(dataset, batches, pin_memory and dataset.memory is None)
    if dataset.memory is not None or num_workers == 0:
        pinned = pin_memory and (dataset.memory is None or dataset.memory[0].device.type == "cpu")
        return ReadAhead(dataset, batches, pinned)
    import atexit

    atexit.unregister(_kill_leftover_workers)
    atexit.register(_kill_leftover_workers)  # runs before multiprocessing's handler (registered earlier)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=True,
        prefetch_factor=4,
        worker_init_fn=_seed_worker,
        generator=generator,
    )
