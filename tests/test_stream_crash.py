"""Crash-safe completion: a streamed prediction (and a cohort slide) killed at any write or delete of its
commit and clean-up gives, on rerun, exactly the uninterrupted result, and is never reported finished before."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

import hespotex as hx
from hespotex.tl.prediction import _cohort, _stream_stages, _stream_store

pytestmark = pytest.mark.usefixtures("single_threaded")
N_SPOTS, CHUNK = 150, 64


class Crash(BaseException):
    """A simulated kill: not an Exception, so no ``except Exception`` of the code under test catches it."""


class CrashAt:
    """Counts the real write / delete primitives once the stages are done (the commit and clean-up) and
    raises :class:`Crash` just before the ``k``-th one (so the state is the one a kill between the
    ``k-1``-th and the ``k``-th leaves; killed after the last one is the finished run).

    Counted: zarr group deletions and attribute writes, zarr metadata consolidation, spatialdata element
    writes and deletions, and the cohort's completion-marker write; calls made inside a counted one (the
    many writes of one element) are part of it. A kill inside an element write is tested apart.
    """

    def __init__(self, monkeypatch, k: int) -> None:
        import spatialdata
        import zarr

        self.k, self.calls, self.armed, self.depth = k, 0, False, 0
        real_stage = _stream_stages.expression_stage

        def stage(*args, **kwargs):
            out = real_stage(*args, **kwargs)
            self.armed = True
            return out

        monkeypatch.setattr(_stream_stages, "expression_stage", stage)
        for owner, name in [
            (zarr.Group, "__delitem__"),
            (zarr.Group, "update_attributes"),
            (zarr, "consolidate_metadata"),
            (spatialdata.SpatialData, "write_element"),
            (spatialdata.SpatialData, "delete_element_from_disk"),
            (_cohort, "write_json_atomic"),
        ]:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real):
        def run(*args, **kwargs):
            if not self.armed or self.depth:
                return real(*args, **kwargs)
            if self.calls == self.k:
                raise Crash(f"killed before write/delete {self.k}")
            self.calls += 1
            self.depth += 1
            try:
                return real(*args, **kwargs)
            finally:
                self.depth -= 1

        return run


def _layer(table, key="hespotex") -> np.ndarray:
    x = table.layers[key]
    return np.asarray(x.compute() if hasattr(x, "compute") else x)


def _same(table, ref) -> None:
    """Bit-identical predictions, latent and attention."""
    assert list(table.obs_names) == list(ref.obs_names) and list(table.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(_layer(table), _layer(ref))
    np.testing.assert_array_equal(np.asarray(table.obsm["X_hespotex"]), np.asarray(ref.obsm["X_hespotex"]))
    assert (table.obsp["hespotex_attention"] != ref.obsp["hespotex_attention"]).nnz == 0


def _committed_and_clean(out, key="hespotex") -> None:
    import spatialdata
    import zarr

    group = zarr.open_group(out, mode="r", use_consolidated=False)[_stream_store.PROGRESS_GROUP][key]
    assert group.attrs["complete"] and not list(group.array_keys()) and not list(group.group_keys())
    assert key in spatialdata.read_zarr(out).tables
    consolidated = zarr.open_group(out, mode="r").metadata.consolidated_metadata  # spatialdata keeps one: up to date
    entries = consolidated.flattened_metadata
    assert f"tables/{key}" in entries
    assert not [k for k in entries if k.startswith(f"{_stream_store.PROGRESS_GROUP}/{key}/")]
    assert entries[f"{_stream_store.PROGRESS_GROUP}/{key}"].attributes["complete"]


@pytest.fixture(scope="module")
def slide(trained_synthetic):
    """A slide embedded beforehand as the model's training slides were (the reruns below need no encoder)."""
    sdata = hx.datasets.synthetic(
        n_spots=N_SPOTS, n_genes=40, seed=11, program_seed=0, microns_per_pixel=1.0, sample_id="crash"
    )
    hx.pp.embed(sdata, encoder=trained_synthetic["encoder"], input_size=trained_synthetic["input_size"])
    return sdata


