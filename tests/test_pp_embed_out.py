"""``hx.pp.embed(..., out=path)``: embeddings written chunk by chunk into a zarr store that hespotex owns, ``obsm`` a
lazy dask array over it that ``hx.tl.train`` streams; reruns reuse or resume the store; what is refused.

The sample is the small synthetic one of the other pp tests (random image, Poisson counts, real builder); the
encoder a randomly initialised ResNet-18 at 32 px (seeded). The store's chunks and steps are made small so a
section of 150 spots spans several of each.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")

N_SPOTS, ROWS, STEP = 150, 16, 32
EMBED = {"encoder": "resnet18", "input_size": 32, "seed": 0, "device": "cpu"}


@pytest.fixture
def small_steps(monkeypatch):
    from hespotex.pp import _embed_store

    monkeypatch.setattr(_embed_store, "CHUNK_ROWS", ROWS)
    monkeypatch.setattr(_embed_store, "STEP_BYTES", 4 * 512 * STEP)  # resnet18: 512 features -> 32 rows a step


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A sample and its in-memory embeddings (computed without any cache)."""
    from conftest import make_sample

    saved = hx.settings.progress
    hx.settings.progress = False
    sdata = make_sample(n_spots=N_SPOTS, n_genes=12, seed=4)
    ref = copy.deepcopy(sdata)
    hx.pp.embed(ref, cache=False, **EMBED)
    hx.settings.progress = saved
    return sdata, ref.tables["table"]


def _spy_encoder(monkeypatch):
    """Count the patches the encoder loop embeds (in memory and chunk by chunk)."""
    from hespotex.pp import _encode

    seen, real = [], _encode.encode_patches

    def spy(plan, encoder, **kwargs):
        seen.append(len(plan.order))
        return real(plan, encoder, **kwargs)

    monkeypatch.setattr(_encode, "encode_patches", spy)
    return seen


def test_out_equals_in_memory_and_is_backed_by_the_store(sample, tmp_path, small_steps, monkeypatch):
    import dask.array as da
    import zarr

    from hespotex import _ownership

    sdata, ref = copy.deepcopy(sample[0]), sample[1]
    out = tmp_path / "emb.zarr"
    seen = _spy_encoder(monkeypatch)
    hx.pp.embed(sdata, out=out, **EMBED)
    table = sdata.tables["table"]
    lazy = table.obsm["X_hespotex_image"]
    assert isinstance(lazy, da.Array) and lazy.shape == ref.obsm["X_hespotex_image"].shape
    assert lazy.chunks[0][0] == ROWS and lazy.dtype == np.float32
    assert sum(seen) == N_SPOTS and max(seen) <= STEP  # every patch once, a step at a time
    # the same numbers as in memory (other batches: float rounding only) and the same record (cache key)
    np.testing.assert_allclose(np.asarray(lazy), ref.obsm["X_hespotex_image"], rtol=1e-5, atol=1e-5)
    record = table.uns["hespotex_embed"]["X_hespotex_image"]
    assert record == ref.uns["hespotex_embed"]["X_hespotex_image"]
    group = zarr.open_group(out, mode="r")
    assert group.attrs["hespotex_embed"]["cache_key"] == record["cache_key"]
    assert group.attrs["hespotex_embed"]["encoder"] == record["encoder"] == "resnet18"
    assert group.attrs["hespotex_embed"]["mpp"] == pytest.approx(record["mpp"])
    assert group.attrs["complete"] is True and np.asarray(group["embeddings_done"][:]).all()
    assert _ownership.owned(out, "embeddings")
    # obsm reads the store: a change there shows in the table's array
    group = zarr.open_group(out, mode="r+")
    group["embeddings"][3] = 7.0
    assert (np.asarray(table.obsm["X_hespotex_image"][3]) == 7.0).all()


