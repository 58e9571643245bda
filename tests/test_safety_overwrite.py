"""Writing safely: ``overwrite=True`` replaces only what hespotex wrote, other elements of a store are kept,
temporary paths are unique to the run, and folders are created with the user's umask."""

from __future__ import annotations

import contextlib
import copy
import os
import stat

import numpy as np
import pytest

import hespotex as hx
from hespotex import _ownership

pytestmark = pytest.mark.usefixtures("single_threaded")


def _slide(seed: int, sample_id: str, n_spots: int = 80):
    return hx.datasets.synthetic(
        n_spots=n_spots, n_genes=40, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=sample_id
    )


def _layer(table, key: str) -> np.ndarray:
    x = table.layers[key]
    return np.asarray(x.compute() if hasattr(x, "compute") else x)


def _user_folder(path):
    path.mkdir()
    (path / "thesis.docx").write_bytes(b"four years of work")
    (path / "figures").mkdir()
    (path / "figures" / "fig1.png").write_bytes(b"\x89PNG")
    return path


def _intact(path) -> bool:
    return (path / "thesis.docx").read_bytes() == b"four years of work" and (path / "figures" / "fig1.png").exists()


@contextlib.contextmanager
def _umask(mask: int):
    saved = os.umask(mask)
    try:
        yield
    finally:
        os.umask(saved)


def _modes(root):
    """Permission bits of every folder and file under ``root`` (and of ``root``)."""
    dirs, files = {stat.S_IMODE(root.stat().st_mode)}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirs |= {stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) for d in dirnames}
        files |= {stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) for f in filenames}
    return dirs, files


# ---------------------------------------------------------------------------------------------- predict(out=...)
@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_never_deletes_a_folder_it_did_not_write(trained_synthetic, tmp_path, overwrite):
    folder = _user_folder(tmp_path / "my_folder")
    with pytest.raises(
        FileExistsError, match=r"did not write \(no \.hespotex\.json marker\): 2 entries: figures/, thesis\.docx"
    ):
        hx.tl.predict(_slide(1, "s1"), trained_synthetic["model"], device="cpu", out=folder, overwrite=overwrite)
    assert _intact(folder)


def test_predict_never_replaces_another_spatialdata_store(trained_synthetic, tmp_path):
    other = tmp_path / "other_sample.zarr"
    hx.io.write_zarr(_slide(2, "other"), other)  # a SpatialData store with its image, not made by hx.tl.predict
    with pytest.raises(FileExistsError, match=r"other_sample\.zarr.*did not write.*never deletes or replaces it"):
        hx.tl.predict(_slide(1, "s1"), trained_synthetic["model"], device="cpu", out=other, overwrite=True)
    back = hx.io.read_zarr(other)
    assert "other_image" in back.images and back.tables["table"].n_obs == 80


@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_out_naming_a_file_is_refused(trained_synthetic, tmp_path, overwrite):
    path = tmp_path / "results.zarr"
    path.write_text("not a store")
    with pytest.raises(FileExistsError, match=r"results\.zarr' is a file, not a zarr store written by hx\.tl\.predict"):
        hx.tl.predict(_slide(1, "s1"), trained_synthetic["model"], device="cpu", out=path, overwrite=overwrite)
    assert path.read_text() == "not a store"


def test_second_slide_keeps_the_first_slide_table(trained_synthetic, tmp_path):
    model, out = trained_synthetic["model"], tmp_path / "cohort.zarr"
    a = hx.tl.predict(_slide(1, "slide_a"), model, device="cpu", out=out, key_added="a")
    first = _layer(a, "a")
    b = hx.tl.predict(_slide(2, "slide_b", n_spots=70), model, device="cpu", out=out, key_added="b", overwrite=True)
    import spatialdata

    back = spatialdata.read_zarr(out)
    assert set(back.tables) == {"a", "b"} and {"slide_a_spots", "slide_b_spots"} <= set(back.shapes)
    np.testing.assert_array_equal(np.asarray(back.tables["a"].layers["a"]), first)  # slide A untouched
    np.testing.assert_array_equal(np.asarray(back.tables["b"].layers["b"]), _layer(b, "b"))
    assert back.tables["b"].n_obs == 70
    # and A again with overwrite=True: only table "a" is replaced, B stays
    hx.tl.predict(_slide(1, "slide_a"), model, device="cpu", out=out, key_added="a", overwrite=True)
    back = spatialdata.read_zarr(out)
    assert set(back.tables) == {"a", "b"}
    np.testing.assert_array_equal(np.asarray(back.tables["a"].layers["a"]), first)
    np.testing.assert_array_equal(np.asarray(back.tables["b"].layers["b"]), _layer(b, "b"))


def test_another_slide_under_the_same_spot_name_is_refused_while_a_table_uses_them(trained_synthetic, tmp_path):
    model, out = trained_synthetic["model"], tmp_path / "clash.zarr"
    hx.tl.predict(_slide(1, "same"), model, device="cpu", out=out, key_added="a")
    with pytest.raises(FileExistsError, match=r"other spots named 'same_spots'.*annotated by its table\(s\) \['a'\]"):
        hx.tl.predict(_slide(5, "same"), model, device="cpu", out=out, key_added="b", overwrite=True)
    assert hx.io.read_zarr(out).tables["a"].n_obs == 80


