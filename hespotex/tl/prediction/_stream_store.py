"""The output store of a streamed prediction: where it goes (``out``), the progress group that makes a run
resumable (``hespotex_progress/{key_added}``), what identifies a slide's results, the commit and the clean-up
after it, and reading the finished table back (see :mod:`hespotex.tl.prediction._stream`)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._sample import get_sample_info, spot_centres
from hespotex.tl.prediction._tables import recorded_params

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


logger = logging.getLogger("hespotex")


PROGRESS_GROUP = "hespotex_progress"


def slide_identity(table: AnnData, sample_id: str, plan: Any) -> dict[str, Any]:
    """What makes results belong to this slide: sample id, the spots (names and centres) and the image pixels."""
    from hespotex.pp._embed import image_fingerprint

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(spot_centres(table)).tobytes())
    h.update("\n".join(map(str, table.obs_names)).encode())
    return {
        "sample_id": str(sample_id),
        "n_spots": int(table.n_obs),
        "spots": h.hexdigest()[:16],
        "image": image_fingerprint(plan)[:16] if plan is not None else None,
    }


def _describe(slide: dict[str, Any]) -> str:
    return f"sample {slide.get('sample_id')!r}, {slide.get('n_spots')} spots"


def resolve_out(sdata: SpatialData, out: str | Path) -> tuple[Path, bool]:
    """The output path and whether it is the sample's own zarr store."""
    own_path = getattr(sdata, "path", None)
    if isinstance(out, str) and out == "auto":
        if own_path is None:
            msg = (
                "out='auto' writes into the sample's own zarr store, but this SpatialData is not backed by one "
                "(sdata.path is None). Write it first (hx.io.write_zarr) and read it back, or pass a path as `out`."
            )
            raise ValueError(msg)
        return Path(own_path), True
    path = Path(out)
    own = own_path is not None and path.resolve() == Path(own_path).resolve()
    return path, own


def _check_existing(group: Any, path: Path, *, key: str, slide: dict[str, Any], model_id: str) -> str | None:
    """Why the progress in ``group`` cannot be resumed (another slide or model), or ``None``."""
    stored = dict(group.attrs)
    if stored.get("slide") != slide:
        return (
            f"{str(path)!r} already holds streamed predictions {key!r} of another slide "
            f"({_describe(stored.get('slide', {}))}; "
            f"this slide: {_describe(slide)})"
        )
    if stored.get("model_id") != model_id:
        return (
            f"{str(path)!r} already holds streamed predictions {key!r} of another model ({stored.get('model_id')}; "
            f"this model: {model_id})"
        )
    return None


STORE_WHAT = "zarr store written by hx.tl.predict"


