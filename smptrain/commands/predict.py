"""`smptrain-predict`: predict a scene with a converted or ONNX file (smptrain.export.predict)."""

from __future__ import annotations

import click

from smptrain.cli import report_user_errors
from smptrain.core.errors import UserError
from smptrain.evaluation.tta import TTA_CHOICES
from smptrain.export.predict import predict_file
from smptrain.export.scene import predict_scene


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("tile", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--mask", "mask_out", type=click.Path(dir_okay=False), default=None,
              help="A scene (GeoTIFF): also write this uint8 GeoTIFF, 1 above the threshold, 255 where the scene has "
                   "no data.")
@click.option("--polygons", "polygons_out", type=click.Path(dir_okay=False), default=None,
              help="A scene (GeoTIFF): also write the mask's outlines to this GeoPackage, each with its area and mean "
                   "probability, in the scene's CRS.")
@click.option("--patch-size", type=int, default=None,
              help="Side of the square patches the tile is cut into (default: the training patch size stored in the "
                   "converted file, else DARTS' 1024, capped to what fits the tile).")
@click.option("--overlap", default=16, show_default=True, help="Pixels shared by neighbouring patches, blended linearly.")
@click.option("--batch-size", default=8, show_default=True, help="Patches per forward pass.")
@click.option("--reflection", default=0, show_default=True,
              help="Extra reflect-padding around the tile, in pixels (DARTS' reflection).")
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None,
              help="Test-time augmentation per patch: flips (4) or d4 (8 symmetries) [default: none, as the DARTS "
                   "pipeline; with --stored, the file's].")
@click.option("--binarize", is_flag=True,
              help="A .npy tile: write a uint8 mask (prob > threshold) instead of probabilities.")
@click.option("--threshold", type=float, default=None,
              help="Threshold for --binarize [default: 0.5, as the DARTS pipeline; with --stored, the file's].")
@click.option("--onnx", "is_onnx", is_flag=True,
              help="CHECKPOINT is an ONNX file of smptrain-convert --format onnx, run in onnxruntime (the tile holds "
                   "the file's input bands, raw).")
@click.option("--stored", is_flag=True,
              help="Apply the TTA and threshold that smptrain-convert stored in the file (config.smptrain, chosen by "
                   "smptrain-test --threshold val-best); the DARTS pipeline ignores them.")
@report_user_errors
def main(checkpoint, tile, out, mask_out, polygons_out, patch_size, overlap, batch_size, reflection, tta, binarize,
         threshold, is_onnx, stored):
    """Predict a scene with a converted checkpoint (or, with --onnx, an exported ONNX file): a GeoTIFF (or any raster
    GDAL reads) of any size into a probability GeoTIFF on its grid, with --mask and --polygons on request; or a raw
    tile (.npy, C x H x W) into an .npy of probabilities (or with --binarize a mask). By default it computes what
    the DARTS pipeline computes from the file."""
    if not str(tile).lower().endswith(".npy"):
        if binarize:
            raise UserError("--binarize is for .npy tiles; a scene's mask is --mask MASK.tif")
        scene = predict_scene(checkpoint, tile, out, onnx=is_onnx, mask=mask_out, polygons=polygons_out,
                              patch_size=patch_size, overlap=overlap, batch_size=batch_size, reflection=reflection,
                              tta=tta, threshold=threshold, stored=stored, say=click.echo)
        also = ([f"the mask {mask_out}"] if mask_out else []) + \
            ([f"{scene.outlines} outline(s) in {polygons_out}"] if polygons_out else [])
        click.echo(f"wrote {out}: probabilities of {scene.shape[0]} x {scene.shape[1]} pixels (TTA {scene.tta}, "
                   f"patches of {scene.patch_size}), {scene.positive_share:.2%} above {scene.threshold:g}"
                   + (f"; {', '.join(also)}" if also else ""))
        return
    if mask_out or polygons_out:
        raise UserError("--mask and --polygons are for scenes (GeoTIFF); a .npy tile's mask is --binarize")
    done = predict_file(checkpoint, tile, out, onnx=is_onnx, patch_size=patch_size, overlap=overlap,
                        batch_size=batch_size, reflection=reflection, tta=tta, binarize=binarize, threshold=threshold,
                        stored=stored, say=click.echo)
    share = f"{done.positive_share:.2%} above {done.threshold:g}"
    if done.binarized:
        click.echo(f"wrote {out}: mask {done.shape} (prob > {done.threshold:g}, TTA {done.tta}), {share}")
    else:
        click.echo(f"wrote {out}: probabilities {done.shape} (TTA {done.tta}), {share}")


if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.predict
    main()
