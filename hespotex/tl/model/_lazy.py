"""Embeddings read from disk a block at a time: training (and prediction) without the ``N x width`` array in memory.

:class:`LazyRows` stands for the rows of an array that stays where it is: a zarr array, a dask array
(e.g. ``dask.array.from_zarr``, or a table read back lazily), a ``numpy.memmap`` or an in-memory array.
It is what :class:`~hespotex.tl.model._data.GraphData` holds as ``emb`` (and ``views``) when
:func:`hespotex.tl.train` runs with ``lazy=True`` (the default when ``obsm[use_rep]`` is not an in-memory
numpy array): a subset (a training part, a spatial block) is an index into the source, not a copy;
standardisation is applied to the rows of one block as they are read; the standardisation statistics
are computed chunk by chunk (:func:`streamed_statistics`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger("hespotex")

CHUNK_BYTES = 2**26  # ~64 MB of float32 rows per read when scanning a whole source


def is_in_memory(value: Any) -> bool:
    """Whether ``value`` is an in-memory numpy array (a ``numpy.memmap`` is not: it stays on disk)."""
    return isinstance(value, np.ndarray) and not isinstance(value, np.memmap)


def _source_kind(source: Any) -> str:
    module = type(source).__module__
    if isinstance(source, np.ndarray):
        return "numpy"
    if module.startswith("zarr"):
        return "zarr"
    if module.startswith("dask"):
        return "dask"
    if hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__"):
        return "other"  # h5py datasets and other array readers: indexed with sorted integer arrays
    msg = (
        f"Expected embeddings as an array (numpy, zarr, dask or another reader with shape, dtype and row "
        f"indexing), found {type(source).__name__}. Put a zarr or dask array in obsm, e.g. "
        "`table.obsm[key] = dask.array.from_zarr(path)`."
    )
    raise TypeError(msg)


class LazyRows:
    """Rows of ``source`` (``(N, ...)``), optionally through ``index`` (row ``i`` is ``source[index[i]]``) and
    standardised by ``(mean, scale)`` when read.

    Indexing with integer arrays (or a boolean mask) reads only those rows, each touched zarr chunk once,
    and returns float32 numpy rows in the order asked, standardised as ``(rows - mean) / scale`` with the
    same float32 operations as a standardised copy of the whole array. :meth:`subset` and
    :meth:`standardised` return new readers (no rows are read).
    """

    def __init__(
        self,
        source: Any,
        index: np.ndarray | None = None,
        *,
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        name: str = "embeddings",
    ) -> None:
        self.kind = _source_kind(source)
        shape = tuple(source.shape)
        if any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
            msg = (
                f"Expected {name} with known shape, found {shape} (a dask array of unknown chunk sizes?). Call "
                "`.compute_chunk_sizes()` on it or open the zarr array with `dask.array.from_zarr`."
            )
            raise ValueError(msg)
        dtype = np.dtype(source.dtype)
        if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
            msg = f"Expected real numeric {name}, found dtype {source.dtype}. Store them as float32."
            raise TypeError(msg)
        self.source = source
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.mean, self.scale = mean, scale
        self.name = name
        n = shape[0] if self.index is None else len(self.index)
        self.shape = (int(n), *(int(d) for d in shape[1:]))
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        std = ", standardised" if self.mean is not None else ""
        return f"LazyRows({self.shape}, {self.kind}{std})"

    # ---------------------------------------------------------------- views (nothing read)
    def _positions(self, idx: Any) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                msg = f"Expected a boolean mask of {len(self)} rows, found shape {idx.shape}."
                raise IndexError(msg)
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).ravel()
        return idx if self.index is None else self.index[idx]

    def subset(self, idx: Any) -> LazyRows:
        """The rows ``idx`` (integer array or boolean mask) as a new reader; nothing is read."""
        return LazyRows(self.source, self._positions(idx), mean=self.mean, scale=self.scale, name=self.name)

    def standardised(self, mean: np.ndarray, scale: np.ndarray) -> LazyRows:
        """A reader of these rows standardised by the feature ``mean`` and ``scale`` (width of the last axis)."""
        if self.mean is not None:
            msg = "These rows are standardised already."
            raise ValueError(msg)
        if len(mean) != self.shape[-1] or len(scale) != self.shape[-1]:
            msg = f"Expected statistics of width {self.shape[-1]} for {self.name} {self.shape}, found {len(mean)}."
            raise ValueError(msg)
        return LazyRows(self.source, self.index, mean=mean, scale=scale, name=self.name)

    # ---------------------------------------------------------------- reading
    def _read(self, pos: np.ndarray) -> np.ndarray:
        """Rows at source positions ``pos`` (any order, no repeats needed), raw dtype, in the order of ``pos``."""
        if len(pos) == 0:
            return np.empty((0, *self.shape[1:]), dtype=np.float32)
        order = np.argsort(pos, kind="stable")
        spos = pos[order]
        contiguous = spos[-1] - spos[0] + 1 == len(spos) and (len(spos) < 2 or (np.diff(spos) == 1).all())
        rest = (slice(None),) * (self.ndim - 1)
        if contiguous:  # a plain slice: one read of whole chunks
            rows = self.source[(slice(int(spos[0]), int(spos[-1]) + 1), *rest)]
        elif self.kind == "zarr":
            rows = self.source.get_orthogonal_selection((spos, *rest))
        else:  # numpy, dask, h5py...: sorted integer positions
            rows = self.source[spos]
        if self.kind == "dask":
            rows = rows.compute(scheduler="synchronous")
        rows = np.asarray(rows)
        if (order == np.arange(len(order))).all():
            return rows
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        rows = self._read(self._positions(idx))
        if self.mean is None:
            return np.asarray(rows, dtype=np.float32)
        rows = np.subtract(rows, self.mean, dtype=np.float32)  # as HESpotEx._standardised on a whole copy
        rows /= self.scale
        return rows

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """All rows (the whole array in memory: what this class avoids; kept for small inputs and numpy calls)."""
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype, copy=False)

    def chunks(self, chunk_rows: int | None = None) -> Iterator[np.ndarray]:
        """All rows, ``chunk_rows`` at a time (default: about :data:`CHUNK_BYTES`), in source order."""
        width = int(np.prod(self.shape[1:])) or 1
        step = max(1, int(chunk_rows or CHUNK_BYTES // (4 * width)))
        pos = np.arange(self.shape[0]) if self.index is None else np.sort(self.index)
        for start in range(0, len(pos), step):
            part = pos[start : start + step]
            rows = self._read(part)
            if self.mean is None:
                yield np.asarray(rows, dtype=np.float32)
            else:
                rows = np.subtract(rows, self.mean, dtype=np.float32)
                rows /= self.scale
                yield rows


def as_rows(value: Any, *, name: str = "embeddings") -> LazyRows:
    """``value`` as a :class:`LazyRows` (returned as is when it is one)."""
    return value if isinstance(value, LazyRows) else LazyRows(value, name=name)


def check_finite(rows: LazyRows, what: str) -> None:
    """Scan ``rows`` chunk by chunk; raise a ``ValueError`` naming how many rows hold NaN or infinite values."""
    bad = 0
    for chunk in rows.chunks():
        bad += int((~np.isfinite(chunk)).reshape(len(chunk), -1).any(axis=1).sum())
    if bad:
        msg = (
            f"{what} holds NaN or infinite values in {bad} spots; recompute the embeddings "
            "(hx.pp.embed(..., overwrite=True))."
        )
        raise ValueError(msg)


def take(value: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of ``value``: a new reader for :class:`LazyRows` (nothing read), else ``value[idx]``."""
    return value.subset(idx) if isinstance(value, LazyRows) else value[idx]


