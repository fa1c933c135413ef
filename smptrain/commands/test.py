"""`smptrain-test RUN_DIR`: test a checkpoint on its run's held-out split (smptrain.evaluation.assess)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from smptrain.cli import config_options, report_user_errors
from smptrain.core.runtime import end_processes
from smptrain.evaluation import calibration as C
from smptrain.evaluation.assess import TEST_PRECISIONS, assess_checkpoint
from smptrain.evaluation.tta import TTA_CHOICES
from smptrain.training.layout import BEST


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path())
@click.option("--checkpoint", default=BEST, show_default=True,
              help="best, last, or the path of a checkpoint directory.")
@click.option("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics here instead of RUN_DIR/test/metrics.json (figures still go to RUN_DIR/test).")
@click.option("--figures", "figures_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the figures and the per-region and per-sample tables (default: RUN_DIR/test).")
@click.option("--tta", type=click.Choice(TTA_CHOICES), default="none", show_default=True,
              help="Test-time augmentation: average probabilities over the 4 flips or the 8 symmetries of the square "
                   "(d4). The metrics without TTA are reported beside, as test/..., those with it as test_tta/....")
@click.option("--threshold", default="0.5", show_default=True,
              help="Also report the test metrics at this probability threshold (test_at_threshold/...); val-best "
                   "chooses the one that maximises IoU (and so F1) on the run's validation split, never on test, and "
                   "records it in RUN_DIR/test/threshold.json for smptrain-convert --threshold val-best.")
@click.option("--precision", type=click.Choice(TEST_PRECISIONS), default="fp32", show_default=True,
              help="Precision of the forward pass. fp32 is what the converted model computes in the DARTS pipeline, "
                   "so the metrics do not depend on the machine; bf16/fp16 autocast as in training, auto as "
                   "train.mixed_precision = auto.")
@config_options
@report_user_errors
def main(run_dir, checkpoint, batch_size, json_out, figures_dir, tta, threshold, precision, config_path, overrides,
         debug):
    """Evaluate a checkpoint of RUN_DIR on its held-out test split, with DARTS' full metric set, per region and per
    sample, optionally with test-time augmentation and a threshold chosen on validation."""
    if debug:
        os.environ["SMPTRAIN_DEBUG"] = "1"
    assess_checkpoint(Path(run_dir), checkpoint, tta=tta, threshold=C.parse_threshold(threshold), precision=precision,
                      batch_size=batch_size, config_path=config_path, overrides=overrides, json_out=json_out,
                      figures_dir=figures_dir)
    end_processes()



if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.test
    main()
