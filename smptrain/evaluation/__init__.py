"""Evaluation: exact per-sample counts, metrics, calibration, TTA, per-group breakdowns, figures, and the
smptrain-test and smptrain-compare commands."""
