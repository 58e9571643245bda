"""Training from embeddings on disk (``hx.tl.train(..., lazy=True)``): a zarr or dask ``obsm`` is read block by
block, the standardisation statistics are computed chunk by chunk, targets stay sparse until a batch densifies
them, and the trained model equals the in-memory one (same seed) up to float32 rounding of the statistics.

The section is a small synthetic Visium HD one in Space Ranger's layout (:func:`hespotex.datasets.synthetic_visium_hd`,
read with :func:`hespotex.io.read_visium_hd`); its embeddings are seeded random rows with features of different
means and scales, written to real zarr arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")

N_BINS, N_GENES, WIDTH, N_VIEWS = 1500, 20, 48, 2
KEY = "X_hespotex_image"
VIEWS = f"{KEY}_stain_views"


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """The 8 µm bins table of a synthetic Visium HD section with in-memory embeddings and stain views, and the
    same rows in zarr arrays."""
    import zarr

    root = tmp_path_factory.mktemp("lazy_train")
    hx.datasets.synthetic_visium_hd(
        root / "hd" / "outs", N_BINS, N_GENES, seed=1, microns_per_pixel=1.0, bin_sizes=(8,), fullres_image=False
    )
    table = hx.io.read_visium_hd(root / "hd" / "outs", bin_size=8).tables["table"]
    rng = np.random.default_rng(0)
    spread = np.linspace(0.1, 3.0, WIDTH, dtype=np.float32)
    offset = rng.uniform(0.0, 1.0, WIDTH).astype(np.float32)  # feature means and scales of a CNN's pooled features
    emb = rng.standard_normal((table.n_obs, WIDTH), dtype=np.float32) * spread + offset
    views = emb[:, None, :] + 0.3 * rng.standard_normal((table.n_obs, N_VIEWS, WIDTH), dtype=np.float32)
    table.obsm[KEY], table.obsm[VIEWS] = emb, views
    z_emb = zarr.create_array(root / "emb.zarr", shape=emb.shape, chunks=(256, WIDTH), dtype="float32")
    z_emb[:] = emb
    z_views = zarr.create_array(root / "views.zarr", shape=views.shape, chunks=(256, N_VIEWS, WIDTH), dtype="float32")
    z_views[:] = views
    return {"table": table, "root": root, "emb": z_emb, "views": z_views}


def _config():
    from hespotex.models import ModelConfig

    small = {"ae_epochs": 3, "ae_hidden_dim": 32, "latent_dim": 8, "projection_hidden_dim": 32, "head_hidden_dim": 32}
    return ModelConfig.preset("hespotex", epochs=4, lr=3e-3, patience=None, decoder_neighbors=8, **small)


def _train(table, monkeypatch, **kwargs):
    from hespotex.tl.training import _training

    monkeypatch.setattr(_training, "_AE_CACHE", {})  # every run pre-trains its own autoencoder
    kwargs = {"validation": 0.2, "ensemble": False, **kwargs}
    genes = list(next(iter(table.values())).var_names if isinstance(table, dict) else table.var_names)
    return hx.tl.train(table, genes=genes, config=_config(), seed=0, device="cpu", max_nodes=400, **kwargs)


def _with(table, **obsm):
    out = table.copy()
    for k, v in obsm.items():
        out.obsm[k] = v
    return out


def test_streamed_statistics_equal_numpy(section):
    from hespotex.tl.model._data import embedding_scale, floored_scale
    from hespotex.tl.model._lazy import LazyRows, streamed_statistics

    emb = section["table"].obsm[KEY]
    keep = np.random.default_rng(3).permutation(len(emb))[:1000]  # a training part: rows in no order
    rows = LazyRows(section["emb"]).subset(keep)
    mean, std = streamed_statistics([rows], chunk_rows=97)  # chunks that do not divide the rows or zarr chunks
    ref = emb[keep].astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=0), rtol=1e-12)
    # two parts (two samples) merge into the statistics of their union
    a, b = LazyRows(section["emb"]).subset(keep[:300]), LazyRows(section["emb"]).subset(keep[300:])
    mean2, std2 = streamed_statistics([a, b], chunk_rows=64)
    np.testing.assert_allclose(mean2, mean, rtol=1e-12)
    np.testing.assert_allclose(std2, std, rtol=1e-12)
    # and they are what the in-memory fit computes (float32 numpy) to float32 rounding
    np.testing.assert_allclose(mean.astype(np.float32), emb[keep].mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(floored_scale(std), embedding_scale(emb[keep]), rtol=1e-5)


def test_lazy_rows_read_standardised_rows_in_the_order_asked(section):
    import dask.array as da

    from hespotex.tl.model._lazy import LazyRows

    emb = section["table"].obsm[KEY]
    mean, scale = emb.mean(axis=0), emb.std(axis=0)
    idx = np.array([1400, 3, 700, 2, 256, 255, 999])  # unsorted, across zarr chunks
    for source in (section["emb"], da.from_zarr(section["emb"]), emb):
        rows = LazyRows(source).standardised(mean, scale)
        expected = np.subtract(emb[idx], mean, dtype=np.float32) / scale
        np.testing.assert_array_equal(rows[idx], expected)
        sub = rows.subset(np.arange(100, 600))  # a subset of a subset reads the composed rows
        twice = sub.subset(np.array([5, 0]))[np.array([1, 0])]
        np.testing.assert_array_equal(twice, np.subtract(emb[[100, 105]], mean, dtype=np.float32) / scale)
        mask = np.zeros(len(emb), dtype=bool)
        mask[[7, 9]] = True
        np.testing.assert_array_equal(rows[mask], np.subtract(emb[[7, 9]], mean, dtype=np.float32) / scale)


def test_sparse_targets_equal_dense(section):
    from hespotex.pp._targets import target_expression

    table, genes = section["table"], list(section["table"].var_names)[:12]
    for norm in ("library_all", "library_modelled", "log1p_counts"):
        dense = target_expression(table, genes, target_norm=norm)
        sparse = target_expression(table, genes, target_norm=norm, dense=False)
        assert sp.issparse(sparse) and sparse.dtype == np.float32
        assert sparse.nnz < sparse.shape[0] * sparse.shape[1]  # kept sparse, not a dense matrix in CSR
        np.testing.assert_array_equal(sparse.toarray(), dense)


@pytest.mark.parametrize("source", ["zarr", "dask"])
def test_lazy_training_equals_in_memory(section, source, monkeypatch):
    import dask.array as da

    from hespotex.tl.model import _lazy

    table = section["table"]
    lazy_emb = section["emb"] if source == "zarr" else da.from_zarr(section["emb"])
    lazy_views = section["views"] if source == "zarr" else da.from_zarr(section["views"])
    augment = source == "dask"  # the stain views path, read lazily too
    ref = _train(_with(table, **{KEY: table.obsm[KEY]}), monkeypatch, stain_augment=augment)

    reads = []
    real_read = _lazy.LazyRows._read

    def spy(self, pos):
        reads.append(len(pos))
        return real_read(self, pos)

    monkeypatch.setattr(_lazy.LazyRows, "_read", spy)
    monkeypatch.setattr(_lazy, "CHUNK_BYTES", 4 * WIDTH * N_VIEWS * 200)  # scans of at most 200 rows
    lazy_table = _with(table, **{KEY: lazy_emb, VIEWS: lazy_views})
    model = _train(lazy_table, monkeypatch, stain_augment=augment)  # lazy=None: zarr / dask obsm stream
    monkeypatch.setattr(_lazy.LazyRows, "_read", real_read)
    # the embeddings were read in pieces (statistics, NaN scan, training blocks, validation blocks), never whole
    assert reads and max(reads) < 0.7 * table.n_obs
    assert isinstance(lazy_table.obsm[KEY], type(lazy_emb))  # the table's lazy array is left as it was

    np.testing.assert_allclose(model.embedding_mean_, ref.embedding_mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.embedding_scale_, ref.embedding_scale_, rtol=1e-5)
    assert model.training_data_ == ref.training_data_
    assert model.stain_augment is not None if augment else model.stain_augment is None
    for h, h0 in zip(model.history_, ref.history_, strict=True):
        assert h["epoch"] == h0["epoch"]
        np.testing.assert_allclose(h["total"], h0["total"], rtol=1e-4)
        np.testing.assert_allclose(h["validation"], h0["validation"], rtol=1e-3, atol=1e-4)
    state, state0 = model.module_.state_dict(), ref.module_.state_dict()
    assert state.keys() == state0.keys()
    for k in state0:
        np.testing.assert_allclose(state[k].numpy(), state0[k].numpy(), rtol=1e-3, atol=2e-4, err_msg=k)
    # the models predict the same section the same way
    pred = [hx.tl.predict(_with(table), m, device="cpu", copy=True).layers["hespotex"] for m in (model, ref)]
    np.testing.assert_allclose(np.asarray(pred[0]), np.asarray(pred[1]), rtol=1e-3, atol=1e-4)
    # the training really changed the weights: a different seed gives a different model (the tolerance is tight)
    if source == "zarr":
        other = hx.tl.train(
            _with(table, **{KEY: lazy_emb}), genes=list(table.var_names), config=_config(), seed=1, device="cpu",
            max_nodes=400, validation=0.2, ensemble=False,
        )  # fmt: skip
        diff = max(float(np.abs(other.module_.state_dict()[k].numpy() - state0[k].numpy()).max()) for k in state0)
        assert diff > 1e-2


def test_lazy_training_is_bit_identical_given_the_same_statistics(section, monkeypatch):
    """Everything but the statistics (block reads, per-block standardisation, sparse targets densified per batch,
    batches built as used, validation forward) gives bit for bit the in-memory model: with the statistics of the
    in-memory fit handed to the lazy one, the weights and history are equal."""
    from hespotex.tl.model import _model

    table = section["table"]
    ref = _train(_with(table, **{KEY: table.obsm[KEY]}), monkeypatch, stain_augment=True)
    seen = []

    def same_statistics(parts, **kwargs):
        seen.append([type(p).__name__ for p in parts])
        rows = np.concatenate([np.asarray(p) for p in parts])  # numpy's float32 mean and std, as the in-memory fit
        return rows.mean(axis=0), rows.std(axis=0)

    monkeypatch.setattr(_model, "streamed_statistics", same_statistics)
    model = _train(_with(table, **{KEY: section["emb"], VIEWS: section["views"]}), monkeypatch, stain_augment=True)
    assert seen == [["LazyRows"]]
    np.testing.assert_array_equal(model.embedding_mean_, ref.embedding_mean_)
    np.testing.assert_array_equal(model.embedding_scale_, ref.embedding_scale_)
    assert model.history_ == ref.history_
    for k, v in ref.module_.state_dict().items():
        np.testing.assert_array_equal(model.module_.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def test_lazy_false_reads_a_dask_obsm_into_memory(section, monkeypatch):
    import dask.array as da

    table = section["table"]
    ref = _train(_with(table, **{KEY: table.obsm[KEY]}), monkeypatch, validation=None)
    model = _train(_with(table, **{KEY: da.from_zarr(section["emb"])}), monkeypatch, validation=None, lazy=False)
    np.testing.assert_array_equal(model.embedding_mean_, ref.embedding_mean_)  # today's path: bit for bit
    for k, v in ref.module_.state_dict().items():
        np.testing.assert_array_equal(model.module_.state_dict()[k].numpy(), v.numpy())
    # lazy=True streams an in-memory array too: the same model up to the statistics' rounding
    streamed = _train(_with(table, **{KEY: table.obsm[KEY]}), monkeypatch, validation=None, lazy=True)
    np.testing.assert_allclose(streamed.embedding_mean_, ref.embedding_mean_, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Expected `lazy` to be None, True or False; found 'yes'"):
        _train(_with(table), monkeypatch, lazy="yes")


def test_lazy_bad_input(section, monkeypatch):
    import dask.array as da
    import zarr

    from hespotex.tl.model._lazy import LazyRows

    table, root = section["table"], section["root"]
    emb = table.obsm[KEY]
    # NaN rows in the store: found by the chunked scan, counted, and what to do is said
    bad = zarr.create_array(root / "nan.zarr", shape=emb.shape, chunks=(256, WIDTH), dtype="float32")
    bad[:] = emb
    bad[[5, 600, 1400], 3] = np.nan
    with pytest.raises(ValueError, match=r"obsm\['X_hespotex_image'\] holds NaN or infinite values in 3 spots"):
        _train(_with(table, **{KEY: bad}), monkeypatch)
    # one value per spot instead of rows of features
    flat = zarr.create_array(root / "flat.zarr", shape=(table.n_obs,), chunks=(256,), dtype="float32")
    with pytest.raises(ValueError, match=r"Expected obsm\['X_hespotex_image'\] of shape \(n_obs, width\)"):
        _train(_with(table, **{KEY: flat}), monkeypatch)
    # not numbers
    text = zarr.create_array(root / "text.zarr", shape=(table.n_obs, 2), chunks=(256, 2), dtype="str")
    with pytest.raises(TypeError, match="Expected real numeric obsm"):
        _train(_with(table, **{KEY: text}), monkeypatch)
    # a dask array of unknown chunk sizes (e.g. after boolean indexing)
    unknown = da.from_array(emb, chunks=(256, WIDTH))
    unknown = unknown[unknown[:, 0] > -np.inf]
    with pytest.raises(ValueError, match="known shape"):
        LazyRows(unknown)
    # two samples embedded with encoders of different widths
    narrow = zarr.create_array(root / "narrow.zarr", shape=(table.n_obs, WIDTH - 8), chunks=(256, 40), dtype="f4")
    narrow[:] = emb[:, : WIDTH - 8]
    pair = {"a": _with(table, **{KEY: section["emb"]}), "b": _with(table, **{KEY: narrow})}
    with pytest.raises(ValueError, match="Expected embeddings of one width in every training sample"):
        _train(pair, monkeypatch, validation=None)
    # stain views without the views axis
    views = zarr.create_array(root / "views_2d.zarr", shape=emb.shape, chunks=(256, WIDTH), dtype="float32")
    with pytest.raises(ValueError, match=r"of shape \(n_spots, n_views, dim\)"):
        _train(_with(table, **{KEY: section["emb"], VIEWS: views}), monkeypatch, stain_augment=True)
