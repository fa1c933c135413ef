"""The label rules of DARTS training data, named once.

`y` holds 0 (background), 1 (positive: a thaw slump) or 2 (ignored: clouds, bad quality, eroded borders). The
model has one output channel, the logit of the positive class. Pixels labelled IGNORE count nowhere: not in the
loss, not in its gradient, not in any metric.
"""

BACKGROUND = 0
POSITIVE = 1
IGNORE = 2
OUTPUT_CLASSES = 1  # smp's `classes`: one logit per pixel, for the positive class