def dense(value: Any) -> Any:
    """``value`` in memory: a :class:`LazyRows` read, a sparse matrix densified (float32), else as is."""
    if isinstance(value, LazyRows):
        return value[np.arange(len(value))]
    if sp.issparse(value):
        return np.asarray(value.toarray(), dtype=np.float32)
    return value


def streamed_statistics(parts: Sequence[LazyRows], *, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (``ddof=0``) over every row of ``parts``, chunk by chunk.

    Chunks are merged in float64 (Chan et al.'s pairwise update of count, mean and sum of squared
    deviations), so the result equals ``numpy``'s two-pass ``mean`` / ``std`` of the concatenated rows
    up to float32 rounding, with one chunk in memory at a time. Returns float64 arrays.
    """
    widths = {p.shape[1:] for p in parts}
    if len(widths) != 1:
        msg = f"Expected embeddings of one width in every training sample, found shapes {[p.shape for p in parts]}."
        raise ValueError(msg)
    count, mean, m2 = 0, None, None
    for part in parts:
        for chunk in part.chunks(chunk_rows):
            c = np.asarray(chunk, dtype=np.float64)
            k = len(c)
            if k == 0:
                continue
            cmean = c.mean(axis=0)
            cm2 = ((c - cmean) ** 2).sum(axis=0)
            if mean is None:
                count, mean, m2 = k, cmean, cm2
                continue
            total = count + k
            delta = cmean - mean
            mean = mean + delta * (k / total)
            m2 = m2 + cm2 + delta**2 * (count * k / total)
            count = total
    if mean is None:
        msg = "Expected training spots to compute the embedding statistics, found none."
        raise ValueError(msg)
    return mean, np.sqrt(m2 / count)


def column_means(exprs: Sequence[Any]) -> np.ndarray:
    """Mean of every column over the rows of ``exprs`` (dense or sparse matrices), in float64."""
    total = sum(np.asarray(e.sum(axis=0), dtype=np.float64).ravel() for e in exprs)
    return total / sum(e.shape[0] for e in exprs)
