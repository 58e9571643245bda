"""``hx.tl.predict_slides``: expression maps for a cohort of image-only slides, one Dask task per slide.

Each slide goes through :func:`hespotex.io.read_wsi`, :func:`hespotex.pp.detect_tissue`,
:func:`hespotex.pp.tile` (pseudo-spots matching the model's training geometry) and the streaming
:func:`hespotex.tl.predict`, which writes its results to the slide's own zarr store under ``out``.
A small JSON completion marker is written beside the store last: a slide is *finished* exactly
when its marker exists, so an interrupted or failed slide never looks finished, and a re-run skips
what is finished and resumes the rest. The marker counts only while the store it names records its
predictions as committed (:func:`read_marker`), and a crash at any write or delete of the
prediction's commit or of the marker leaves the slide unfinished, to be resumed by the next run.
A new (or empty) ``out`` folder gets hespotex's folder marker (:mod:`hespotex._ownership`).

Layout of ``out`` for a slide ``.../TUMOUR-01.svs``::

    out/TUMOUR-01.zarr         SpatialData written by hx.tl.predict(..., out=...)
    out/TUMOUR-01.done.json    completion marker (slide, source path, model id, n_tiles, seconds)
    out/TUMOUR-01.error.txt    only while the last attempt failed: the error and its traceback
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from hespotex._cluster import local_cluster
from hespotex.tl.prediction._cohort_records import (
    error_message,
    output_paths,
    prepare_out,
    read_marker,
    slide_name,
    traceback_summary,
    unlink_record,
    write_json_atomic,
)

logger = logging.getLogger("hespotex")

#: Columns of the table :func:`predict_slides` returns, in order.
COLUMNS = ["slide", "status", "n_tiles", "seconds", "output", "error", "traceback", "path"]

_MODELS: dict[tuple[str, float], Any] = {}  # per-process cache: a worker loads each model folder once


# --------------------------------------------------------------------------------------------------
# one slide (runs in a worker, or in-process for the command line)


def _load_model(model_dir: str):
    from hespotex.tl.model._ensemble import ENSEMBLE_FILE
    from hespotex.tl.model._resolve import load_folder

    record = Path(model_dir) / ENSEMBLE_FILE  # an ensemble folder, else one model's
    record = record if record.is_file() else Path(model_dir) / "setup.json"
    key = (str(Path(model_dir).resolve()), record.stat().st_mtime)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_folder(model_dir)
    return _MODELS[key]


def _is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zattrs"))


def open_slide(path: str | Path, *, microns_per_pixel: float | None = None) -> Any:
    """Open a slide for prediction: a whole-slide image file, or a zarr store written by ``hespotex tile``.

    A tile store that holds no image (the default of ``hespotex tile``) is joined to the image of
    its source slide, found through ``attrs["hespotex_slide"]["path"]``. Reads lazily; writes nothing.
    """
    path = Path(path)
    if not path.exists():
        msg = f"The slide {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    if not _is_zarr_store(path):
        from hespotex.io import read_wsi

        return read_wsi(path, microns_per_pixel=microns_per_pixel)
    import spatialdata

    from hespotex._sample import get_sample_info

    tiles = spatialdata.read_zarr(path)
    info = get_sample_info(tiles)
    if info.image_key is not None and info.image_key in tiles:
        return tiles
    slide = dict(tiles.attrs.get("hespotex_slide", {}))
    source = slide.get("path")
    if not source or not Path(source).exists():
        msg = (
            f"The tile store {str(path)!r} holds no image and its source slide ({source!r}, from "
            "attrs['hespotex_slide']['path']) cannot be found. Tile the slide again, or keep the image "
            "in the store (`hespotex tile --with-image`)."
        )
        raise FileNotFoundError(msg)
    from hespotex.io import read_wsi

    sdata = read_wsi(
        source, microns_per_pixel=microns_per_pixel or slide.get("microns_per_pixel"), sample_id=slide.get("sample_id")
    )
    for kind in ("shapes", "tables"):
        for key, element in getattr(tiles, kind).items():
            if key in sdata:
                del sdata[key]
            sdata[key] = element
    return sdata


def _tile_if_needed(sdata: Any, model_dir: str, tile_kwargs: Mapping[str, Any]) -> int:
    """Detect tissue and tile unless the slide already has a tile table; returns the number of tiles."""
    from hespotex._sample import TABLE_KEY

    if TABLE_KEY in sdata.tables:
        return int(sdata.tables[TABLE_KEY].n_obs)
    import hespotex as hx

    slide = dict(sdata.attrs.get("hespotex_slide", {}))
    sid = slide.get("sample_id")
    if sid is None or f"{sid}_tissue" not in sdata.shapes:
        hx.pp.detect_tissue(sdata)
    kwargs = dict(tile_kwargs)
    if kwargs.get("spot_diameter_um") is None and kwargs.get("spacing_um") is None:
        kwargs.setdefault("model", model_dir)
    table = hx.pp.tile(sdata, **kwargs)
    return int(table.n_obs)


def run_slide(
    path: str | Path,
    model_dir: str | Path,
    *,
    out: str | Path,
    name: str | None = None,
    microns_per_pixel: float | None = None,
    tile_kwargs: Mapping[str, Any] | None = None,
    predict_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    raise_errors: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Predict one slide into ``out/<name>.zarr`` and write its completion marker last.

    The unit of work of :func:`predict_slides` (one Dask task) and of ``hespotex predict`` with one
    slide. Returns a record with the columns of :data:`COLUMNS`. Errors are caught and returned as
    ``status="failed"`` (message and traceback, also written to ``out/<name>.error.txt``); with
    ``raise_errors=True`` they are written there and raised. A finished slide (marker present) is skipped unless
    ``overwrite=True``.
    """
    import hespotex as hx

    path, out = Path(path), Path(out)
    name = name or slide_name(path)
    paths = output_paths(out, name)
    record: dict[str, Any] = dict.fromkeys(COLUMNS)
    record.update(slide=name, path=str(path), output=str(paths["zarr"]))
    t0 = time.perf_counter()
    try:
        if threads is not None:
            hx.settings.num_threads = threads
        done = read_marker(out, name)
        if done is not None and not overwrite:
            _check_marker(done, name=name, path=path, model_id=_load_model(str(model_dir)).model_id, out=out)
            record.update(status="skipped", n_tiles=done.get("n_tiles"), seconds=0.0)
            return record
        prepare_out(out)
        unlink_record(paths["done"])  # from here on the slide is not finished
        paths["error"].unlink(missing_ok=True)
        sdata = open_slide(path, microns_per_pixel=microns_per_pixel)  # first: a broken slide fails fast
        n_tiles = _tile_if_needed(sdata, str(model_dir), tile_kwargs or {})
        model = _load_model(str(model_dir))
        kwargs = {"key_added": "hespotex", **dict(predict_kwargs or {})}
        hx.tl.predict(sdata, model, out=paths["zarr"], overwrite=overwrite, **kwargs)
        seconds = time.perf_counter() - t0
        marker = {
            "slide": name,
            "source": str(path.resolve()),
            "output": str(paths["zarr"]),
            "model": str(Path(model_dir).resolve()),
            "model_id": model.model_id,
            "key_added": kwargs["key_added"],
            "n_tiles": n_tiles,
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "hespotex": _version(),
        }
        write_json_atomic(paths["done"], marker)  # last: the slide is finished only now
        record.update(status="finished", n_tiles=n_tiles, seconds=seconds)
    except Exception as err:  # one slide's failure is reported, not raised, so the cohort goes on
        record.update(
            status="failed",
            seconds=time.perf_counter() - t0,
            error=error_message(err),
            traceback=traceback_summary(err),
        )
        try:
            out.mkdir(parents=True, exist_ok=True)
            paths["error"].write_text(f"{record['error']}\n\n{record['traceback']}\n")
        except OSError:
            pass
        if raise_errors:
            raise
    return record


