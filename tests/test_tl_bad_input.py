"""The HESpotEx tool layer refuses bad input with clear errors, and never half-writes a model or a result."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.tl.model._data import EMBEDDING_KEY

pytestmark = pytest.mark.usefixtures("single_threaded")
ENCODER = "efficientnet_lite0.imagenet"
INPUT_SIZE = 64
TINY = ModelConfig.preset(
    "hespotex",
    epochs=2,
    ae_epochs=2,
    ae_hidden_dim=32,
    latent_dim=16,
    projection_hidden_dim=32,
    head_hidden_dim=32,
    decoder_heads=2,
)


def _section(seed: int, n_spots: int = 150):
    return hx.datasets.synthetic(
        n_spots=n_spots, n_genes=40, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"s{seed}"
    )


@pytest.fixture(scope="module")
def pair():
    """Two embedded sections; the second also embedded with another encoder and another patch size."""
    s1, s2 = _section(21), _section(22)
    for s in (s1, s2):
        hx.pp.embed(s, encoder=ENCODER, input_size=INPUT_SIZE)
    hx.pp.embed(s2, encoder="resnet18", input_size=INPUT_SIZE, key_added="X_resnet")
    hx.pp.embed(s2, encoder=ENCODER, input_size=INPUT_SIZE, patch_um=60.0, key_added="X_small")
    return s1, s2


@pytest.fixture(scope="module")
def genes(pair):
    return list(pair[0].tables["table"].var_names[:30])


@pytest.fixture(scope="module")
def model(pair, genes):
    return hx.tl.train(pair[0], genes=genes, config=TINY, validation=None, seed=0, device="cpu")


def _table(pair, i: int, genes=None):
    """A copy of section ``i``'s table (restricted to ``genes``): tests never write to the fixtures."""
    table = pair[i].tables["table"]
    return (table if genes is None else table[:, genes]).copy()


# ---------------------------------------------------------------------------------------------- embeddings
def test_slide_embedded_with_another_encoder_is_refused(pair, genes, model):
    table = _table(pair, 1, genes)
    with pytest.raises(
        ValueError, match=r"trained on embeddings of 'efficientnet_lite0.imagenet'.*'resnet18'.*Re-embed it"
    ):
        hx.tl.predict(table, model, use_rep="X_resnet", device="cpu")
    assert "hespotex" not in table.layers and "X_hespotex" not in table.obsm


def test_slide_embedded_with_another_patch_size_is_refused(pair, genes, model):
    table = _table(pair, 1, genes)
    with pytest.raises(ValueError, match=r"at 55.0 µm patches; this slide's were made .* at 60.0 µm"):
        hx.tl.predict(table, model, use_rep="X_small", device="cpu")
    assert "hespotex" not in table.layers


def test_training_samples_embedded_differently_are_refused(pair, genes):
    other = _table(pair, 1)
    other.obsm[EMBEDDING_KEY] = other.obsm["X_resnet"]
    other.uns["hespotex_embed"][EMBEDDING_KEY] = other.uns["hespotex_embed"]["X_resnet"]
    with pytest.raises(ValueError, match=r"Samples were embedded differently.*Re-embed them with one encoder"):
        hx.tl.train([_table(pair, 0), other], genes=genes, config=TINY, device="cpu")


def test_embeddings_without_record_and_of_the_wrong_width(pair, genes, model, caplog):
    table = _table(pair, 1, genes)
    table.obsm[EMBEDDING_KEY] = np.ones((table.n_obs, 7), dtype=np.float32)
    del table.uns["hespotex_embed"]
    width = len(model.embedding_mean_)
    with (
        caplog.at_level("WARNING", logger="hespotex"),
        pytest.raises(ValueError, match=f"embeddings of width {width}.*found 7"),
    ):
        hx.tl.predict(table, model, device="cpu")
    assert "has no record of its encoder" in caplog.text


