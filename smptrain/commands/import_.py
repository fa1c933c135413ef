"""`smptrain-import OUT --images DIR --labels FILE | --masks DIR`: your own imagery into the DARTS layout
(smptrain.data.imagery). The module's name has an underscore: `import` is Python's."""

from __future__ import annotations

import click

from smptrain.cli import report_user_errors
from smptrain.core.errors import UserError
from smptrain.data.imagery import HELDOUT, import_imagery


def band_normalisation_of(values) -> dict:
    """--band-normalisation NAME=FACTOR,OFFSET options as {name: (factor, offset)}."""
    found = {}
    for item in values:
        name, sep, numbers = item.partition("=")
        try:
            factor, offset = (float(v) for v in numbers.split(","))
        except ValueError:
            raise UserError(f"--band-normalisation {item!r} must look like NAME=FACTOR,OFFSET, e.g. red=0.0003333,0") \
                from None
        if not sep or not name or factor == 0:
            raise UserError(f"--band-normalisation {item!r} must look like NAME=FACTOR,OFFSET with a non-zero factor")
        found[name] = (factor, offset)
    return found


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True),
              help="A folder of rasters (every GeoTIFF, PNG, JPEG ... below it) or a list file (a path a line).")
@click.option("--masks", type=click.Path(exists=True, file_okay=False), default=None,
              help="Labels as mask rasters on the images' grids, matched by file stem.")
@click.option("--mask-suffix", default="", help="What follows the image's stem in its mask's name, e.g. _mask.")
@click.option("--positive", type=float, default=None, help="The mask value that is positive (else see --threshold).")
@click.option("--threshold", type=float, default=None,
              help="Mask values above this are positive [default: 127 for masks whose values go above 1, else 0].")
@click.option("--ignore-value", type=float, default=None, help="The mask value that is ignored (label 2).")
@click.option("--labels", "polygons", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Labels as polygons (GeoPackage, GeoJSON, Shapefile) burned onto each image (reprojected to its "
                   "CRS; for images without one, in pixel coordinates, assigned by an `image` column).")
@click.option("--ignore-labels", "ignore_polygons", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Polygons whose pixels are ignored (label 2).")
@click.option("--ignore-band", default=None, help="A band marking pixels to ignore where non-zero (not an input).")
@click.option("--erode", default=0, show_default=True,
              help="Grow the images' no-data areas by this many pixels before ignoring them (DARTS' mask_erosion_size).")
@click.option("--patch-size", default=256, show_default=True, help="Side of the square patches.")
@click.option("--overlap", default=0, show_default=True, help="Pixels neighbouring patches share.")
@click.option("--label-overlaps", type=click.Choice(["once", "every"]), default="once", show_default=True,
              help="once: a pixel shared by two patches is labelled in the first and ignored in the other, so each "
                   "pixel is scored once; every: labelled in both.")
@click.option("--min-valid", default=0.0, show_default=True, help="Keep patches with at least this share of labelled "
                                                                    "(not ignored) pixels.")
@click.option("--exclude-nan", is_flag=True, help="Drop patches with any pixel without data (DARTS' exclude_nan).")
@click.option("--exclude-nopositive", is_flag=True, help="Drop patches without a positive pixel (DARTS').")
@click.option("--bands", default=None, help="Band names, comma-separated [default: the rasters' descriptions].")
@click.option("--band-normalisation", multiple=True, metavar="NAME=FACTOR,OFFSET",
              help="A band's normalisation, raw * FACTOR + OFFSET in [0, 1] [default: DARTS' band table for a name it "
                   "knows (not for 8-bit data), else the data type's range] (repeatable).")
@click.option("--region", default=None, help="One region for every image.")
@click.option("--region-level", type=int, default=None,
              help="The region is the name of the folder this many levels above each image [default: 1, its folder].")
@click.option("--regions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A CSV table with an `image` column (name or stem) and a `region` column.")
@click.option("--heldout", type=click.Path(exists=True, dir_okay=False), default=None,
              help=f"A list of the images held out for testing (a name or stem a line) -> {HELDOUT} in the dataset.")
@click.option("--heldout-column", default=None, help="The --regions table's column that marks held-out images "
                                                     "(1, true, yes, test).")
@click.option("--append", is_flag=True, help="Add to the dataset at OUT (same bands, patch size and normalisation).")
@report_user_errors
def main(out, images, masks, mask_suffix, positive, threshold, ignore_value, polygons, ignore_polygons, ignore_band,
         erode, patch_size, overlap, label_overlaps, min_valid, exclude_nan, exclude_nopositive, bands,
         band_normalisation, region, region_level, regions, heldout, heldout_column, append):
    """Import your own images, labelled by mask rasters or polygons, into a dataset in the DARTS layout at OUT
    (data.zarr, metadata.parquet, config.toml) that every smptrain command and DARTS' own training read."""
    done = import_imagery(out, images, masks=masks, mask_suffix=mask_suffix, polygons=polygons,
                          ignore_polygons=ignore_polygons, positive=positive, threshold=threshold,
                          ignore_value=ignore_value, ignore_band=ignore_band, erode=erode, patch_size=patch_size,
                          overlap=overlap, score_once=label_overlaps == "once", min_valid=min_valid,
                          exclude_nan=exclude_nan, exclude_nopositive=exclude_nopositive,
                          bands=[b.strip() for b in bands.split(",")] if bands else None,
                          band_normalisation=band_normalisation_of(band_normalisation), region=region,
                          region_level=region_level, regions=regions, heldout=heldout,
                          heldout_column=heldout_column, append=append, say=click.echo)
    click.echo(f"wrote {done.patches} patches ({done.positive_patches} with positives; {done.dropped} dropped by the "
               f"filters) of {done.images} image(s) to {done.root}")
    click.echo("bands: " + ", ".join(f"{b} x {f:.6g} + {o:.6g}" for b, f, o in zip(done.bands, done.factors,
                                                                                 done.offsets)))
    if done.heldout:
        click.echo(f"{len(done.heldout)} image(s) held out in {done.root / HELDOUT}; to test on them:\n"
                   f'  [data]\n  dir = "{done.root}"\n  split_method = "sample"\n  split_by = ["@{HELDOUT}"]')




if __name__ == "__main__":  # python -m smptrain.commands.import_
    main()