def _check_marker(done: Mapping[str, Any], *, name: str, path: Path, model_id: str, out: Path) -> None:
    source = done.get("source")
    if source and Path(source) != path.resolve():
        msg = (
            f"{str(out / name) + '.zarr'!r} already holds the results of another slide ({source}), not of "
            f"{str(path)!r} (both are named {name!r}). Pass `overwrite=True` (--overwrite) to replace them, or "
            "another `out`."
        )
        raise FileExistsError(msg)
    if done.get("model_id") != model_id:
        msg = (
            f"{str(out / name) + '.zarr'!r} holds predictions of another model ({done.get('model_id')}, from "
            f"{done.get('model')}), not of this one ({model_id}). Pass `overwrite=True` (--overwrite) to replace "
            "them, or another `out`."
        )
        raise FileExistsError(msg)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hespotex")
    except Exception:  # metadata missing in a source checkout
        return "unknown"


def _run_slide_task(
    path: str, model_dir: str, out: str, name: str, options: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """Dask task: one slide with as many torch threads as the worker has, under the caller's settings.

    The slide's own dask arrays (lazy image reads) are computed inside this task by dask's local
    scheduler: from within a worker dask would otherwise send them to the cluster, pickling the
    open slide files with them.
    """
    import dask

    import hespotex as hx

    hx.settings.progress = False
    hx.settings.cachedir = Path(settings["cachedir"])
    hx.settings.device = settings["device"]
    threads = None
    try:
        from distributed import get_worker

        threads = max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    local = {"scheduler": "synchronous"} if (threads or 1) == 1 else {"scheduler": "threads", "num_workers": threads}
    with dask.config.set(local):
        return run_slide(path, model_dir, out=out, name=name, threads=threads, **options)


# --------------------------------------------------------------------------------------------------
# the cohort


def _check_paths(paths: Iterable[str | Path]) -> dict[str, Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    named: dict[str, list[Path]] = {}
    for p in paths:
        named.setdefault(slide_name(p), []).append(Path(p))
    if not named:
        msg = "Expected at least one slide path, found none."
        raise ValueError(msg)
    dupes = {k: [str(p) for p in v] for k, v in named.items() if len(v) > 1}
    if dupes:
        msg = (
            f"Slides must have distinct file names (each writes <out>/<name>.zarr), found duplicates: {dupes}. "
            "Rename or link them under distinct names, or run them into different `out` folders."
        )
        raise ValueError(msg)
    return {k: v[0] for k, v in named.items()}


def _model_folder(model: Any, out: Path) -> tuple[Path, Any]:
    """The model as a folder every worker can read (a model object is saved under ``out/.model``)."""
    from hespotex.tl.model._ensemble import HESpotExEnsemble
    from hespotex.tl.model._model import HESpotEx
    from hespotex.tl.model._resolve import load_folder, model_folder

    model = model_folder(model) if isinstance(model, str | Path) else model  # a folder or "hf-hub:owner/name"
    if isinstance(model, HESpotEx | HESpotExEnsemble):  # an ensemble too: one folder, streamed as one model
        folder = out / ".model"
        if folder.exists():
            try:
                if load_folder(folder).model_id == model.model_id:
                    return folder, model
            except (FileNotFoundError, ValueError):
                pass
        return model.save(folder, overwrite=True), model
    folder = Path(model)
    return folder, load_folder(folder)


def predict_slides(
    paths: Iterable[str | Path],
    model: Any,
    *,
    out: str | Path,
    client: Any = None,
    n_workers: int | None = None,
    microns_per_pixel: float | None = None,
    tile_kwargs: Mapping[str, Any] | None = None,
    predict_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict expression maps for many image-only slides, one Dask task per slide.

    Every slide is read lazily (:func:`hespotex.io.read_wsi`), its tissue detected
    (:func:`hespotex.pp.detect_tissue`) and tiled with pseudo-spots of the model's training geometry
    (:func:`hespotex.pp.tile`), then predicted by the streaming :func:`hespotex.tl.predict` into its
    own zarr store. A slide that fails is reported with its error and leaves the others alone; a
    slide already finished is skipped. Re-running the same call resumes an interrupted cohort.

    Parameters
    ----------
    paths
        Whole-slide images (pyramidal TIFF / OME-TIFF, SVS...) or zarr stores written by
        ``hespotex tile``. Each slide's outputs are named after its file name without extension,
        so file names must be distinct.
    model
        The folder of a saved :class:`~hespotex.tl.HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble`
        (workers load it themselves; no model object is pickled), or a trained model, which is then saved
        to ``out/.model`` first. An ensemble writes its mean and spread, as :func:`hespotex.tl.predict`.
    out
        Output folder, created if needed. On a multi-machine cluster it must be shared storage.
    client
        A :class:`distributed.Client` to run on. By default a :class:`distributed.LocalCluster` of
        worker processes with one thread each is started for this call and closed afterwards (without
        the nanny's ``MALLOC_TRIM_THRESHOLD_``, which slows torch in workers: ``hespotex._cluster``). For a
        cluster of your own, set the dask config key
        ``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_`` to ``None`` while starting it
        (``dask.config.set``), in a process whose environment does not have the variable yet.
    n_workers
        Workers of that default cluster (default: one per slide to run, at most one per CPU core).
        Ignored when ``client`` is given.
    microns_per_pixel
        Resolution of every slide, for files whose metadata lacks it (otherwise read from the file).
    tile_kwargs
        Arguments of :func:`hespotex.pp.tile` (``spot_diameter_um``, ``spacing_um``, ``layout``...);
        by default the model's training geometry.
    predict_kwargs
        Further arguments of :func:`hespotex.tl.predict` (``device``, ``chunk_size``...).
    overwrite
        Predict again slides already finished, replacing their outputs.
    progress
        Show a progress bar over finished slides (also needs ``hx.settings.progress``).

    Returns
    -------
    One row per slide, in the order given, with columns ``slide`` (name of the outputs), ``status``
    (``"finished"``, ``"skipped"`` (finished earlier) or ``"failed"``), ``n_tiles``, ``seconds``,
    ``output`` (the slide's zarr store), ``error`` (type and message of a failure), ``traceback``
    (its innermost frames) and ``path`` (the slide as given). Failures are also logged.

    Written, per slide called ``name``: ``out/name.zarr`` (by :func:`hespotex.tl.predict`), then
    ``out/name.done.json`` (completion marker: source path, model id, tiles, seconds) when it
    succeeded, or ``out/name.error.txt`` (error and traceback) when it failed.
    """
    import hespotex as hx

    named = _check_paths(paths)
    out = Path(out)
    prepare_out(out)
    model_dir, loaded = _model_folder(model, out)
    model_id = loaded.model_id
    options = {
        "microns_per_pixel": microns_per_pixel,
        "tile_kwargs": dict(tile_kwargs or {}),
        "predict_kwargs": dict(predict_kwargs or {}),
        "overwrite": overwrite,
    }
    records: dict[str, dict[str, Any]] = {}
    todo: dict[str, Path] = {}
    for name, path in named.items():
        done = None if overwrite else read_marker(out, name)
        if done is None:
            todo[name] = path
            continue
        try:
            _check_marker(done, name=name, path=Path(path), model_id=model_id, out=out)
        except FileExistsError as err:
            records[name] = _failed(name, path, out, err)
            continue
        records[name] = {**dict.fromkeys(COLUMNS), "slide": name, "path": str(path), "status": "skipped",
                         "n_tiles": done.get("n_tiles"), "seconds": 0.0,
                         "output": str(output_paths(out, name)["zarr"])}  # fmt: skip
    if records:
        n_skipped = sum(r["status"] == "skipped" for r in records.values())
        logger.info("%d of %d slides already finished in %s: skipped.", n_skipped, len(named), out)
    if todo:
        records.update(
            _run_on_dask(
                todo,
                model_dir,
                out,
                options,
                client=client,
                n_workers=n_workers,
                progress=progress and hx.settings.progress,
            )
        )
    table = pd.DataFrame([records[n] for n in named], columns=COLUMNS)
    table["n_tiles"] = table["n_tiles"].astype("Int64")
    table["seconds"] = table["seconds"].astype(float)
    for row in table.itertuples():
        if row.status == "failed":
            logger.error("Slide %s (%s) failed: %s\n%s", row.slide, row.path, row.error, row.traceback or "")
    counts = table["status"].value_counts().to_dict()
    logger.info(
        "Cohort of %d slides: %s. Outputs in %s.", len(table), ", ".join(f"{v} {k}" for k, v in counts.items()), out
    )
    return table


def _failed(name: str, path: Path, out: Path, err: BaseException) -> dict[str, Any]:
    return {**dict.fromkeys(COLUMNS), "slide": name, "path": str(path), "status": "failed", "seconds": 0.0,
            "output": str(output_paths(out, name)["zarr"]), "error": error_message(err),
            "traceback": traceback_summary(err)}  # fmt: skip


def _run_on_dask(
    todo: dict[str, Path],
    model_dir: Path,
    out: Path,
    options: dict[str, Any],
    *,
    client: Any,
    n_workers: int | None,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    try:
        from distributed import Client, as_completed
    except ImportError as err:
        msg = "predict_slides needs dask.distributed: pip install 'hespotex[distributed]'."
        raise ImportError(msg) from err
    from tqdm.auto import tqdm

    own = client is None
    cluster = None
    if own:
        n = min(len(todo), os.cpu_count() or 1) if n_workers is None else max(1, int(n_workers))
        logger.info("Starting a local Dask cluster: %d worker processes, 1 thread each.", n)
        cluster = local_cluster(n)
        client = Client(cluster)
    records: dict[str, dict[str, Any]] = {}
    import hespotex as hx

    settings = {"cachedir": str(hx.settings.cachedir), "device": hx.settings.device}
    try:
        futures = {
            client.submit(_run_slide_task, str(path.absolute()), str(model_dir.absolute()), str(out.absolute()), name,
                          options, settings, key=f"hespotex-slide-{name}-{os.urandom(4).hex()}", pure=False): name
            for name, path in todo.items()
        }  # fmt: skip
        bar = tqdm(total=len(futures), desc="slides", unit="slide", disable=not progress)
        for future in as_completed(futures):
            name = futures[future]
            try:
                record = future.result()
            except Exception as err:  # the task itself died (e.g. a worker killed for memory): still one slide
                record = _failed(name, todo[name], out, err)
            records[name] = record
            bar.set_postfix_str(f"{name}: {record['status']}", refresh=False)
            bar.update(1)
        bar.close()
    finally:
        if own:
            _close_quietly(client, cluster)
    return records


def _close_quietly(client: Any, cluster: Any) -> None:
    """Shut our own cluster down; a slow shutdown (a busy machine) must not lose the slides' records."""
    for part in (client, cluster):
        try:
            part.close()
        except (TimeoutError, OSError, RuntimeError) as err:  # e.g. a worker still alive after the nanny's wait
            logger.warning(
                "The local Dask cluster did not shut down cleanly (%s: %s); the results are complete.",
                type(err).__name__,
                err,
            )