def test_table_without_embeddings_or_image(pair, genes, model):
    table = _table(pair, 1, genes)
    del table.obsm[EMBEDDING_KEY]
    with pytest.raises(ValueError, match=r"no H&E image to cut patches from .*`image=`.*uns\['spatial'\].*hx.pp.embed"):
        hx.tl.predict(table, model, device="cpu")


def test_nan_embeddings(pair, genes, model):
    table = _table(pair, 1, genes)
    table.obsm[EMBEDDING_KEY][3, 5] = np.nan
    with pytest.raises(ValueError, match=r"obsm\['X_hespotex_image'\] holds NaN or infinite values in 1 spots"):
        hx.tl.train(table, genes=genes, config=TINY, device="cpu")
    with pytest.raises(ValueError, match="NaN or infinite values in 1 spots"):
        hx.tl.predict(table, model, device="cpu")
    assert "hespotex" not in table.layers


# ---------------------------------------------------------------------------------------------- genes and spots
def test_genes_missing_for_training(pair, genes):
    with pytest.raises(ValueError, match=r"1 of 3 given genes are absent from at least one sample, e\.g\. \['NOPE'\]"):
        hx.tl.train(_table(pair, 0), genes=[*genes[:2], "NOPE"], config=TINY, device="cpu")


def test_duplicate_or_no_genes_for_the_model(model):
    with pytest.raises(ValueError, match="unique genes, found 3 genes with 1 duplicates"):
        hx.tl.HESpotEx(["a", "b", "a"], embedding=model.embedding)
    with pytest.raises(ValueError, match="non-empty list"):
        hx.tl.HESpotEx([], embedding=model.embedding)


def test_too_few_spots_for_the_graph(pair, genes, model):
    few = _table(pair, 0, genes)[:5].copy()
    with pytest.raises(ValueError, match="has 5 spots, too few for the 8-neighbour graphs"):
        hx.tl.train(few, genes=genes, config=TINY, device="cpu")
    with pytest.raises(ValueError, match="The slide has 5 spots; the model's 6-neighbour graph needs at least 7"):
        hx.tl.predict(few, model, device="cpu")
    assert "hespotex" not in few.layers


def test_untrained_model_is_refused(pair, genes, model, tmp_path):
    untrained = hx.tl.HESpotEx(genes, embedding=model.embedding, config=TINY)
    with pytest.raises(RuntimeError, match="not trained yet"):
        hx.tl.predict(_table(pair, 1, genes), untrained, device="cpu")
    with pytest.raises(RuntimeError, match="not trained yet"):
        untrained.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- overwriting results
def test_existing_layer_needs_overwrite(pair, genes, model):
    table = _table(pair, 1, genes)  # same genes as the model: predictions go into this table
    out = hx.tl.predict(table, model, device="cpu")
    assert out is table
    first = table.layers["hespotex"].copy()
    table.layers["hespotex"][:] = -1.0  # mark the stored layer: a refused call must leave it alone
    with pytest.raises(
        ValueError, match=r"layers\['hespotex'\] already exists \(and obsm\['X_hespotex'\].*\); pass `overwrite=True`"
    ):
        hx.tl.predict(table, model, device="cpu")
    assert (table.layers["hespotex"] == -1.0).all()
    hx.tl.predict(table, model, device="cpu", overwrite=True)
    np.testing.assert_array_equal(table.layers["hespotex"], first)
    hx.tl.predict(table, model, device="cpu", key_added="again")  # another key needs no overwrite
    np.testing.assert_array_equal(table.layers["again"], first)


