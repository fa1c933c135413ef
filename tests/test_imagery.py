"""Your own imagery in and out: `smptrain-import` against what the tiling should give, pixel by pixel, on GeoTIFFs,
PNGs and polygons written here; and `smptrain-predict` on a GeoTIFF against `predict_in_patches` on its array."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rasterio", reason="the imagery extra (rasterio, pyogrio, shapely): pip install 'smptrain[imagery]'")

import pandas as pd  # noqa: E402
import pyogrio  # noqa: E402
import rasterio  # noqa: E402
import shapely  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from rasterio.features import rasterize  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import transform as warp_transform  # noqa: E402
from rasterio.warp import transform_geom  # noqa: E402

from smptrain.core.errors import UserError  # noqa: E402
from smptrain.data.imagery import import_imagery  # noqa: E402

UTM = "EPSG:32608"
BANDS = ["blue", "green", "red", "nir"]


def write_scene(path: Path, raw: np.ndarray, origin=(500_000.0, 7_600_000.0), nodata=-9999.0, crs=UTM,
                names=BANDS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=raw.shape[2], height=raw.shape[1], count=raw.shape[0],
                       dtype=raw.dtype, crs=crs, transform=from_origin(*origin, 3.0, 3.0), nodata=nodata) as out:
        out.write(raw)
        out.descriptions = names
    return path


def write_polygons(path: Path, geometries, crs="EPSG:4326", images=None) -> Path:
    fields, names = ([np.array(images, dtype=object)], ["image"]) if images else ([], [])
    pyogrio.raw.write(str(path), np.array([shapely.to_wkb(g) for g in geometries], dtype=object), fields, fields=names,
                      driver="GPKG", geometry_type="Polygon", crs=crs)
    return path


def reflectance(rng, height, width) -> np.ndarray:
    return rng.uniform(-0.1, 0.5, (4, height, width)).astype(np.float32)


@pytest.fixture
def scenes(tmp_path):
    """Two georeferenced scenes (one with a no-data strip) and slump outlines kept in WGS 84."""
    rng = np.random.default_rng(0)
    first, second = reflectance(rng, 70, 90), reflectance(rng, 50, 64)
    second[:, :, :5] = -9999  # no data along the west edge
    paths = [write_scene(tmp_path / "scenes" / "north" / "a.tif", first),
             write_scene(tmp_path / "scenes" / "south" / "b.tif", second, origin=(520_000.0, 7_600_000.0))]
    boxes_utm = [shapely.box(500_030, 7_599_850, 500_090, 7_599_930), shapely.box(520_060, 7_599_880, 520_120, 7_599_960)]
    outlines = [shapely.geometry.shape(transform_geom(UTM, "EPSG:4326", shapely.geometry.mapping(b))) for b in boxes_utm]
    return tmp_path, paths, write_polygons(tmp_path / "outlines.gpkg", outlines), boxes_utm


def expected_labels(path: Path, boxes_utm, erode: int = 0) -> np.ndarray:
    """The labels an image should get, computed here from the polygons (in its CRS) and its no-data mask."""
    from scipy.ndimage import binary_dilation

    with rasterio.open(path) as source:
        labels = rasterize([(b, 1) for b in boxes_utm], out_shape=(source.height, source.width),
                           transform=source.transform, fill=0, dtype="uint8")
        invalid = (source.read_masks() == 0).any(0)
    if erode and invalid.any():
        invalid = binary_dilation(invalid, iterations=erode)
    labels[invalid] = 2
    return labels


def test_geotiffs_with_polygons_give_the_patches_the_tiling_says_pixel_by_pixel(scenes):
    tmp, paths, outlines, boxes = scenes
    done = import_imagery(tmp / "data", tmp / "scenes", polygons=outlines, patch_size=32, overlap=8, erode=1,
                          say=lambda line: None)
    metadata = pd.read_parquet(tmp / "data" / "metadata.parquet")
    group = zarr.open_group(str(tmp / "data" / "data.zarr"), mode="r")
    x, y = group["x"][:], group["y"][:]
    assert group["x"].chunks == (1, 1, 32, 32) and group["y"].chunks == (1, 32, 32) and y.dtype == np.uint8
    assert list(metadata.index) == list(range(len(metadata))) == list(range(done.patches)) and len(x) == done.patches
    assert {"sample_id", "region", "empty", "patch_id", "x", "y", "patch_idx_x", "patch_idx_y"} <= set(metadata)
    darts = tomllib.loads((tmp / "data" / "config.toml").read_text())["darts"]
    assert darts["bands"] == BANDS and darts["patch_size"] == 32 and darts["overlap"] == 8
    factor, offset = darts["band_factors"][0], darts["band_offsets"][0]
    assert (factor, offset) == pytest.approx((1 / 0.6, 0.1 / 0.6))  # DARTS' band table for reflectance
    for path in paths:
        rows = metadata[metadata["sample_id"] == path.stem]
        assert set(rows["region"]) == {path.parent.name}
        with rasterio.open(path) as source:
            raw, transform, height, width = source.read(), source.transform, source.height, source.width
            valid = (source.read_masks() > 0).all(0)
        labels = expected_labels(path, boxes, erode=1)
        inputs = np.clip(raw * factor + offset, 0, 1)
        inputs[:, ~valid] = 0
        covered = np.zeros((height, width), bool)
        for row, meta in rows.iterrows():
            top, left = meta["y"], meta["x"]
            assert top + 32 <= height and left + 32 <= width  # the last row and column moved inward
            np.testing.assert_allclose(x[row], inputs[:, top:top + 32, left:left + 32], rtol=1e-6, atol=1e-7)
            want = labels[top:top + 32, left:left + 32].copy()
            want[covered[top:top + 32, left:left + 32]] = 2  # each pixel scored once
            covered[top:top + 32, left:left + 32] = True
            np.testing.assert_array_equal(y[row], want)
            assert meta["empty"] == (not (want == 1).any())
            box = [(transform.c + 3 * c, transform.f - 3 * r) for c, r in ((left, top), (left + 32, top),
                                                                          (left + 32, top + 32), (left, top + 32))]
            lon, lat = warp_transform(UTM, "EPSG:4326", *zip(*box))  # DARTS' footprints: in WGS 84
            corners = shapely.get_coordinates(shapely.from_wkb(meta["geometry"]))[:4]
            np.testing.assert_allclose(corners, np.column_stack([lon, lat]), rtol=0, atol=1e-9)
        assert covered.all()  # every pixel lies in some patch
    geo = json.loads(__import__("pyarrow.parquet").parquet.read_schema(tmp / "data" / "metadata.parquet").metadata[b"geo"])
    assert rasterio.crs.CRS.from_user_input(geo["columns"]["geometry"]["crs"]) == rasterio.crs.CRS.from_epsg(4326)
    from smptrain.data.darts import open_dataset

    info = open_dataset(tmp / "data")
    assert info.bands == tuple(BANDS) and info.num_rows == done.patches


def test_pngs_with_masks_and_no_georeference(tmp_path):
    """8-bit images without a CRS and their masks with JPEG-like noise: positives above 127, an ignore value, an
    image smaller than a patch padded (the padding ignored), outlines in pixel coordinates without a CRS, regions
    and the held-out images from a table."""
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    sizes = {"one": (40, 52), "two": (20, 28)}
    for name, (height, width) in sizes.items():
        image = rng.integers(0, 256, (3, height, width), dtype=np.uint8)
        mask = rng.integers(0, 9, (height, width), dtype=np.uint8)  # noise around 0
        mask[5:15, 5:15] = rng.integers(246, 256, (10, 10))  # a slump, noise around 255
        mask[0, :] = 200 if name == "one" else mask[0, :]
        for path, values in ((tmp_path / "images" / f"{name}.png", image), (tmp_path / "masks" / f"{name}_mask.png",
                                                                           mask[None])):
            with rasterio.open(path, "w", driver="PNG", width=width, height=height, count=len(values),
                               dtype="uint8") as out:
                out.write(values)
    table = tmp_path / "table.csv"
    table.write_text("image,region,test\none.png,East,0\ntwo.png,West,1\n")
    done = import_imagery(tmp_path / "data", tmp_path / "images", masks=tmp_path / "masks", mask_suffix="_mask",
                          ignore_value=200, patch_size=32, bands=["red", "green", "blue"], regions=table,
                          heldout_column="test", say=lambda line: None)
    metadata = pd.read_parquet(tmp_path / "data" / "metadata.parquet")
    y = zarr.open_group(str(tmp_path / "data" / "data.zarr"), mode="r")["y"][:]
    assert dict(zip(metadata["sample_id"], metadata["region"])) == {"one": "East", "two": "West"}
    assert (tmp_path / "data" / "heldout.txt").read_text() == "two\n" and done.heldout == ["two"]
    small = y[metadata.index[metadata["sample_id"] == "two"][0]]
    assert (small[20:, :] == 2).all() and (small[:, 28:] == 2).all()  # padding ignored
    assert (small[5:15, 5:15] == 1).all() and ((small[:20, :28] == 1).sum() == 100)  # only the slump, not the noise
    first = y[metadata.index[(metadata["sample_id"] == "one") & (metadata["x"] == 0) & (metadata["y"] == 0)][0]]
    assert (first[0, :] == 2).all()  # the ignore value
    darts = tomllib.loads((tmp_path / "data" / "config.toml").read_text())["darts"]
    assert darts["band_factors"] == [1 / 255] * 3 and darts["band_offsets"] == [0.0] * 3  # 8-bit data
    box = shapely.from_wkb(metadata.loc[metadata.index[0], "geometry"]).bounds
    assert box == (0, 0, 32, 32)  # pixel coordinates
    schema = __import__("pyarrow.parquet").parquet.read_schema(tmp_path / "data" / "metadata.parquet")
    assert json.loads(schema.metadata[b"geo"])["columns"]["geometry"]["crs"] is None


def test_a_held_out_file_reaches_the_splits(tmp_path):
    from smptrain.config import load_config
    from smptrain.data.splits import make_splits

    metadata = pd.DataFrame({"sample_id": ["a", "a", "b", "c"], "region": ["r"] * 4, "empty": [True] * 4})
    (tmp_path / "heldout.txt").write_text("# held out\nb\nc\n")
    cfg = load_config(None, [f"data.dir='{tmp_path}'", "data.split_method='sample'", "data.split_by=['@heldout.txt']",
                             "data.fold_method='none'"])
    assert make_splits(metadata, cfg.data, 42)["test"] == [2, 3]
    missing = load_config(None, [f"data.dir='{tmp_path}'", "data.split_method='sample'", "data.split_by=['@gone.txt']"])
    with pytest.raises(UserError, match="gone.txt"):
        make_splits(metadata, missing.data, 42)


def test_appending_keeps_every_earlier_row_and_other_bands_are_refused(scenes):
    tmp, paths, outlines, _ = scenes
    import_imagery(tmp / "data", paths[0].parent, polygons=outlines, patch_size=32, say=lambda line: None)
    before = pd.read_parquet(tmp / "data" / "metadata.parquet")
    x_before = zarr.open_group(str(tmp / "data" / "data.zarr"), mode="r")["x"][:]
    with pytest.raises(UserError, match="already exists; add to it with --append"):
        import_imagery(tmp / "data", paths[1].parent, polygons=outlines, patch_size=32, say=lambda line: None)
    import_imagery(tmp / "data", paths[1].parent, polygons=outlines, patch_size=32, append=True, say=lambda line: None)
    after = pd.read_parquet(tmp / "data" / "metadata.parquet")
    x_after = zarr.open_group(str(tmp / "data" / "data.zarr"), mode="r")["x"][:]
    assert len(after) > len(before) and list(after.index) == list(range(len(after)))
    pd.testing.assert_frame_equal(after.iloc[:len(before)], before)
    np.testing.assert_array_equal(x_after[:len(before)], x_before)
    with pytest.raises(UserError, match="patch_size"):
        import_imagery(tmp / "data", paths[1].parent, polygons=outlines, patch_size=64, append=True,
                       say=lambda line: None)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp / "data" / "metadata.parquet"), after)  # refused: unchanged
    assert not list(tmp.glob(".data.*"))  # no half-written dataset left beside it
    zone9 = write_scene(tmp / "zone9" / "c.tif", reflectance(np.random.default_rng(4), 40, 40), crs="EPSG:32609")
    import_imagery(tmp / "data", zone9.parent, polygons=outlines, patch_size=32, append=True, say=lambda line: None)
    more = pd.read_parquet(tmp / "data" / "metadata.parquet")  # another UTM zone: the footprints are in degrees
    lon = shapely.get_coordinates(shapely.from_wkb(more[more["sample_id"] == "c"]["geometry"]))[:, 0]
    assert len(more) > len(after) and (abs(lon + 129) < 1).all()  # zone 9's central meridian is 129 W


@pytest.mark.parametrize("case, words", [
    ("mixed CRS", ["is in no CRS", "import them apart"]),
    ("mask size", ["a mask must be on its image's grid"]),
    ("same names", ["have the same name 'a'"]),
    ("no labels", ["either as mask rasters (--masks DIR) or as polygons (--labels FILE)"]),
])
def test_a_bad_import_is_one_sentence_and_writes_nothing(scenes, case, words):
    from helpers import run

    tmp, paths, outlines, _ = scenes
    args = ["smptrain-import", str(tmp / "data"), "--images", str(tmp / "scenes"), "--labels", str(outlines),
            "--patch-size", "32"]
    if case == "mixed CRS":
        write_scene(tmp / "scenes" / "east" / "c.tif", reflectance(np.random.default_rng(2), 40, 40), crs=None)
    elif case == "mask size":
        (tmp / "masks").mkdir()
        for path in paths:
            with rasterio.open(tmp / "masks" / f"{path.stem}.png", "w", driver="PNG", width=10, height=10, count=1,
                               dtype="uint8") as out:
                out.write(np.zeros((1, 10, 10), np.uint8))
        args[4:6] = ["--masks", str(tmp / "masks")]
    elif case == "same names":
        write_scene(tmp / "scenes" / "east" / "a.tif", reflectance(np.random.default_rng(3), 40, 40))
    else:
        del args[4:6]
    result = run(args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all(w in result.stderr for w in words), result.stderr
    assert not (tmp / "data").exists() and not list(tmp.glob(".data.*"))


# --- out: a GeoTIFF scene predicted ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A converted model of 3 bands and a GeoTIFF scene of 150 x 230 pixels whose bands are named in another order,
    with a no-data block."""
    from test_export import converted_file

    tmp = tmp_path_factory.mktemp("scene")
    torch.manual_seed(0)  # the untrained weights: with this seed the scene has positives and outlines to compare
    converted = converted_file(tmp, "Unet", "resnet18")
    raw = np.random.default_rng(0).uniform(0, 3000, (3, 150, 230)).astype(np.float32)
    raw[:, 10:20, 30:60] = 0
    path = write_scene(tmp / "scene.tif", raw, nodata=0, names=["blue", "red", "green"])
    return tmp, converted, path, raw