@pytest.fixture(scope="module")
def uninterrupted(slide, trained_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    table = hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    return table, out


@pytest.fixture(scope="module")
def before_commit(slide, trained_synthetic, tmp_path_factory):
    """A store whose every stage is done, killed at the first write of its commit."""
    out = tmp_path_factory.mktemp("base") / "base.zarr"
    with pytest.MonkeyPatch.context() as mp:
        CrashAt(mp, 0)
        with pytest.raises(Crash):
            hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    return out


def test_crash_at_every_commit_step_resumes_to_the_uninterrupted_result(
    slide, trained_synthetic, uninterrupted, before_commit, tmp_path, monkeypatch
):
    ref, _ = uninterrupted
    model = trained_synthetic["model"]
    k = 0
    while True:
        out = tmp_path / f"k{k}.zarr"
        shutil.copytree(before_commit, out)
        with monkeypatch.context() as mp:
            crash = CrashAt(mp, k)
            try:
                hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=out, chunk_size=CHUNK)
                crashed = False
            except Crash:
                crashed = True
        table = hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=out, chunk_size=CHUNK)
        _same(table, ref)
        _same(hx.io.read_zarr(out).tables["hespotex"], ref)
        _committed_and_clean(out)
        shutil.rmtree(out)
        if not crashed:  # k is past the last write / delete: the run above was whole
            assert crash.calls == k
            break
        k += 1
    assert k >= 7  # table write, commit, 4 progress deletions (stored embeddings: no embedding arrays), consolidation


def test_crash_inside_the_table_write_resumes_to_the_uninterrupted_result(
    slide, trained_synthetic, uninterrupted, before_commit, tmp_path, monkeypatch
):
    """Killed half-way through writing the table (its obs and var written, not its layers)."""
    import anndata.io
    import spatialdata._io.io_table as io_table
    import zarr

    out = tmp_path / "half.zarr"
    shutil.copytree(before_commit, out)
    real, calls = anndata.io.write_elem, []

    def write_elem(group, key, elem, *args, **kwargs):
        if key == "layers":
            calls.append(key)
            raise Crash("killed while writing the table's layers")
        return real(group, key, elem, *args, **kwargs)

    monkeypatch.setattr(
        io_table, "write_adata", lambda group, name, table, *a, **k: _partial_write(group, name, table, write_elem)
    )
    with pytest.raises(Crash):
        hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    monkeypatch.undo()
    assert calls and "hespotex" in zarr.open_group(out, mode="r", use_consolidated=False)["tables"]
    table = hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    _same(table, uninterrupted[0])
    _committed_and_clean(out)


def _partial_write(group, name, table, write_elem):
    """What anndata's write of ``table`` into ``group[name]`` leaves when killed at its layers."""
    sub = group.require_group(name)
    for key in ("obs", "var", "layers"):
        write_elem(sub, key, getattr(table, key) if key != "layers" else dict(table.layers))


def test_expression_deleted_before_its_done_markers_is_computed_again(
    slide, trained_synthetic, uninterrupted, before_commit, tmp_path
):
    """The state the old clean-up left when killed between its two deletions: the expression rows gone,
    their done markers still there. It used to be completed with all-zero predictions marked done."""
    import zarr

    out = tmp_path / "zeros.zarr"
    shutil.copytree(before_commit, out)
    group = zarr.open_group(out, mode="r+", use_consolidated=False)[_stream_store.PROGRESS_GROUP]["hespotex"]
    assert np.asarray(group["expression_done"][:]).all()
    del group["expression"]
    table = hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    assert np.abs(_layer(table)).sum() > 0
    _same(table, uninterrupted[0])


def test_a_block_whose_results_are_gone_is_predicted_again(
    slide, trained_synthetic, uninterrupted, before_commit, tmp_path
):
    import zarr

    out = tmp_path / "blocks.zarr"
    shutil.copytree(before_commit, out)
    group = zarr.open_group(out, mode="r+", use_consolidated=False)[_stream_store.PROGRESS_GROUP]["hespotex"]
    del group["blocks"]["1"]
    del group["expression"]
    table = hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    _same(table, uninterrupted[0])


def test_non_finite_predictions_are_an_error_and_never_marked_done(slide, trained_synthetic, tmp_path):
    import torch
    import zarr

    model = copy.deepcopy(trained_synthetic["model"])
    with torch.no_grad():
        model.module_.direct_head[-1].bias[3] = float("nan")
    out = tmp_path / "nan.zarr"
    with pytest.raises(ValueError, match=r"NaN or infinite at \d+ spots .*e\.g\. spot 0;"):
        hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=out, chunk_size=CHUNK)
    group = zarr.open_group(out, mode="r", use_consolidated=False)[_stream_store.PROGRESS_GROUP]["hespotex"]
    assert not group.attrs["complete"] and not np.asarray(group["expression_done"][:]).any()


