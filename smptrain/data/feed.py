"""How batches reach the device without making the training step wait for the host.

Two ways, chosen per dataset by `feed()`:

- `DeviceFeed`: the patches already live on the device (`data.in_memory` on a GPU with room for them). A batch is
  an index_select there; the indices of a whole epoch cross to the device in one copy. No host work per step.
- `PrefetchFeed`: the batches come from a loader (`make_loader`: patches in host memory or decoded by tensorstore,
  read a few batches ahead on threads of this process; or zarr-python in DataLoader worker processes). A background
  thread takes them, and on CUDA copies them from pinned memory on a side stream, `depth` batches ahead; the
  training step only waits on a CUDA event, so reading, checking, pinning and copying overlap the GPU's work.

Either way a batch is `(x float32 [B, C, P, P], y uint8 [B, P, P], positions int64 [B])` on the device, in the
order of the sampler, so the data order (and a resumed run) does not depend on which feed is used.
"""

from __future__ import annotations

import queue
import threading

import torch

from smptrain.core.runtime import indexed, same_device
from smptrain.data.batches import EvalBatches, make_loader
from smptrain.data.dataset import PatchDataset

MEMORY_SHARE = 0.5  # data.memory_device = auto: patches go to the GPU if they take at most this share of the room for them


def room_for_patches(free: int, reserved: int, allocated: int, still_to_come: int) -> float:
    """Bytes the patches may take on a GPU under `data.memory_device = auto`: MEMORY_SHARE of the memory that is
    free for them. `free` is the driver's (`mem_get_info`), which counts PyTorch's cached but unused blocks
    (`reserved - allocated`, left by an earlier run of a cross-validation or tuning process) as used although
    PyTorch will hand them out again; `still_to_come` is what will be allocated before the first step anyway (AdamW's
    two moment buffers appear only at the first optimizer step)."""
    return MEMORY_SHARE * max(free + (reserved - allocated) - still_to_come, 0)


def place_in_memory(datasets: list[PatchDataset], device: torch.device, memory_device: str,
                    still_to_come: int = 0) -> str:
    """Move in-memory datasets to the device when configured (or, for 'auto', when they fit); returns where they are.

    'auto' puts them on a CUDA device when all of them together fit `room_for_patches` (measured after the model is
    there, with `still_to_come` bytes of optimizer state counted as taken; the rest is left for activations);
    'device' always does (and fails like any out-of-memory error if they do not fit); 'cpu' never does.
    """
    unique = list({id(d): d for d in datasets if d.memory is not None}.values())
    if not unique or device.type != "cuda" or memory_device == "cpu":
        return "cpu"
    device = indexed(device)
    if memory_device == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        room = room_for_patches(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device),
                                still_to_come)
        if sum(d.nbytes for d in unique) > room:
            return "cpu"
    for dataset in unique:
        dataset.to_device(device)
    return "device"


def optimizer_state_to_come(optimizer) -> int:
    """Bytes AdamW will allocate at its first step: two moment buffers per parameter without state yet."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    return sum(2 * p.numel() * p.element_size() for group in inner.param_groups for p in group["params"]
               if p.requires_grad and not inner.state.get(p))


def resident_on(dataset: PatchDataset, device: torch.device) -> bool:
    """Whether the dataset's patches live on this (non-CPU) device, so batches can be gathered there."""
    return (dataset.memory is not None and torch.device(device).type != "cpu"
            and same_device(dataset.memory[0].device, device))


def evaluation_feed(dataset: PatchDataset, batch_size: int, accelerator, data_cfg, channels_last: bool,
                    place: bool = False):
    """This rank's whole batches of an evaluation set (validation or test), brought to the device. With `place`,
    the set's in-memory patches go to the device first where data.memory_device allows (training places its two
    sets together instead, to share the room between them)."""
    if place and dataset.memory is not None:
        place_in_memory([dataset], accelerator.device, data_cfg.memory_device)
    batches = EvalBatches(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index)
    return feed(dataset, batches, accelerator.device, data_cfg.num_workers, 0, accelerator.process_index,
                channels_last)


def feed(dataset: PatchDataset, batches, device: torch.device, num_workers: int, seed: int, rank: int,
         channels_last: bool = False, depth: int = 3):
    """An iterable of device batches over `batches` (a sampler of position lists), as fast as the data allows."""
    if resident_on(dataset, device):
        return DeviceFeed(dataset, batches, channels_last)
    loader = make_loader(dataset, batches, num_workers, device.type == "cuda", seed, rank)
    return PrefetchFeed(loader, indexed(device), channels_last, depth)


class DeviceFeed:
    """Batches gathered on the device from patches held there."""

    def __init__(self, dataset: PatchDataset, batches, channels_last: bool):
        self.dataset, self.batches, self.channels_last = dataset, batches, channels_last

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        x_all, y_all = self.dataset.memory
        device = x_all.device
        lists = list(self.batches)
        if not lists:
            return
        flat = torch.tensor([i for batch in lists for i in batch], dtype=torch.long)
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)  # one copy per epoch
        for index in flat.split([len(batch) for batch in lists]):
            x = x_all.index_select(0, index)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y_all.index_select(0, index), index


_END = object()


class PrefetchFeed:
    """A loader drained by a background thread, `depth` batches ahead, copied to CUDA on a side stream.

    One side stream for the feed's whole life: the caching allocator reuses a freed block only on the stream that
    allocated it, so a new stream per epoch or validation would strand the blocks of the old ones and reserved memory
    would creep up until the allocator has to free its cache (a stall).
    """

    def __init__(self, loader, device: torch.device, channels_last: bool, depth: int = 3):
        self.loader, self.device, self.channels_last, self.depth = loader, device, channels_last, depth
        self.stream = None  # made on first use, on the feed's device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type == "cuda" and self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(ready, stop), daemon=True, name="smptrain-prefetch")
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                (x, y, positions), event = item
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)  # the GPU waits for the copy; the host does not
                    for tensor in (x, y, positions):
                        tensor.record_stream(stream)  # allocated on the side stream, used on this one
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y, positions
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue, then let it see `stop`
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass

    def _produce(self, ready: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            if self.device.type == "cuda":
                # A new thread's current device is GPU 0 whatever the main thread set; leaving `torch.cuda.stream`
                # restores the current device's stream, which would create a CUDA context on GPU 0 in every rank.
                torch.cuda.set_device(self.device)
            for batch in self.loader:
                if stop.is_set():
                    return
                event = None
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                elif self.device.type != "cpu":
                    batch = tuple(t.to(self.device) for t in batch)
                if not put((batch, event)):
                    return
            put(_END)
        except BaseException as error:  # re-raised in the consuming thread (a UserError from a worker, say)
            put(error)
