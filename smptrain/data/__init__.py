"""The DARTS training data: layout, zarr readers, patches and batches to the device, bands, splits, augmentations."""
