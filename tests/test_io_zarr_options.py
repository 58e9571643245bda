"""hx.io.write_zarr chooses anndata's zarr v3 sharding (off) instead of leaving anndata to warn at every array."""

from __future__ import annotations

import warnings

import anndata
import zarr

import hespotex as hx


def _written_warnings(sdata, path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hx.io.write_zarr(sdata, path)
    return [str(w.message) for w in caught if "shard" in str(w.message)]


def test_write_zarr_writes_unsharded_tables_without_warnings(sample_factory, tmp_path):
    sdata = sample_factory(n_spots=20, n_genes=8)
    assert anndata.settings.auto_shard_zarr_v3 is None  # the user chose nothing: anndata would warn
    assert _written_warnings(sdata, tmp_path / "a.zarr") == []
    x = zarr.open_group(tmp_path / "a.zarr" / "tables" / "table", mode="r")["obsm"]["spatial"]
    assert x.metadata.zarr_format == 3 and x.shards is None  # one file per chunk, as before
    assert anndata.settings.auto_shard_zarr_v3 is None  # the user's setting is left as it was
    back = hx.io.read_zarr(tmp_path / "a.zarr")
    assert back.tables["table"].n_obs == 20


def test_a_sharding_choice_of_the_user_is_kept(sample_factory, tmp_path):
    sdata = sample_factory(n_spots=20, n_genes=8)
    with anndata.settings.override(auto_shard_zarr_v3=True):
        hx.io.write_zarr(sdata, tmp_path / "b.zarr")
    x = zarr.open_group(tmp_path / "b.zarr" / "tables" / "table", mode="r")["obsm"]["spatial"]
    assert x.shards is not None