def op(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one write or delete of the commit and clean-up (a single place, so tests can crash the run at each)."""
    return fn(*args, **kwargs)


def delete(group: Any, name: str) -> None:
    del group[name]


def open_store(
    sdata: SpatialData, path: Path, own: bool, *, key: str, slide: dict[str, Any], model_id: str, overwrite: bool
):
    """Open (or create) the output store and the progress group of ``key``; refuse another slide's or model's results.

    Another path than the sample's own store must be a store hespotex wrote (its marker), an empty
    folder or nothing: anything else is refused, ``overwrite`` or not. In a store of hespotex this
    slide is added beside the other elements; ``overwrite=True`` replaces only what ``key`` names.
    """
    import zarr
    from spatialdata import SpatialData

    from hespotex import _ownership

    existing = False
    if not own:
        if path.exists() or path.is_symlink():
            _ownership.check_replaceable(path, "store", what=STORE_WHAT)
            if not any(path.iterdir()):
                path.rmdir()
        existing = path.exists()
        if not existing:  # written beside (a name unique to this run) and renamed: a store that exists is whole
            info = get_sample_info(sdata)
            attrs = {k: v for k, v in dict(getattr(sdata, "attrs", {}) or {}).items() if k == "hespotex_slide"}
            tmp = _ownership.temp_sibling(path)
            try:
                SpatialData(shapes={info.shapes_key: sdata.shapes[info.shapes_key]}, attrs=attrs).write(tmp)
                _ownership.mark(tmp, "store")
                tmp.rename(path)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    progress = root.require_group(PROGRESS_GROUP)
    if key in progress and not progress[key].attrs.get("slide"):
        del progress[key]  # interrupted before it recorded what it holds
    if key in progress and progress[key].attrs.get("complete") and not ("tables" in root and key in root["tables"]):
        logger.warning("%s records finished predictions %r, but their table is gone: predicting again.", path, key)
        del progress[key]
    if key in progress:
        reason = _check_existing(progress[key], path, key=key, slide=slide, model_id=model_id)
        if reason and not overwrite:
            msg = f"{reason}. Pass `overwrite=True` to replace them, or another `out` or `key_added`."
            raise FileExistsError(msg)
        if overwrite:
            del progress[key]
    elif "tables" in root and key in root["tables"] and not overwrite:
        msg = (
            f"{str(path)!r} already holds a table {key!r} that this streamed prediction did not write. Pass "
            "`overwrite=True` to replace it, or another `key_added`."
        )
        raise FileExistsError(msg)
    if existing:  # checked above that nothing of `key` is refused: now add this slide's spots
        _add_spots(sdata, path, key=key, overwrite=overwrite)
    return root, progress


def _add_spots(sdata: SpatialData, path: Path, *, key: str, overwrite: bool) -> None:
    """Write this slide's spot shapes into an existing store of hespotex, beside the other slides' elements.

    Spots of the same name and geometry are kept; spots of another slide under the same name are
    replaced only with ``overwrite=True`` and only when no other table of the store annotates them.
    """
    import spatialdata
    from anndata.io import read_elem

    name = get_sample_info(sdata).shapes_key
    shapes = sdata.shapes[name]
    store = spatialdata.read_zarr(path, selection=("shapes",))
    if name in store.shapes:
        stored = store.shapes[name]
        if len(stored) == len(shapes) and bool(
            stored.geometry.reset_index(drop=True).geom_equals(shapes.geometry.reset_index(drop=True)).all()
        ):
            return
        import zarr

        tables = zarr.open_group(path, mode="r", use_consolidated=False).get("tables")
        users = []
        for t, g in [] if tables is None else tables.groups():
            region = read_elem(g["uns"]).get("spatialdata_attrs", {}).get("region") if "uns" in g else None
            if t != key and name in np.atleast_1d(region if region is not None else []).tolist():
                users.append(t)
        if users:
            msg = (
                f"{str(path)!r} holds other spots named {name!r} (another slide), annotated by its table(s) {users}; "
                f"this slide's spots cannot be added under that name. Predict into another `out`."
            )
            raise FileExistsError(msg)
        if not overwrite:
            msg = (
                f"{str(path)!r} holds other spots named {name!r} (another slide). Pass `overwrite=True` to replace "
                "them, or another `out`."
            )
            raise FileExistsError(msg)
        store.delete_element_from_disk(name)
        del store.shapes[name]
    store.shapes[name] = shapes
    store.write_element(name)


def clean_progress(group: Any, path: Path) -> None:
    """Delete the progress arrays of a finished prediction (done markers first), then consolidate the metadata."""

    names = sorted(list(group.array_keys()) + list(group.group_keys()), key=lambda n: (not n.endswith("_done"), n))
    for name in names:
        op(delete, group, name)
    if _consolidated(path) is not None:
        op(_consolidate, path)


def _consolidated(path: Path) -> Any:
    """The store's consolidated metadata, or ``None`` when it has none."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning)  # not in the zarr v3 spec yet
        return zarr.open_group(path, mode="r").metadata.consolidated_metadata


def _consolidate(path: Path) -> None:
    """Rewrite the store's consolidated metadata (as spatialdata does after writing an element)."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning)  # parquet shapes are not zarr nodes
        zarr.consolidate_metadata(zarr.open_group(path, mode="r+", use_consolidated=False).store)


def progress_is_clean(group: Any, path: Path, key: str) -> bool:
    """No progress arrays left of a finished prediction, and consolidated metadata (if any) not listing them."""

    if list(group.array_keys()) or list(group.group_keys()):
        return False
    consolidated = _consolidated(path)
    if consolidated is None:
        return True
    prefix = f"{PROGRESS_GROUP}/{key}"
    entries = consolidated.flattened_metadata
    if any(k.startswith(prefix + "/") for k in entries):
        return False
    own = entries.get(prefix)
    return own is None or bool(dict(own.attributes).get("complete"))


def read_result(path: Path, key: str) -> AnnData:
    """The prediction table ``key`` of the store at ``path``: everything in memory but ``layers[key]`` (dask, lazy)."""
    import dask.array as da
    import zarr
    from anndata import AnnData
    from anndata.io import read_elem

    g = zarr.open_group(path, mode="r", use_consolidated=False)["tables"][key]
    parts = {name: read_elem(g[name]) for name in ("obs", "var", "obsm", "obsp", "uns") if name in g}
    adata = AnnData(**parts)
    for name, arr in g["layers"].arrays():
        adata.layers[name] = da.from_zarr(arr)
    return adata


def attach(sdata: SpatialData, table: AnnData, key: str) -> None:
    if key in sdata.tables:
        del sdata.tables[key]
    sdata.tables[key] = table


def ours(table: AnnData, key: str, model_id: str, path: Path) -> bool:
    params = recorded_params(table, key) or {}
    stream = params.get("stream", {})
    return params.get("model_id") == model_id and Path(str(stream.get("out", ""))).resolve() == path.resolve()
