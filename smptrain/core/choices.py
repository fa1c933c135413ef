"""Every closed set of values a configuration key or an option takes, in one place that imports nothing heavy.

`config.py` validates against these without importing torch, pandas or the data readers, so every command reads
and checks its configuration in a fraction of a second. The modules that implement a choice import its tuple from
here (and, where they hold a table of implementations, check that the table and the tuple agree).
"""

SPLIT_METHODS = ("random", "region", "sample", "none")  # data.split_method (smptrain.data.splits)
FOLD_METHODS = ("kfold", "shuffle", "stratified", "region", "region-stratified", "none")  # data.fold_method
READERS = ("auto", "tensorstore", "zarr")  # data.reader (smptrain.data.dataset)
MEMORY_DEVICES = ("auto", "device", "cpu")  # data.memory_device (smptrain.data.feed)
AUGMENTATIONS = ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "D4", "Blur", "RandomBrightnessContrast",
                 "MultiplicativeNoise", "Posterize")  # train.augment (smptrain.data.augment)
RECIPES = ("darts", "rare-positives", "rare-positives-ema")  # train.recipe (smptrain/config/recipes.toml)
SCHEDULES = ("exponential", "cosine", "constant")  # train.schedule (smptrain.training.schedule)
LOSSES = ("focal", "bce", "dice", "jaccard", "tversky", "lovasz")  # train.loss (smptrain.model.losses)
PRECISIONS = ("no", "bf16", "fp16")  # Accelerate's mixed precision names (smptrain.core.runtime)
PRECISION_CHOICES = ("auto", *PRECISIONS)  # train.mixed_precision
TRACKERS = ("wandb", "tensorboard", "mlflow")  # log.trackers (smptrain.training.tracking)
TTA_CHOICES = ("none", "flips", "d4")  # --tta of smptrain-test and smptrain-predict (smptrain.evaluation.tta)
PROGRESS_MODES = ("auto", "bar", "lines", "off")  # log.progress (smptrain.core.progress)