def test_a_user_folder_named_like_the_temporary_store_is_left_alone(trained_synthetic, tmp_path):
    partial = _user_folder(tmp_path / "res.zarr.partial")
    hx.tl.predict(_slide(1, "s1"), trained_synthetic["model"], device="cpu", out=tmp_path / "res.zarr")
    assert _intact(partial)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.zarr", "res.zarr.partial"]  # no temporary left
    assert _ownership.owned(tmp_path / "res.zarr", "store")


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_prediction_store_has_the_user_umask(trained_synthetic, tmp_path, mask, dir_mode, file_mode):
    out = tmp_path / "perm.zarr"
    with _umask(mask):
        hx.tl.predict(_slide(1, "s1"), trained_synthetic["model"], device="cpu", out=out)
    assert _modes(out) == ({dir_mode}, {file_mode})


# ---------------------------------------------------------------------------------------------- model.save
@pytest.mark.parametrize("overwrite", [False, True])
def test_model_save_never_deletes_a_folder_it_did_not_write(trained_synthetic, tmp_path, overwrite):
    folder = _user_folder(tmp_path / "results")
    with pytest.raises(FileExistsError, match=r"results' is a folder that hespotex did not write.*thesis\.docx"):
        trained_synthetic["model"].save(folder, overwrite=overwrite)
    assert _intact(folder)
    path = tmp_path / "model.txt"
    path.write_text("mine")
    with pytest.raises(FileExistsError, match=r"is a file, not a hespotex model folder"):
        trained_synthetic["model"].save(path, overwrite=True)
    assert path.read_text() == "mine"


def test_model_save_replaces_only_model_folders(trained_synthetic, tmp_path):
    model = trained_synthetic["model"]
    path = model.save(tmp_path / "m")
    assert _ownership.owned(path, "model")
    with pytest.raises(FileExistsError, match="pass `overwrite=True`"):
        model.save(path)
    assert model.save(path, overwrite=True) == path
    assert hx.tl.HESpotEx.load(path).model_id == model.model_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old copy left
    legacy = tmp_path / "legacy"  # a model saved before markers existed: only its two files
    legacy.mkdir()
    for name in ("model.safetensors", "setup.json"):
        (legacy / name).write_bytes((path / name).read_bytes())
    model.save(legacy, overwrite=True)
    assert _ownership.owned(legacy, "model")
    store = tmp_path / "store.zarr"  # a prediction store of hespotex is not a model folder
    hx.tl.predict(_slide(1, "s1"), model, device="cpu", out=store)
    with pytest.raises(FileExistsError, match="a hespotex store folder, not a hespotex model folder"):
        model.save(store, overwrite=True)
    assert hx.io.read_zarr(store).tables["hespotex"].n_obs == 80


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_model_folder_has_the_user_umask(trained_synthetic, tmp_path, mask, dir_mode, file_mode):
    with _umask(mask):
        path = trained_synthetic["model"].save(tmp_path / "shared-model")
    assert _modes(path) == ({dir_mode}, {file_mode})


def test_ownership_temporary_names_are_unique(tmp_path):
    target = tmp_path / "x.zarr"
    names = {_ownership.temp_sibling(target) for _ in range(50)}
    assert len(names) == 50 and all(p.parent == tmp_path and p.name.startswith(".x.zarr.") for p in names)


def test_written_beside_moves_in_only_a_whole_folder(tmp_path):
    """What `hx.io.write_zarr` and `hx.pp.embed(out=)` replace through: a failure keeps the old folder; a folder that
    appeared meanwhile is never replaced by a writer that was not told to replace; a success lands at the path."""
    target = tmp_path / "x.zarr"
    target.mkdir()
    (target / "zarr.json").write_text("old")
    with pytest.raises(RuntimeError, match="half way"), _ownership.written_beside(target, replace=True) as tmp:
        (tmp / "zarr.json").write_text("new")
        raise RuntimeError("half way")
    assert (target / "zarr.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr"]
    with _ownership.written_beside(target, replace=True) as tmp:
        (tmp / "zarr.json").write_text("new")
    assert (target / "zarr.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr"]
    fresh = tmp_path / "y"
    with pytest.raises(OSError), _ownership.written_beside(fresh, replace=False) as tmp:
        (tmp / "mine").write_text("written")
        _user_folder(fresh)  # another writer's (or the user's) folder appeared while this one was written
    assert _intact(fresh) and sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr", "y"]


def test_cohort_folder_gets_the_marker_and_keeps_foreign_files(tmp_path):
    from hespotex.tl.prediction._cohort_records import prepare_out, unlink_record

    new = tmp_path / "cohort"
    prepare_out(new)
    assert _ownership.owned(new, "cohort")
    busy = _user_folder(tmp_path / "busy")
    prepare_out(busy)  # a cohort may write into a folder with other files: they are only added to
    assert _ownership.marker(busy) is None and _intact(busy)
    (busy / "slide.done.json").write_text("my notes")  # a file that merely has a marker's name is never deleted
    with pytest.raises(FileExistsError, match="not a completion marker written by hespotex"):
        unlink_record(busy / "slide.done.json")
    assert (busy / "slide.done.json").read_text() == "my notes"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; expected a folder"):
        prepare_out(f)


def test_a_refused_save_leaves_nothing_behind(trained_synthetic, tmp_path):
    model = copy.deepcopy(trained_synthetic["model"])
    folder = _user_folder(tmp_path / "r")
    with pytest.raises(FileExistsError):
        model.save(folder, overwrite=True)
    assert model.model_id == trained_synthetic["model"].model_id
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