@pytest.mark.parametrize("batch_size, reflection", [(3, 0), (40, 0), (3, 5)])
def test_a_scene_is_predicted_as_predict_in_patches_predicts_its_array(scene, batch_size, reflection):
    """In stripes, with the scene's bands matched to the model's by name: the probabilities equal predict_in_patches'
    on the whole array bit for bit (batches of 3 and of 40 patches: the NaN rule depends on them; a wider reflected
    margin), on the scene's
    CRS and grid, NaN where it has no data; the mask and the outlines (whose union is the mask) beside."""
    from smptrain.export.predict import load_converted, normalise, predict_in_patches
    from smptrain.export.scene import predict_scene

    tmp, converted, path, raw = scene
    out = tmp / f"p{batch_size}-{reflection}"
    done = predict_scene(converted, path, out.with_suffix(".tif"), mask=str(out) + "-mask.tif",
                         polygons=str(out) + ".gpkg", patch_size=64, overlap=8, batch_size=batch_size,
                         reflection=reflection)
    model, config = load_converted(converted)
    ordered = raw[[1, 2, 0]]  # red, green, blue: the model's order
    array = normalise(np.where(ordered == 0, np.nan, ordered), config["bands"])[None]
    expected = predict_in_patches(model, array, 64, 8, batch_size=batch_size, reflection=reflection)[0].numpy()
    with rasterio.open(out.with_suffix(".tif")) as source, rasterio.open(path) as original:
        probabilities = source.read(1)
        assert source.crs == original.crs and source.transform == original.transform
        assert source.dtypes[0] == "float32" and np.isnan(source.nodata)
    nodata = (raw == 0).all(0)
    assert np.isnan(probabilities[nodata]).all() and not np.isnan(probabilities[~nodata]).any()
    np.testing.assert_array_equal(probabilities[~nodata], expected[~nodata])
    with rasterio.open(str(out) + "-mask.tif") as source:
        mask, transform = source.read(1), source.transform
    np.testing.assert_array_equal(mask, np.where(nodata, 255, expected > 0.5))
    meta, _, wkb, fields = pyogrio.raw.read(str(out) + ".gpkg")
    outlines = shapely.from_wkb(wkb)
    assert rasterio.crs.CRS.from_user_input(meta["crs"]) == rasterio.crs.CRS.from_string(UTM)
    assert len(outlines) == done.outlines > 0
    burned = rasterize([(g, 1) for g in outlines], out_shape=mask.shape, transform=transform, fill=0, dtype="uint8")
    np.testing.assert_array_equal(burned == 1, mask == 1)  # the polygons' union is the mask
    area, mean, pixels = fields
    assert area == pytest.approx(pixels * 9.0)  # 3 m pixels
    assert (mean * pixels).sum() / pixels.sum() == pytest.approx(float(probabilities[mask == 1].mean()), rel=1e-6)


