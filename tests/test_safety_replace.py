"""What ``overwrite=True`` may replace outside hespotex's own folders: ``hx.io.write_zarr`` and ``hespotex tile
--overwrite`` replace a zarr store (any writer's) but never a user's folder; the synthetic slide writer's temporary
file is unique to each call, so two writers of one path do not collide."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import hespotex as hx
from hespotex.cli import main
from hespotex.datasets._synthetic_wsi import write_ome_tiff

pytestmark = pytest.mark.usefixtures("single_threaded")


def _sample(seed: int = 0, sample_id: str = "s"):
    return hx.datasets.synthetic(n_spots=30, n_genes=6, seed=seed, microns_per_pixel=1.0, sample_id=sample_id)


def _user_folder(path, *, with_zarr_json: bool = False):
    path.mkdir()
    (path / "thesis.docx").write_bytes(b"four years of work")
    (path / "figures").mkdir()
    (path / "figures" / "fig1.png").write_bytes(b"\x89PNG")
    if with_zarr_json:  # e.g. a project folder that also holds the root metadata of a zarr group
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return path


def _intact(path) -> bool:
    return (path / "thesis.docx").read_bytes() == b"four years of work" and (path / "figures" / "fig1.png").exists()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return hx.datasets.synthetic_wsi(
        tmp_path_factory.mktemp("slide") / "small.ome.tif", width=1200, height=1000, n_blobs=3,
        microns_per_pixel=1.0, tile=256, seed=2,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- hx.io.write_zarr
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("with_zarr_json", [False, True])
def test_write_zarr_never_replaces_a_user_folder(tmp_path, overwrite, with_zarr_json):
    folder = _user_folder(tmp_path / "project", with_zarr_json=with_zarr_json)
    found = "a zarr store that also holds 2 entries" if with_zarr_json else "a folder that is not a zarr store"
    with pytest.raises(FileExistsError, match=rf"Expected a zarr store \(or nothing\) at '.*project'; found {found}"):
        hx.io.write_zarr(_sample(), folder, overwrite=overwrite)
    assert _intact(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_write_zarr_never_replaces_a_file(tmp_path):
    path = tmp_path / "notes.zarr"
    path.write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.zarr' is a file, not a zarr store"):
        hx.io.write_zarr(_sample(), path, overwrite=True)
    assert path.read_text() == "mine"


def test_write_zarr_replaces_a_store_spatialdata_wrote(tmp_path):
    path = tmp_path / "other.zarr"
    _sample(1, "first").write(path)  # written by spatialdata itself, no hespotex marker
    with pytest.raises(FileExistsError, match="already exists"):
        hx.io.write_zarr(_sample(2, "second"), path)
    hx.io.write_zarr(_sample(2, "second"), path, overwrite=True)
    back = hx.io.read_zarr(path)
    assert "second_image" in back.images and "first_image" not in back.images


def test_write_zarr_into_an_empty_folder(tmp_path):
    path = tmp_path / "empty.zarr"
    path.mkdir()
    hx.io.write_zarr(_sample(), path, overwrite=True)
    assert hx.io.read_zarr(path).tables["table"].n_obs == 30


def _files(path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name: content), to compare a store before and after."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _unwritable(seed: int, sample_id: str):
    """A sample whose table cannot be written (an ``uns`` value anndata has no writer for): spatialdata fails
    after the image and the spots are written, in the middle of the store."""
    sdata = _sample(seed, sample_id)
    sdata.tables["table"].uns["not_writable"] = object()
    return sdata


def _spy_writes(monkeypatch) -> list:
    """Record the paths spatialdata's writer is given (the real writer runs)."""
    from spatialdata import SpatialData

    targets, real = [], SpatialData.write

    def spy(self, file_path, *args, **kwargs):
        targets.append(Path(file_path))
        return real(self, file_path, *args, **kwargs)

    monkeypatch.setattr(SpatialData, "write", spy)
    return targets


