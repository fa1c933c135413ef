import numpy as np
import pytest
import zarr

from smptrain.core.errors import UserError
from smptrain.data.batches import EvalBatches, TrainBatches
from smptrain.data.darts import open_dataset
from smptrain.data.dataset import PatchDataset


def test_foreign_dataset_reads_as_stored(foreign_dir):
    info = open_dataset(foreign_dir)
    assert info.bands == ("red", "green", "blue", "nir") and info.patch_size == 64 and info.num_rows == 40
    assert list(info.metadata.columns) == ["sample_id", "region", "empty"]
    group = zarr.open_group(str(foreign_dir / "data.zarr"), mode="r")
    rows = [int(r) for r in info.metadata.index[:7]]  # stored order, not zarr order
    data = PatchDataset(info, rows, info.band_indices(["nir", "red"]))
    x, y, positions = data.__getitems__([0, 3, 5])
    assert positions.tolist() == [0, 3, 5]
    for k, p in enumerate([0, 3, 5]):
        np.testing.assert_array_equal(x[k].numpy(), group["x"][rows[p]][[0, 3]])  # dataset order: red, nir
        np.testing.assert_array_equal(y[k].numpy(), group["y"][rows[p]])
    memory = PatchDataset(info, rows, info.band_indices(["nir", "red"]), in_memory=True)
    xm, ym, _ = memory.__getitems__([0, 3, 5])
    assert np.array_equal(xm.numpy(), x.numpy()) and np.array_equal(ym.numpy(), y.numpy())
    with pytest.raises(UserError, match="not in .*config.toml"):
        info.band_indices(["swir"])


def test_train_batches_are_a_pure_function_of_seed_and_epoch_and_shard_disjointly():
    ranks = [TrainBatches(50, 4, 2, r, seed=7) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    seen = [i for sampler in ranks for batch in sampler for i in batch]
    assert len(seen) == len(set(seen)) == 48  # 6 steps x 2 ranks x 4, remainder dropped
    again = TrainBatches(50, 4, 2, 0, seed=7)
    again.set_epoch(3)
    assert list(again) == list(ranks[0])
    again.set_epoch(3, start=2)
    assert list(again) == list(ranks[0])[2:] and len(again) == 4
    again.set_epoch(4)
    assert list(again) != list(ranks[0])


def test_eval_batches_cover_every_sample_once_in_the_same_batches():
    single = list(EvalBatches(23, 4))
    shards = [list(EvalBatches(23, 4, 3, r)) for r in range(3)]
    assert sorted(map(tuple, single)) == sorted(tuple(b) for s in shards for b in s)
    assert sum(len(b) for b in single) == 23


def test_positive_places_are_drawn_per_step_without_repeats_as_a_function_of_seed_and_epoch():
    """data.positive_fraction: the last place of every micro-batch holds a patch with positives; no patch appears
    twice in an optimizer step (2 ranks x 2 accumulated micro-batches); mid-epoch resume gives the same batches."""
    positives = list(range(0, 60, 5))  # 12 of 60 patches have positive pixels
    ranks = [TrainBatches(60, 4, 2, r, seed=3, accum=2, positives=positives, positive_slots=1) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    dealt = [list(sampler) for sampler in ranks]
    assert ranks[0].steps_per_epoch == 3 and all(len(d) == 6 for d in dealt)
    for step in range(3):
        batches = [b for d in dealt for b in d[2 * step:2 * step + 2]]
        patches = [i for b in batches for i in b]
        assert len(patches) == len(set(patches)) == 16
        assert all(b[-1] in positives for b in batches)
    share = np.mean([i in positives for d in dealt for b in d for i in b])
    assert share >= 0.25  # the drawn places, and whatever positives the random places hold
    again = TrainBatches(60, 4, 2, 1, seed=3, accum=2, positives=positives, positive_slots=1)
    again.set_epoch(2, start=3)
    assert list(again) == dealt[1][3:]
    again.set_epoch(3)
    assert list(again) != dealt[1]