def test_rerun_reuses_the_store_and_resumes_a_partial_one(sample, tmp_path, small_steps, monkeypatch):
    import zarr

    out = tmp_path / "emb.zarr"
    sdata = copy.deepcopy(sample[0])
    hx.pp.embed(sdata, out=out, **EMBED)
    full = np.asarray(sdata.tables["table"].obsm["X_hespotex_image"])
    seen = _spy_encoder(monkeypatch)
    again = copy.deepcopy(sample[0])
    hx.pp.embed(again, out=out, **EMBED)  # complete, same record: opened, nothing embedded
    assert seen == []
    np.testing.assert_array_equal(np.asarray(again.tables["table"].obsm["X_hespotex_image"]), full)
    # an interrupted run: step 2 not done (its rows never written), the store not complete
    group = zarr.open_group(out, mode="r+")
    group["embeddings"][2 * STEP : 3 * STEP] = 0.0
    group["embeddings_done"][2] = False
    group.attrs["complete"] = False
    resumed = copy.deepcopy(sample[0])
    hx.pp.embed(resumed, out=out, **EMBED)
    assert seen == [STEP]  # only the missing step
    np.testing.assert_array_equal(np.asarray(resumed.tables["table"].obsm["X_hespotex_image"]), full)
    assert zarr.open_group(out, mode="r").attrs["complete"] is True


def test_refusals(sample, tmp_path, small_steps):
    import zarr

    out = tmp_path / "emb.zarr"
    hx.pp.embed(copy.deepcopy(sample[0]), out=out, **EMBED)
    # other embeddings (another patch size): not replaced without overwrite
    with pytest.raises(FileExistsError, match=r"holds other embeddings .* Pass `overwrite=True`"):
        hx.pp.embed(copy.deepcopy(sample[0]), out=out, patch_um=40.0, **EMBED)
    other = copy.deepcopy(sample[0])
    hx.pp.embed(other, out=out, patch_um=40.0, overwrite=True, **EMBED)
    key = other.tables["table"].uns["hespotex_embed"]["X_hespotex_image"]["cache_key"]
    assert zarr.open_group(out, mode="r").attrs["hespotex_embed"]["cache_key"] == key
    # a zarr store hx.pp.embed did not write: only with overwrite
    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(foreign, shape=(4,), dtype="float32")[:] = 1.0
    with pytest.raises(FileExistsError, match=r"a zarr store that hx\.pp\.embed did not write"):
        hx.pp.embed(copy.deepcopy(sample[0]), out=foreign, **EMBED)
    assert (zarr.open_array(foreign, mode="r")[:] == 1.0).all()
    # a user's folder: never, overwrite or not
    user = tmp_path / "notes"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        hx.pp.embed(copy.deepcopy(sample[0]), out=user, overwrite=True, **EMBED)
    assert (user / "notes.txt").read_text() == "mine"
    # the sample's own SpatialData store: never the embeddings' store
    own = copy.deepcopy(sample[0])
    own.write(tmp_path / "sample.zarr")
    with pytest.raises(ValueError, match="is the sample's own SpatialData store"):
        hx.pp.embed(own, out=tmp_path / "sample.zarr", overwrite=True, **EMBED)
    assert (tmp_path / "sample.zarr" / "tables").is_dir()
    with pytest.raises(ValueError, match="stain_augment views are embedded in memory only"):
        hx.pp.embed(copy.deepcopy(sample[0]), out=tmp_path / "v.zarr", stain_augment=1, **EMBED)
    assert not (tmp_path / "v.zarr").exists()


