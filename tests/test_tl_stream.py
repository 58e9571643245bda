"""Streaming prediction (``hx.tl.predict(..., out=...)``): same results as in memory, written to zarr, resumable."""

from __future__ import annotations

import copy
import logging
import shutil

import numpy as np
import pytest

import hespotex as hx
from hespotex.tl.prediction import _stream_stages

pytestmark = pytest.mark.usefixtures("single_threaded")
N_SPOTS = 300
CHUNK = 96  # -> 3 embedding chunks of 128 spots (whole encoder batches), 4+ graph blocks, 4 expression steps


def _slide(seed: int = 7, n_spots: int = N_SPOTS, sample_id: str = "stream"):
    return hx.datasets.synthetic(
        n_spots=n_spots, n_genes=40, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=sample_id
    )


@pytest.fixture(scope="module")
def slide():
    """An image-only use of a synthetic section: the model embeds it (no embeddings stored)."""
    return _slide()


@pytest.fixture(scope="module")
def reference(slide, trained_synthetic):
    """In-memory prediction of the slide (the behaviour without ``out``)."""
    sdata = copy.deepcopy(slide)
    table = hx.tl.predict(sdata, trained_synthetic["model"], device="cpu")
    return sdata, table


@pytest.fixture(scope="module")
def streamed(slide, trained_synthetic, tmp_path_factory):
    sdata = copy.deepcopy(slide)
    out = tmp_path_factory.mktemp("stream") / "slide.zarr"
    table = hx.tl.predict(sdata, trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    return sdata, table, out


class Counter:
    """Counts patches the encoder embeds (wrapping the real encode_patches) and can interrupt a stage."""

    def __init__(self, monkeypatch):
        from hespotex.pp import _embed_chunks
        from hespotex.pp import _encode as _embed  # the encoder loop (hx.pp.embed and the stream)

        self.patches = 0
        self.calls: dict[str, int] = {"embed": 0, "block": 0, "rows": 0}
        self.stop_after: dict[str, int] = {}
        real_encode, real_embed, real_block = (
            _embed.encode_patches,
            _embed_chunks.embed_chunk,
            _stream_stages._save_block,
        )
        real_heads = _stream_stages.gene_heads

        def encode(plan, *args, **kwargs):
            self.patches += len(plan.order)
            return real_encode(plan, *args, **kwargs)

        def wrap(name, real):
            def run(*args, **kwargs):
                if self.calls[name] == self.stop_after.get(name, -1):
                    raise KeyboardInterrupt(f"interrupted in {name}")
                self.calls[name] += 1
                return real(*args, **kwargs)

            return run

        monkeypatch.setattr(_embed, "encode_patches", encode)
        monkeypatch.setattr(_embed_chunks, "embed_chunk", wrap("embed", real_embed))
        monkeypatch.setattr(_stream_stages, "_save_block", wrap("block", real_block))
        monkeypatch.setattr(_stream_stages, "gene_heads", wrap("rows", real_heads))


def _layer(table, key="hespotex") -> np.ndarray:
    x = table.layers[key]
    return np.asarray(x.compute() if hasattr(x, "compute") else x)


# ---------------------------------------------------------------------------------------------- results
def test_streaming_equals_in_memory(reference, streamed, trained_synthetic):
    _, ref = reference
    sdata, table, _ = streamed
    model = trained_synthetic["model"]
    assert list(table.obs_names) == list(ref.obs_names)
    assert list(table.var_names) == model.genes
    assert hasattr(table.layers["hespotex"], "dask")  # read lazily from the store, never loaded whole
    np.testing.assert_allclose(_layer(table), np.asarray(ref.layers["hespotex"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.obsm["X_hespotex"], ref.obsm["X_hespotex"], rtol=1e-5, atol=1e-5)
    diff = table.obsp["hespotex_attention"] - ref.obsp["hespotex_attention"]
    assert ref.obsp["hespotex_attention"].nnz == table.obsp["hespotex_attention"].nnz
    assert abs(diff).max() < 1e-5
    params = table.uns["hespotex"]["params"]
    assert params["model_id"] == model.model_id and params["stream"]["chunk_size"] == CHUNK
    assert params["source"]["image_key"] == "stream_image"
    assert sdata.tables["hespotex"] is table  # also put in the SpatialData, as without `out`
    assert "X_hespotex_image" not in sdata.tables["table"].obsm  # the source table is not modified


def test_results_are_a_spatialdata_store(reference, streamed):
    import spatialdata
    import zarr

    _, ref = reference
    _, _, out = streamed
    sdata = hx.io.read_zarr(out)  # validated: a hespotex sample (spots and table; the image stays in the source)
    table = sdata.tables["hespotex"]
    assert "stream_spots" in sdata.shapes and not sdata.images
    assert "image_key" not in table.uns["hespotex_sample"]
    np.testing.assert_allclose(np.asarray(table.layers["hespotex"]), np.asarray(ref.layers["hespotex"]), atol=1e-5)
    assert spatialdata.read_zarr(out).tables["hespotex"].shape == ref.shape
    # the progress arrays are gone once finished; the group records what the store holds
    group = zarr.open_group(out, mode="r", use_consolidated=False)["hespotex_progress"]["hespotex"]
    assert group.attrs["complete"] and not list(group.array_keys()) and not list(group.group_keys())
    assert group.attrs["slide"]["n_spots"] == N_SPOTS


def test_a_finished_store_is_not_recomputed(slide, streamed, trained_synthetic, monkeypatch, caplog):
    _, table, out = streamed
    counter = Counter(monkeypatch)
    with caplog.at_level(logging.INFO, logger="hespotex"):
        again = hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", out=out, chunk_size=CHUNK)
    assert counter.patches == 0 and counter.calls == {"embed": 0, "block": 0, "rows": 0}
    assert "nothing to do" in caplog.text
    np.testing.assert_array_equal(_layer(again), _layer(table))


def test_predict_into_the_sample_own_store(slide, reference, trained_synthetic, tmp_path):
    _, ref = reference
    path = tmp_path / "own.zarr"
    hx.io.write_zarr(copy.deepcopy(slide), path)  # writing backs the SpatialData by the store: not the fixture
    sdata = hx.io.read_zarr(path)
    table = hx.tl.predict(sdata, trained_synthetic["model"], device="cpu", out="auto", chunk_size=200)
    np.testing.assert_allclose(_layer(table), np.asarray(ref.layers["hespotex"]), atol=1e-5)
    back = hx.io.read_zarr(path)  # the table sits beside the image, which stayed where it was
    assert set(back.tables) == {"table", "hespotex"} and "stream_image" in back.images
    assert back.tables["hespotex"].uns["hespotex_sample"]["image_key"] == "stream_image"
    np.testing.assert_allclose(np.asarray(back.tables["hespotex"].layers["hespotex"]), _layer(table))


def test_stored_embeddings_are_used(reference, streamed, trained_synthetic, tmp_path, monkeypatch):
    sdata, _ = reference  # its table holds obsm["X_hespotex_image"] from the in-memory run
    counter = Counter(monkeypatch)
    table = hx.tl.predict(
        copy.deepcopy(sdata), trained_synthetic["model"], device="cpu", out=tmp_path / "o.zarr", chunk_size=CHUNK
    )
    assert counter.patches == 0 and counter.calls["block"] > 0
    np.testing.assert_allclose(_layer(table), _layer(streamed[1]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- resume
def test_interrupted_run_resumes_where_it_stopped(slide, streamed, trained_synthetic, tmp_path, monkeypatch):
    model = trained_synthetic["model"]
    out = tmp_path / "resumed.zarr"
    counter = Counter(monkeypatch)

    def run():
        return hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=out, chunk_size=CHUNK)

    n_blocks = len(_stream_stages.bounded_blocks(slide.tables["table"].obsm["spatial"] * 1.0, CHUNK))
    assert n_blocks >= 3
    counter.stop_after = {"embed": 2}  # killed while embedding: 2 of 3 chunks written
    with pytest.raises(KeyboardInterrupt):
        run()
    assert counter.patches == 256
    counter.stop_after, counter.patches, counter.calls = {"block": 1}, 0, dict.fromkeys(counter.calls, 0)
    with pytest.raises(KeyboardInterrupt):  # resumes with the last chunk only, then stops after one graph block
        run()
    assert counter.patches == N_SPOTS - 256 and counter.calls["embed"] == 1
    counter.stop_after, counter.patches, counter.calls = {"rows": 2}, 0, dict.fromkeys(counter.calls, 0)
    with pytest.raises(KeyboardInterrupt):  # no embedding left; the other blocks; stops writing expression rows
        run()
    assert counter.patches == 0 and counter.calls["block"] == n_blocks - 1
    counter.stop_after, counter.calls = {}, dict.fromkeys(counter.calls, 0)
    table = run()
    assert counter.patches == 0 and counter.calls["block"] == 0
    assert counter.calls["rows"] == -(-N_SPOTS // CHUNK) - 2
    # identical to the uninterrupted run
    ref = streamed[1]
    np.testing.assert_array_equal(_layer(table), _layer(ref))
    np.testing.assert_array_equal(table.obsm["X_hespotex"], ref.obsm["X_hespotex"])
    assert (table.obsp["hespotex_attention"] != ref.obsp["hespotex_attention"]).nnz == 0


# ---------------------------------------------------------------------------------------------- refusals
def test_store_of_another_slide_is_refused(streamed, trained_synthetic, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(streamed[2], out)
    other = _slide(seed=8, n_spots=60, sample_id="other")
    with pytest.raises(
        FileExistsError,
        match=r"another slide \(sample 'stream', 300 spots; this slide: sample 'other', 60 spots\).*overwrite=True",
    ):
        hx.tl.predict(other, trained_synthetic["model"], device="cpu", out=out)
    assert "hespotex" not in other.tables
    table = hx.tl.predict(other, trained_synthetic["model"], device="cpu", out=out, overwrite=True)
    assert table.n_obs == 60 and hx.io.read_zarr(out).tables["hespotex"].n_obs == 60


def test_overwrite_replaces_finished_predictions_of_the_same_slide(reference, streamed, trained_synthetic, tmp_path):
    """A finished store of this very slide and model, predicted again with overwrite=True: recomputed and
    rewritten in place (spatialdata will not overwrite an element of the store it is backed by)."""
    out = tmp_path / "again.zarr"
    shutil.copytree(streamed[2], out)
    sdata = copy.deepcopy(reference[0])
    table = hx.tl.predict(sdata, trained_synthetic["model"], device="cpu", out=out, overwrite=True)
    np.testing.assert_allclose(_layer(table), _layer(reference[1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _layer(hx.io.read_zarr(out).tables["hespotex"]), _layer(reference[1]), rtol=1e-5, atol=1e-5
    )


def test_store_of_another_model_is_refused(slide, streamed, trained_synthetic, tmp_path):
    import torch

    out = tmp_path / "copy.zarr"
    shutil.copytree(streamed[2], out)
    other = copy.deepcopy(trained_synthetic["model"])
    with torch.no_grad():
        next(other.module_.parameters()).add_(0.01)
    with pytest.raises(FileExistsError, match=r"another model .*this model: " + other.model_id):
        hx.tl.predict(copy.deepcopy(slide), other, device="cpu", out=out, chunk_size=CHUNK)


def test_foreign_output_and_bad_arguments_are_refused(slide, trained_synthetic, tmp_path):
    model = trained_synthetic["model"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a zarr store written by hx\.tl\.predict"):
        hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=busy)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not backed by one"):
        hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out="auto")
    with pytest.raises(ValueError, match="no H&E image to cut patches from"):  # a table without image or embeddings
        hx.tl.predict(slide.tables["table"].copy(), model, device="cpu", out=tmp_path / "t.zarr")
    with pytest.raises(ValueError, match="positive `chunk_size`"):
        hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=tmp_path / "c.zarr", chunk_size=0)


def test_blocks_stay_bounded_on_uneven_tissue():
    rng = np.random.default_rng(0)
    dense = rng.normal(0, 1, (5000, 2))  # one dense blob in a large, nearly empty bounding box
    sparse = rng.uniform(-500, 500, (200, 2))
    coords = np.vstack([dense, sparse])
    blocks = _stream_stages.bounded_blocks(coords, 500)
    assert max(len(b) for b in blocks) <= 750
    np.testing.assert_array_equal(np.sort(np.concatenate(blocks)), np.arange(len(coords)))


@pytest.mark.parametrize(
    "options",
    [
        {"decoder_conv": "gatv2"},
        {"decoder_conv": "gcn", "decoder_stacked": True},
        {"decoder_conv": "sage", "jk_mode": "lstm"},
        {"use_graph_decoder": False},
    ],
    ids=["gatv2", "gcn-stacked", "sage-lstm", "no-decoder"],
)
def test_streamed_blocks_equal_a_whole_slide_pass(options):
    """Blocks with halos, and the gene heads run apart from the graph (as streaming does), give the
    whole-slide prediction for every kind of decoder (GCN's normalisation needs one ring more)."""
    from hespotex.models import HESpotExNet
    from hespotex.models._config import ModelConfig
    from hespotex.tl.model._data import GraphData

    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2) * 100.0
    xy += rng.uniform(-20, 20, xy.shape)
    emb = rng.normal(size=(len(xy), 24)).astype(np.float32)
    config = ModelConfig.preset("hespotex", latent_dim=16, head_hidden_dim=32, decoder_heads=2, **options)
    model = hx.tl.HESpotEx([f"g{i}" for i in range(12)], embedding={"encoder": "x", "encoder_id": "x"}, config=config)
    model.module_ = HESpotExNet(12, 24, model.config).eval()
    model.embedding_mean_, model.embedding_scale_ = emb.mean(0), emb.std(0)
    model.is_trained_ = True
    whole = model.predict_graph(GraphData("s", emb, xy), device="cpu")
    blocks = _stream_stages.bounded_blocks(xy, 60)
    latent = np.zeros((len(xy), 16), np.float32)
    features = (
        np.zeros((len(xy), model.module_.decoder.gene_head[0].in_features), np.float32)
        if model.module_.decoder
        else None
    )

    def on_block(_i, core, result):
        latent[core] = result["latent"]
        if features is not None:
            features[core] = result["features"]

    assert model.predict_graph(GraphData("s", emb, xy), device="cpu", blocks=blocks, on_block=on_block) is None
    expression = _stream_stages.gene_heads(model.module_, latent, features, "cpu")
    np.testing.assert_allclose(latent, whole["latent"], atol=1e-6)
    np.testing.assert_allclose(expression, whole["expression"], atol=1e-5)
