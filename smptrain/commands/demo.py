"""`smptrain-demo-data DIR [--patches N] [--patch-size P] [--seed S] [--overwrite]`: write the learnable demo
dataset (smptrain.data.demo) in the DARTS layout."""

from __future__ import annotations

from pathlib import Path

import click

from smptrain.cli import report_user_errors
from smptrain.core.errors import UserError
from smptrain.data.demo import BANDS, make_demo, make_imagery
from smptrain.data.rasters import require_imagery


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--patches", default=192, show_default=True, help="Number of patches.")
@click.option("--patch-size", default=64, show_default=True, help="Patch side in pixels (a multiple of 32).")
@click.option("--seed", default=0, show_default=True, help="Generator seed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
@click.option("--imagery", is_flag=True,
              help="Write imagery as a researcher holds it instead, to try smptrain-import and smptrain-predict on: "
                   "GeoTIFF scenes by region, their slumps' outlines in a GeoPackage and as PNG masks, a held-out list.")
@report_user_errors
def main(out, patches, patch_size, seed, overwrite, imagery):
    """Write a learnable demo dataset in the DARTS layout to OUT (or, with --imagery, scenes and labels to import)."""
    if Path(out).exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if imagery:
        require_imagery()
        path = make_imagery(out, seed=seed)
        click.echo(f"wrote {len(list(path.rglob('*.tif')))} GeoTIFF scenes to {path / 'scenes'}, their outlines to "
                   f"{path / 'outlines.gpkg'}, masks to {path / 'masks'} and a held-out list to {path / 'heldout.txt'}")
        return
    if patches < 8 or patch_size < 32:
        raise UserError("--patches must be at least 8 and --patch-size at least 32")
    path = make_demo(out, patches, patch_size, seed)
    click.echo(f"wrote {patches} patches of {patch_size}x{patch_size} ({len(BANDS)} bands) to {path}")


if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.demo
    main()
