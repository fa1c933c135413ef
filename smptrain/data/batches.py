"""Which patches form each batch, and the DataLoader that reads them.

Samplers are ours, not Accelerate's: the training order is a pure function of (seed, epoch) so a resumed run sees
the same batches, and evaluation hands whole batches to ranks without padding so that metrics do not depend on the
number of processes.
"""

from __future__ import annotations

import math
import random

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


def make_loader(dataset: PatchDataset, batches, num_workers: int, pin_memory: bool, seed: int, rank: int):
    """A DataLoader over whole batches; workers only for zarr reads, persistent so an epoch starts at once."""
    if dataset.reads_in_process():  # tensorstore: data.num_workers decoding threads (0 = all cores), no processes
        workers, dataset.read_threads = 0, num_workers or None
    else:
        workers = 0 if dataset.memory is not None else num_workers
    if workers:
        import atexit

        atexit.unregister(_kill_leftover_workers)
        atexit.register(_kill_leftover_workers)  # runs before multiprocessing's handler (registered earlier)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_batch,
        num_workers=workers,
        pin_memory=pin_memory and (dataset.memory is None or dataset.memory[0].device.type == "cpu"),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=generator,
    )