def _files(path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_replacement_is_written_beside_and_swapped_in_only_when_complete(sample, tmp_path, small_steps, monkeypatch):
    """overwrite=True of other embeddings: a failure mid-way leaves the old store (and the table's lazy array over it)
    as they were and no temporary store; a success puts the new store at `out`, which obsm then reads."""
    import zarr

    from hespotex.pp import _encode

    out = tmp_path / "emb.zarr"
    sdata = copy.deepcopy(sample[0])
    hx.pp.embed(sdata, out=out, **EMBED)
    table = sdata.tables["table"]
    old, old_record = np.asarray(table.obsm["X_hespotex_image"]), dict(table.uns["hespotex_embed"]["X_hespotex_image"])
    before = _files(out)
    calls, beside, real = [], [], _encode.encode_patches

    def failing(plan, encoder, **kwargs):  # the second step fails, after the first was written into the new store
        calls.append(len(plan.order))
        beside.extend(p.name for p in tmp_path.iterdir() if p.name != "emb.zarr")
        if len(calls) == 2:
            raise RuntimeError("the disk is full")
        return real(plan, encoder, **kwargs)

    monkeypatch.setattr(_encode, "encode_patches", failing)
    with pytest.raises(RuntimeError, match="the disk is full"):
        hx.pp.embed(sdata, out=out, patch_um=40.0, overwrite=True, **EMBED)
    assert beside and all(name.startswith(".emb.zarr.") for name in beside)  # written beside, not into `out`
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.zarr"]  # the temporary store removed
    assert _files(out) == before  # the old store, byte for byte
    np.testing.assert_array_equal(np.asarray(table.obsm["X_hespotex_image"]), old)  # still reads the old store
    assert table.uns["hespotex_embed"]["X_hespotex_image"] == old_record
    # the same replacement without the failure: the new store lands at `out`, the table reads it there
    monkeypatch.setattr(_encode, "encode_patches", real)
    hx.pp.embed(sdata, out=out, patch_um=40.0, overwrite=True, **EMBED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.zarr"]
    record = table.uns["hespotex_embed"]["X_hespotex_image"]
    assert record["cache_key"] != old_record["cache_key"]
    group = zarr.open_group(out, mode="r+")
    assert group.attrs["hespotex_embed"]["cache_key"] == record["cache_key"] and group.attrs["complete"] is True
    new = np.asarray(table.obsm["X_hespotex_image"])
    assert new.shape == old.shape and not np.allclose(new, old)  # other patches, other numbers
    np.testing.assert_array_equal(np.asarray(group["embeddings"][:]), new)
    group["embeddings"][5] = 3.0  # obsm is a lazy array over `out` itself, not over a temporary or deleted path
    assert (np.asarray(table.obsm["X_hespotex_image"][5]) == 3.0).all()


def test_train_on_out_embeddings_streams_and_equals_in_memory(sample, tmp_path, small_steps, monkeypatch):
    import dask.array as da

    from hespotex.models import ModelConfig
    from hespotex.tl.model import _lazy
    from hespotex.tl.training import _training

    sdata = copy.deepcopy(sample[0])
    hx.pp.embed(sdata, out=tmp_path / "emb.zarr", **EMBED)
    lazy_table = sdata.tables["table"]
    memory_table = lazy_table.copy()
    memory_table.obsm["X_hespotex_image"] = np.asarray(lazy_table.obsm["X_hespotex_image"])
    small = {"ae_epochs": 3, "ae_hidden_dim": 32, "latent_dim": 8, "projection_hidden_dim": 32, "head_hidden_dim": 32}
    config = ModelConfig.preset("hespotex", epochs=4, lr=3e-3, patience=None, decoder_neighbors=8, **small)

    def train(table):
        monkeypatch.setattr(_training, "_AE_CACHE", {})
        genes = list(table.var_names)
        return hx.tl.train(table, genes=genes, config=config, seed=0, device="cpu", validation=0.2, ensemble=False)

    reads, real_read = [], _lazy.LazyRows._read

    def spy(self, *args, **kwargs):
        reads.append(1)
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(_lazy.LazyRows, "_read", spy)
    model = train(lazy_table)  # lazy=None: a dask obsm streams
    assert reads, "training did not read the embeddings block by block"
    monkeypatch.setattr(_lazy.LazyRows, "_read", real_read)
    assert isinstance(lazy_table.obsm["X_hespotex_image"], da.Array)
    ref = train(memory_table)
    np.testing.assert_allclose(model.embedding_mean_, ref.embedding_mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.embedding_scale_, ref.embedding_scale_, rtol=1e-5)
    state, state0 = model.module_.state_dict(), ref.module_.state_dict()
    for k in state0:
        np.testing.assert_allclose(state[k].numpy(), state0[k].numpy(), rtol=1e-3, atol=2e-4, err_msg=k)


def test_out_with_context_and_tta_equals_in_memory(sample, tmp_path, small_steps):
    """Two-scale (context_um) test-time-augmented embeddings go through the store too: the same numbers and record."""
    options = {**EMBED, "context_um": 80.0, "tta": True}
    ref = copy.deepcopy(sample[0])
    hx.pp.embed(ref, cache=False, **options)
    sdata = copy.deepcopy(sample[0])
    hx.pp.embed(sdata, out=tmp_path / "two.zarr", **options)
    table, ref_table = sdata.tables["table"], ref.tables["table"]
    assert table.obsm["X_hespotex_image"].shape == (N_SPOTS, 2 * 512)
    np.testing.assert_allclose(
        np.asarray(table.obsm["X_hespotex_image"]), ref_table.obsm["X_hespotex_image"], rtol=1e-5, atol=1e-5
    )
    record = table.uns["hespotex_embed"]["X_hespotex_image"]
    assert record == ref_table.uns["hespotex_embed"]["X_hespotex_image"]
    assert record["tta"] == "dihedral8" and record["context_um"] == 80.0