def test_write_zarr_failing_mid_replacement_keeps_the_old_store(tmp_path, monkeypatch):
    path = tmp_path / "sample.zarr"
    hx.io.write_zarr(_sample(1, "first"), path)
    before = _files(path)
    targets = _spy_writes(monkeypatch)
    broken = _unwritable(2, "second")
    with pytest.raises(Exception, match="No method registered for writing"):
        hx.io.write_zarr(broken, path, overwrite=True)
    # written beside under a name of its own, never into the old store; removed after the failure
    assert len(targets) == 1 and targets[0].parent == tmp_path and targets[0].name.startswith(".sample.zarr.")
    assert not targets[0].exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]
    assert _files(path) == before  # every file of the old store, byte for byte
    back = hx.io.read_zarr(path)
    assert "first_image" in back.images and "second_image" not in back.images
    assert back.tables["table"].n_obs == 30 and broken.path is None  # the failed sample is not bound to the temp
    # a new path: a failed write leaves nothing there (not a half-written store)
    with pytest.raises(Exception, match="No method registered for writing"):
        hx.io.write_zarr(broken, tmp_path / "new.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]


def test_write_zarr_replacement_lands_at_the_path(tmp_path, monkeypatch):
    path = tmp_path / "sample.zarr"
    hx.io.write_zarr(_sample(1, "first"), path)
    targets = _spy_writes(monkeypatch)
    second = _sample(2, "second")
    hx.io.write_zarr(second, path, overwrite=True)
    assert targets[0] != path and targets[0].parent == tmp_path  # written beside, then moved into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]  # no temporary or old store left
    assert second.path == path  # as spatialdata's own write leaves it: the path written, not the temporary one
    back = hx.io.read_zarr(path)
    assert "second_image" in back.images and "first_image" not in back.images
    written, given = (t.tables["table"].X for t in (back, second))
    np.testing.assert_array_equal(written.toarray(), given.toarray())  # the synthetic counts are sparse


def test_write_zarr_refuses_the_store_the_sample_reads_from(tmp_path):
    path = tmp_path / "sample.zarr"
    hx.io.write_zarr(_sample(1, "first"), path)
    before = _files(path)
    lazy = hx.io.read_zarr(path)  # its image is read lazily from the store
    with pytest.raises(ValueError, match=r"is the store this SpatialData was read from"):
        hx.io.write_zarr(lazy, path, overwrite=True)
    assert _files(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]
    assert np.asarray(lazy.images["first_image"].data[:, :8, :8]).size  # still readable


# ---------------------------------------------------------------------------------------------- hespotex tile
def test_tile_overwrite_refuses_a_user_folder_before_the_work(tmp_path, slide, caplog):
    folder = _user_folder(tmp_path / "project")
    args = ["tile", "--spot-diameter", "55", "--spacing", "100", "--overwrite", "--out", str(folder), str(slide)]
    assert main(args) == 2
    assert "not a zarr store" in caplog.text and "thesis.docx" in caplog.text and "--overwrite or not" in caplog.text
    assert _intact(folder) and sorted(p.name for p in folder.iterdir()) == ["figures", "thesis.docx"]
    # a store written by an earlier `hespotex tile` is replaced with --overwrite
    out = tmp_path / "tiles.zarr"
    tile = ["tile", "--spot-diameter", "55", "--out", str(out), str(slide), "--spacing"]
    assert main([*tile, "100"]) == 0
    assert main([*tile, "150"]) == 2
    n100 = hx.io.read_zarr(out, validate=False).tables["table"].n_obs  # a tile store records the slide, not the image
    assert main([*tile, "150", "--overwrite"]) == 0
    assert 0 < hx.io.read_zarr(out, validate=False).tables["table"].n_obs < n100


# ---------------------------------------------------------------------------------------------- write_ome_tiff
def test_two_concurrent_writers_of_one_slide_do_not_collide(tmp_path):
    """Both writers are inside their TIFF at once (a barrier in the tile callback); each finishes, and the file is
    the whole slide of one of them."""
    import tifffile

    path = tmp_path / "slide.ome.tif"
    barrier = threading.Barrier(2, timeout=60)
    errors: list[BaseException] = []

    def writer(value: int) -> None:
        first = [True]

        def tiles(level: int, row: int, col: int) -> np.ndarray:
            if first[0]:
                first[0] = False
                barrier.wait()  # the other writer has its temporary file open too
            return np.full((64, 64, 3), value, dtype=np.uint8)

        try:
            write_ome_tiff(path, tiles, (256, 192), microns_per_pixel=1.0, tile=64, compression="zlib", overwrite=True)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(v,)) for v in (40, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with tifffile.TiffFile(path) as tif:
        image = tif.series[0].levels[0].asarray()
        levels = [lvl.asarray() for lvl in tif.series[0].levels]
    assert image.shape == (256, 192, 3) and len(np.unique(image)) == 1 and int(image.flat[0]) in (40, 200)
    assert all((lvl == image.flat[0]).all() for lvl in levels)  # every level from the same writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.ome.tif"]  # no temporary file left


# ---------------------------------------------------------------------------------------------- hx.io.write_*
@pytest.mark.parametrize(
    ("writer", "name", "old_temporary"),
    [
        ("write_csv", "pred.csv", ".pred.csv.partial.csv"),
        ("write_png", "pred.png", ".pred.png.partial.png"),
        ("write_geojson", "pred.geojson", ".pred.geojson.partial"),
        ("write_ome_tiff", "pred.ome.tif", ".pred.ome.tif.partial"),
    ],
)
def test_exports_write_through_a_temporary_name_unique_to_the_call(trained_synthetic, tmp_path, writer, name,
                                                                   old_temporary):  # fmt: skip
    """A user's file named like the fixed temporary file the writers used is neither overwritten nor deleted."""
    mine = tmp_path / old_temporary
    mine.write_bytes(b"a user's file")
    sdata = trained_synthetic["test"]
    options = {"genes": trained_synthetic["model"].genes[:2]}
    if writer == "write_ome_tiff":  # an in-memory slide: its size is given
        image = next(iter(sdata.images.values()))
        image = image["scale0"].ds[next(iter(image["scale0"].ds.data_vars))] if hasattr(image, "children") else image
        options["image_shape"] = (image.sizes["y"], image.sizes["x"])
    out = getattr(hx.io, writer)(sdata, tmp_path / name, **options)
    assert out == tmp_path / name and out.stat().st_size > 0
    assert mine.read_bytes() == b"a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, old_temporary])  # no temporary left