# ---------------------------------------------------------------------------------------------- cohort
@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    return hx.datasets.synthetic_wsi(
        tmp_path_factory.mktemp("wsi") / "crashy.ome.tif", width=1800, height=1500, n_blobs=5,
        microns_per_pixel=1.0, tile=256, seed=4,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiles(wsi, trained_synthetic, tmp_path_factory):
    """The slide's pseudo-spots, embedded, in a tile store (as `hespotex tile` writes; the image stays in the file)."""
    from spatialdata import SpatialData

    sdata = hx.io.read_wsi(wsi)
    hx.pp.detect_tissue(sdata)
    hx.pp.tile(sdata, model=trained_synthetic["model_dir"])
    hx.pp.embed(sdata, encoder=trained_synthetic["encoder"], input_size=trained_synthetic["input_size"])
    attrs = {"hespotex_slide": {**dict(sdata.attrs.get("hespotex_slide", {})), "path": str(wsi)}}
    path = tmp_path_factory.mktemp("tiles") / "crashy.zarr"
    SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables), attrs=attrs).write(path)
    return path


@pytest.fixture(scope="module")
def cohort_reference(tiles, trained_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort_ref")
    record = _cohort.run_slide(tiles, trained_synthetic["model_dir"], out=out, raise_errors=True)
    assert record["status"] == "finished"
    return hx.io.read_zarr(out / "crashy.zarr").tables["hespotex"], out


def test_cohort_slide_killed_at_every_step_is_never_finished_early(
    tiles, trained_synthetic, cohort_reference, tmp_path, monkeypatch
):
    ref, _ = cohort_reference
    wsi = tiles  # the slide as given to the cohort: its tile store
    base = tmp_path / "base"
    with monkeypatch.context() as mp:
        CrashAt(mp, 0)
        with pytest.raises(Crash):
            _cohort.run_slide(wsi, trained_synthetic["model_dir"], out=base)
    assert _cohort.read_marker(base, "crashy") is None
    k, finished = 0, []
    while True:
        out = tmp_path / f"k{k}"
        shutil.copytree(base, out)
        with monkeypatch.context() as mp:
            crash = CrashAt(mp, k)
            try:
                _cohort.run_slide(wsi, trained_synthetic["model_dir"], out=out)
                crashed = False
            except Crash:
                crashed = True
        if _cohort.read_marker(out, "crashy") is not None:  # reported finished: the store holds the whole result
            finished.append(k)
            _same(hx.io.read_zarr(out / "crashy.zarr").tables["hespotex"], ref)
        record = _cohort.run_slide(wsi, trained_synthetic["model_dir"], out=out)
        assert record["status"] == ("skipped" if not crashed else "finished"), record["error"]
        assert _cohort.read_marker(out, "crashy") is not None
        _same(hx.io.read_zarr(out / "crashy.zarr").tables["hespotex"], ref)
        _committed_and_clean(out / "crashy.zarr")
        shutil.rmtree(out)
        if not crashed:
            assert crash.calls == k
            break
        k += 1
    assert k >= 8  # the stream's commit and clean-up, then the completion marker
    assert finished == [k]  # finished only once the last write, the completion marker, was done


def test_a_marker_beside_an_unfinished_store_does_not_count(tiles, trained_synthetic, cohort_reference, tmp_path):
    import zarr

    _, done = cohort_reference
    out = tmp_path / "out"
    shutil.copytree(done, out)
    assert _cohort.read_marker(out, "crashy") is not None
    group = zarr.open_group(out / "crashy.zarr", mode="r+", use_consolidated=False)[_stream_store.PROGRESS_GROUP][
        "hespotex"
    ]
    group.attrs["complete"] = False  # e.g. the store was replaced by an interrupted run after the marker was written
    assert _cohort.read_marker(out, "crashy") is None
    record = _cohort.run_slide(tiles, trained_synthetic["model_dir"], out=out)
    assert record["status"] == "finished"
