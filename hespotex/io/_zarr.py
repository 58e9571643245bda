"""Write and read samples as SpatialData zarr stores."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hespotex import _ownership
from hespotex._sample import get_sample_info

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")


@contextlib.contextmanager
def table_write_options() -> Iterator[None]:
    """Write AnnData tables (through spatialdata) into zarr v3 stores unsharded, as hespotex always has.

    anndata (0.12.x) warns at every array it writes to a zarr v3 store ("zarr v3 autosharding will be
    the default in the next minor release") until ``anndata.settings.auto_shard_zarr_v3`` is chosen.
    hespotex chooses ``False`` for its writes: the stores keep today's layout (one chunk file per chunk,
    readable by every zarr v3 reader), and zarr's automatic shard shapes, still experimental, stay out.
    A choice the user made (the setting is not ``None``) is kept.
    """
    import anndata

    if getattr(anndata.settings, "auto_shard_zarr_v3", False) is not None:  # chosen by the user, or absent
        yield
        return
    with anndata.settings.override(auto_shard_zarr_v3=False):
        yield


def write_zarr(sdata: SpatialData, path: str | Path, *, overwrite: bool = False) -> None:
    """Write a sample to a zarr store (:meth:`spatialdata.SpatialData.write`).

    Writes every element of ``sdata`` (image pyramid, shapes, tables with their ``uns``, including
    ``uns["hespotex_sample"]``) to ``path``. An existing ``path`` is refused unless
    ``overwrite=True``, and even then replaced only when it is a zarr store (written by hespotex,
    spatialdata or another zarr writer) or an empty folder: a file or any other folder (e.g. a project
    folder given by mistake) is refused, its content kept, and so is the store ``sdata`` reads from.
    The store is written beside ``path`` under a temporary name and moved into place once whole: a
    failed write leaves ``path`` as it was (the old store, or nothing). ``sdata.path`` becomes ``path``.
    """
    path = Path(path)
    _ownership.check_zarr_replaceable(path)
    if path.exists() and not overwrite:
        msg = f"{str(path)!r} already exists. Pass `overwrite=True` to replace it, or choose another path."
        raise FileExistsError(msg)
    if path.exists():
        _refuse_own_store(sdata, path)
    previous = sdata.path
    try:
        with table_write_options(), _ownership.written_beside(path, replace=path.exists(), create=False) as tmp:
            sdata.write(tmp)  # spatialdata creates the folder (it refuses an existing one) and sets sdata.path = tmp
    except BaseException:
        sdata.path = previous
        raise
    sdata.path = path
    logger.info("Wrote the sample to %s.", path)


def _refuse_own_store(sdata: SpatialData, path: Path) -> None:
    """Raise ``ValueError`` when ``path`` is (inside, or holds) the store ``sdata`` reads lazily from, or its
    ``sdata.path``: spatialdata's own refusal, kept although the new store is written beside. Reads only."""
    from spatialdata import get_dask_backing_files

    target = path.resolve()
    backing = [Path(f).resolve() for f in get_dask_backing_files(sdata)]
    own = None if sdata.path is None else Path(sdata.path).resolve()
    if any(f.is_relative_to(target) for f in backing) or (
        own is not None and (own.is_relative_to(target) or target.is_relative_to(own))
    ):
        msg = (
            f"{str(path)!r} is the store this SpatialData was read from (its path, or files its lazy elements read); "
            "it cannot be replaced while in use. Write to another path (and read that one back), or keep the store."
        )
        raise ValueError(msg)


def read_zarr(path: str | Path, *, validate: bool = True) -> SpatialData:
    """Read a sample written by :func:`write_zarr` (:func:`spatialdata.read_zarr`; images stay lazy).

    With ``validate=True`` (default) the store must hold a table with ``uns["hespotex_sample"]``
    whose image and shapes elements exist; a ``ValueError`` says what is missing.
    """
    import spatialdata

    path = Path(path)
    if not path.exists():
        msg = f"Expected a SpatialData zarr store at {str(path)!r}, found nothing there."
        raise FileNotFoundError(msg)
    sdata = spatialdata.read_zarr(path)
    if validate:
        try:
            info = get_sample_info(sdata)
        except KeyError as err:
            msg = (
                f"{str(path)!r} is not a hespotex sample: {err.args[0]} "
                "Pass `validate=False` to read it anyway, then build a sample with an `hx.io` reader."
            )
            raise ValueError(msg) from err
        missing = [k for k in (info.shapes_key, info.image_key) if k is not None and k not in sdata]
        if missing:
            msg = f"The sample in {str(path)!r} names elements {missing} that the store does not hold."
            raise ValueError(msg)
    return sdata