def test_a_scene_is_predicted_with_the_onnx_file_too(scene):
    pytest.importorskip("onnxruntime")
    import torch

    from smptrain.export.onnx import export_onnx
    from smptrain.export.scene import predict_scene

    tmp, converted, path, _ = scene
    file = torch.load(converted, weights_only=True)
    export_onnx(file["config"]["model"], file["config"]["bands"], file["statedict"], {"patch_size": 64},
                tmp / "m.onnx", dynamic=True)
    predict_scene(converted, path, tmp / "torch.tif", patch_size=64, overlap=8)
    predict_scene(tmp / "m.onnx", path, tmp / "onnx.tif", onnx=True, patch_size=64, overlap=8)
    with rasterio.open(tmp / "torch.tif") as a, rasterio.open(tmp / "onnx.tif") as b:
        np.testing.assert_allclose(b.read(1), a.read(1), atol=1e-5)


def test_a_scene_without_the_models_bands_is_one_sentence(scene, tmp_path):
    from smptrain.export.scene import predict_scene

    _, converted, _, raw = scene
    other = write_scene(tmp_path / "two.tif", raw[:2], nodata=0, names=["nir", "swir"])
    with pytest.raises(UserError, match="has 2 band.*the model takes 3"):
        predict_scene(converted, other, tmp_path / "out.tif", patch_size=64)
    assert not list(tmp_path.glob("*out*"))