def test_existing_table_of_a_spatialdata_needs_overwrite(model):
    sdata = _section(23, n_spots=60)  # 40 genes, the model has 30: predictions go to a new table
    first = hx.tl.predict(sdata, model, device="cpu")
    assert sdata.tables["hespotex"] is first
    with pytest.raises(ValueError, match="already has a table 'hespotex'; pass `overwrite=True`"):
        hx.tl.predict(sdata, model, device="cpu")
    assert sdata.tables["hespotex"] is first
    second = hx.tl.predict(sdata, model, device="cpu", overwrite=True)
    assert sdata.tables["hespotex"] is second and second is not first
    np.testing.assert_array_equal(second.layers["hespotex"], first.layers["hespotex"])
    # the spot table holds the same prediction (obsm DataFrame), replaced too
    np.testing.assert_allclose(sdata.tables["table"].obsm["hespotex"].to_numpy(), second.layers["hespotex"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture(scope="module")
def other_gene_count(pair, genes, tmp_path_factory):
    """A model of 20 genes, saved: its weights do not fit a 30-gene setup."""
    m = hx.tl.train(pair[0], genes=genes[:20], config=TINY, validation=None, seed=0, device="cpu")
    return m.save(tmp_path_factory.mktemp("other") / "model")


def _corrupt(path, kind: str, other) -> None:
    weights, setup = path / "model.safetensors", path / "setup.json"
    if kind == "no setup.json":
        setup.unlink()
    elif kind == "no weights":
        weights.unlink()
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage json":
        setup.write_text("{not json")
    elif kind == "json list":
        setup.write_text("[]")
    elif kind == "weights of another gene count":
        shutil.copy(other / "model.safetensors", weights)
    elif kind == "other format":
        data = json.loads(setup.read_text())
        data["format_version"] = 99
        setup.write_text(json.dumps(data))
    elif kind == "setup without genes":
        data = json.loads(setup.read_text())
        del data["genes"]
        setup.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("no setup.json", FileNotFoundError, r"not a complete hespotex model folder: missing \['setup.json'\]"),
        ("no weights", FileNotFoundError, r"missing \['model.safetensors'\]"),
        ("truncated weights", ValueError, "is corrupt .*save the model again"),
        ("garbage json", ValueError, "is corrupt .*save the model again"),
        ("json list", ValueError, "is corrupt .*setup.json holds a JSON list"),
        ("weights of another gene count", ValueError, "do not fit the model its setup describes"),
        ("other format", ValueError, "Unsupported model format 99"),
        ("setup without genes", ValueError, r"cannot be read by this hespotex \(genes\); it is partial"),
    ],
)
def test_corrupt_or_partial_model_folder(saved, other_gene_count, tmp_path, kind, error, match):
    path = shutil.copytree(saved, tmp_path / "model")
    hx.tl.HESpotEx.load(path)  # the intact copy loads
    _corrupt(path, kind, other_gene_count)
    with pytest.raises(error, match=match):
        hx.tl.HESpotEx.load(path)


def test_predict_from_a_corrupt_folder_writes_nothing(pair, genes, saved, tmp_path):
    path = shutil.copytree(saved, tmp_path / "model")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    table = _table(pair, 1, genes)
    with pytest.raises(ValueError, match="is corrupt"):
        hx.tl.predict(table, path, device="cpu")
    assert "hespotex" not in table.layers


def test_save_over_an_existing_folder_needs_overwrite(model, tmp_path):
    path = model.save(tmp_path / "model")
    before = (path / "setup.json").read_text()
    (path / "note.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="already exists; pass `overwrite=True`"):
        model.save(path)
    assert (path / "note.txt").exists() and (path / "setup.json").read_text() == before
    model.save(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == [".hespotex.json", "README.md", "model.safetensors", "setup.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no old copy or temporary folder left
    hx.tl.HESpotEx.load(path)


def _interrupt_save(monkeypatch) -> None:
    """Make the weights writer die half-way through its file, as a crash or a full disk would."""
    import safetensors.torch

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 64)
        msg = "No space left on device"
        raise OSError(msg)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)


def test_interrupted_save_leaves_no_model(model, tmp_path, monkeypatch):
    _interrupt_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        model.save(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_model(model, pair, genes, tmp_path, monkeypatch):
    path = model.save(tmp_path / "model")
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    _interrupt_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        model.save(path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    monkeypatch.undo()
    table = _table(pair, 1, genes)
    expected = hx.tl.predict(table.copy(), model, device="cpu").layers["hespotex"]
    np.testing.assert_array_equal(hx.tl.predict(table, path, device="cpu").layers["hespotex"], expected)
