"""``hx.tl.predict_slides``: a cohort of whole-slide images on a two-worker Dask LocalCluster, one slide broken."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import hespotex as hx
from hespotex.tl.prediction._cohort import output_paths, read_marker, slide_name

pytestmark = pytest.mark.usefixtures("single_threaded")

MPP = 1.0  # the trained_synthetic model was trained at 1 µm/px
SIZE = (2800, 2400)  # width, height: about 200-300 pseudo-spots of 100 µm spacing over the tissue of each


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three small pyramidal OME-TIFFs and one truncated copy (the header survives, the pixels do not)."""
    folder = tmp_path_factory.mktemp("slides")
    good = [
        hx.datasets.synthetic_wsi(folder / f"slide_{i}.ome.tif", width=SIZE[0], height=SIZE[1], microns_per_pixel=MPP,
                                  tile=256, seed=i, n_blobs=6)
        for i in range(3)
    ]  # fmt: skip
    data = good[0].read_bytes()
    broken = folder / "broken.ome.tif"
    broken.write_bytes(data[: len(data) // 2])
    return good, broken


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A LocalCluster of two worker processes with one thread each (as predict_slides starts by default)."""
    from distributed import Client

    from hespotex._cluster import local_cluster

    saved = os.environ.get("HESPOTEX_CACHE")
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"  # as left by any earlier dask nanny in this process
    os.environ["HESPOTEX_CACHE"] = str(
        tmp_path_factory.getbasetemp() / "hespotex-cache"
    )  # workers never touch ~/.cache
    with (
        local_cluster(2) as cluster,
        Client(cluster) as c,
    ):
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is put back
        yield c
    if trim is None:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    else:
        os.environ["MALLOC_TRIM_THRESHOLD_"] = trim
    if saved is None:
        os.environ.pop("HESPOTEX_CACHE", None)
    else:
        os.environ["HESPOTEX_CACHE"] = saved


def test_workers_start_without_the_memory_trim_threshold(client):
    """dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 (every tensor a fresh mmap); hespotex's clusters drop it."""
    import dask

    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]  # dask's default is set
    seen = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
    assert len(seen) == 2
    assert set(seen.values()) == {(None, "1")}  # the trim threshold gone, the nanny's other variables kept


@pytest.fixture(scope="module")
def first_run(slides, client, trained_synthetic, tmp_path_factory):
    good, broken = slides
    out = tmp_path_factory.mktemp("cohort") / "out"
    table = hx.tl.predict_slides(
        [*good, broken], trained_synthetic["model_dir"], out=out, client=client, progress=False
    )
    return table, out


def test_broken_slide_is_reported_and_the_others_finish(first_run, trained_synthetic):
    import spatialdata

    table, out = first_run
    assert list(table.columns[:6]) == ["slide", "status", "n_tiles", "seconds", "output", "error"]
    assert list(table["slide"]) == ["slide_0", "slide_1", "slide_2", "broken"]  # input order, names without .ome.tif
    row = table.set_index("slide").loc["broken"]
    assert row["status"] == "failed"
    assert "truncated" in row["error"] and "Traceback" in row["traceback"]
    assert output_paths(out, "broken")["error"].read_text().startswith(row["error"])
    assert (
        read_marker(out, "broken") is None and not output_paths(out, "broken")["done"].exists()
    )  # partial output never looks finished

    genes = trained_synthetic["model"].genes
    for name in ("slide_0", "slide_1", "slide_2"):
        r = table.set_index("slide").loc[name]
        assert r["status"] == "finished" and not isinstance(r["error"], str)
        assert 100 < r["n_tiles"] < 1000 and r["seconds"] > 0
        marker = read_marker(out, name)
        assert marker["n_tiles"] == r["n_tiles"] and marker["model_id"] == trained_synthetic["model"].model_id
        sdata = spatialdata.read_zarr(r["output"])
        pred = sdata.tables["hespotex"]
        assert pred.n_obs == r["n_tiles"] and list(pred.var_names) == list(genes)
        assert np.isfinite(np.asarray(pred.layers["hespotex"])).all()
    # different slides, different maps
    maps = [
        np.asarray(spatialdata.read_zarr(p).tables["hespotex"].layers["hespotex"]).mean(0) for p in table["output"][:2]
    ]
    assert not np.allclose(maps[0], maps[1])


def test_rerun_skips_finished_slides_on_a_default_local_cluster(first_run, slides, trained_synthetic):
    table, out = first_run
    good, broken = slides
    stamps = {n: output_paths(out, n)["done"].stat().st_mtime_ns for n in ("slide_0", "slide_1", "slide_2")}
    again = hx.tl.predict_slides(
        [*good, broken], trained_synthetic["model_dir"], out=out, progress=False
    )  # client=None
    status = dict(zip(again["slide"], again["status"], strict=True))
    assert status == {"slide_0": "skipped", "slide_1": "skipped", "slide_2": "skipped", "broken": "failed"}
    assert list(again["n_tiles"][:3]) == list(table["n_tiles"][:3])
    assert {n: output_paths(out, n)["done"].stat().st_mtime_ns for n in stamps} == stamps  # nothing redone


def test_other_slide_with_the_same_name_is_refused(first_run, slides, trained_synthetic, tmp_path):
    _, out = first_run
    good, _ = slides
    impostor = tmp_path / good[1].name
    shutil.copy(good[1], impostor)
    table = hx.tl.predict_slides([impostor], trained_synthetic["model_dir"], out=out, progress=False)
    assert table["status"].iat[0] == "failed" and "another slide" in table["error"].iat[0]
    assert read_marker(out, "slide_1")["source"] == str(good[1].resolve())  # the finished slide is untouched


def test_duplicate_names_are_refused_before_anything_runs(tmp_path, trained_synthetic):
    a, b = tmp_path / "x" / "s.svs", tmp_path / "y" / "s.tif"
    with pytest.raises(ValueError, match="distinct file names"):
        hx.tl.predict_slides([a, b], trained_synthetic["model_dir"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slide_names():
    assert slide_name("/a/TCGA-A1-A0SB-01Z-00-DX1.B34C267B.svs") == "TCGA-A1-A0SB-01Z-00-DX1.B34C267B"
    assert slide_name("slide.ome.tiff") == "slide"
    assert slide_name("tiles.zarr") == "tiles"