def test_imported_imagery_trains_tests_converts_and_predicts_with_the_commands(tmp_path):
    """From a folder of scenes and their outlines to a predicted scene, with the commands a user types."""
    from helpers import run, tiny_config

    from smptrain.data.demo import make_imagery

    imagery = make_imagery(tmp_path / "imagery", scenes=6)
    done = run(["smptrain-import", str(tmp_path / "data"), "--images", str(imagery / "scenes"), "--labels",
                str(imagery / "outlines.gpkg"), "--patch-size", "64", "--heldout", str(imagery / "heldout.txt")],
               check=True)
    assert "held out" in done.stdout
    config = tiny_config(tmp_path, tmp_path / "data", data={"split_method": "sample", "split_by": ["@heldout.txt"],
                                                            "total_folds": 2},
                         train={"max_epochs": 1}, log={"run_name": "own", "preview_every_n_val": 0})
    run(["python", "-m", "smptrain.train", "--config", str(config)], check=True)
    run_dir = tmp_path / "artifacts" / "own"
    splits = json.loads((run_dir / "splits.json").read_text())
    metadata = pd.read_parquet(tmp_path / "data" / "metadata.parquet")
    held = set((imagery / "heldout.txt").read_text().split())
    assert set(metadata.loc[splits["test"], "sample_id"]) == held
    run(["smptrain-test", str(run_dir)], check=True)
    run(["smptrain-convert", str(run_dir), "--out-dir", str(tmp_path / "models"), "--name", "own"], check=True)
    converted = next((tmp_path / "models").glob("own_*.ckpt"))
    scene_path = next((imagery / "scenes").rglob("*.tif"))
    predicted = run(["smptrain-predict", str(converted), str(scene_path), str(tmp_path / "p.tif"), "--mask",
                     str(tmp_path / "m.tif"), "--polygons", str(tmp_path / "o.gpkg")], check=True)
    assert "outline(s)" in predicted.stdout and (tmp_path / "o.gpkg").is_file()
    with rasterio.open(tmp_path / "p.tif") as out, rasterio.open(scene_path) as source:
        assert out.crs == source.crs and out.transform == source.transform and out.shape == source.shape
