"""`smptrain-convert CHECKPOINT`: the file the DARTS pipeline loads, or ONNX (smptrain.export.convert)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from smptrain.cli import report_user_errors
from smptrain.core.errors import UserError
from smptrain.export.convert import SELF_CHECK_TOLERANCE, convert
from smptrain.training.layout import BEST, LAST


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path())
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Where to write NAME_DATE.ckpt.")
@click.option("--name", required=True, help="Model name, written into config.name and the file name.")
@click.option("--framework", default="smp", show_default=True, help="Written into config.model_framework.")
@click.option("--which", type=click.Choice([BEST, LAST]), default=BEST, show_default=True,
              help="Which checkpoint of a run directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file of the same name and date.")
@click.option("--trust-pickle", is_flag=True, help="Allow reading a Lightning .ckpt (a pickle that can run code).")
@click.option("--bands-from", type=click.Path(file_okay=False), default=None,
              help="Dataset directory whose config.toml gives band factors/offsets missing from a Lightning checkpoint.")
@click.option("--threshold", default="0.5", show_default=True,
              help="Stored as config.smptrain.threshold (what smptrain-predict --binarize uses): a number, or val-best "
                   "for the one `smptrain-test --threshold val-best` chose on the validation split.")
@click.option("--format", "file_format", type=click.Choice(["darts", "onnx", "onnx-dynamic"]), default="darts",
              show_default=True,
              help="darts: the file the DARTS pipeline loads; onnx: raw bands in, probabilities out, with the band "
                   "normalisation inside, at the run's patch size (what QGIS Deepness loads; needs the onnx extra); "
                   "onnx-dynamic: the same for any height and width, for onnxruntime.")
@click.option("--resolution", type=float, default=None,
              help="ONNX: the imagery's resolution in cm per pixel, recorded for Deepness (e.g. 300 for 3 m).")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@report_user_errors
def main(checkpoint, out_dir, name, framework, which, overwrite, trust_pickle, bands_from, threshold, file_format,
         resolution, debug):
    """Convert CHECKPOINT (run dir, checkpoint dir or DARTS .ckpt) into the DARTS inference format."""
    if debug:
        os.environ["SMPTRAIN_DEBUG"] = "1"
    source = Path(checkpoint)
    if not source.exists():
        raise UserError(f"checkpoint {source} does not exist")
    target = convert(source, Path(out_dir), name, which=which, threshold=threshold, file_format=file_format,
                     framework=framework, overwrite=overwrite, trust_pickle=trust_pickle,
                     bands_from=Path(bands_from) if bands_from else None, resolution=resolution)
    click.echo(f"wrote {target}" if file_format != "darts" else
               f"wrote {target} (self-check passed: logits match within {SELF_CHECK_TOLERANCE})")



if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.convert
    main()
