"""Target normalisation as a model setting, test-time augmentation of embeddings (issue 9)."""

from __future__ import annotations

import numpy as np
import pytest
from model_configs import SMALL

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp._targets import normalize_counts, target_expression

pytestmark = pytest.mark.usefixtures("single_threaded")


def test_target_norms_follow_their_definitions(sample_factory):
    table = sample_factory(n_spots=30, n_genes=12, seed=4).tables["table"]
    counts = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, dtype=np.float64)
    genes = list(table.var_names[:5])
    lib_all = target_expression(table, genes, target_norm="library_all")
    lib_mod = target_expression(table, genes, target_norm="library_modelled")
    raw = target_expression(table, genes, target_norm="log1p_counts")
    sub = counts[:, :5]
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(
            lib_all, np.log1p(np.nan_to_num(sub / counts.sum(1, keepdims=True) * 1e4)), rtol=1e-5
        )
        np.testing.assert_allclose(lib_mod, np.log1p(np.nan_to_num(sub / sub.sum(1, keepdims=True) * 1e4)), rtol=1e-5)
    np.testing.assert_allclose(raw, np.log1p(sub), rtol=1e-6)
    assert not np.allclose(lib_all, lib_mod)
    with pytest.raises(ValueError, match="Unknown target_norm"):
        normalize_counts(counts, target_norm="cpm")


def test_target_norm_needs_raw_counts(sample_factory):
    table = sample_factory(n_spots=20, n_genes=8).tables["table"]
    hx.pp.normalize(table)
    del table.layers["counts"]
    with pytest.raises(ValueError, match="keeps no raw counts"):
        target_expression(table, list(table.var_names), target_norm="library_modelled")


def test_saved_model_records_and_reapplies_target_norm(tmp_path):
    sections = {}
    for name, seed in (("a", 1), ("b", 2), ("t", 3)):
        sdata = hx.datasets.synthetic(
            n_spots=80, n_genes=15, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"s{name}"
        )
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
        sections[name] = sdata
    genes = list(sections["a"].tables["table"].var_names[:10])  # a subset: the two libraries differ
    config = ModelConfig.preset("hespotex", epochs=3, patience=None, **SMALL)
    model = hx.tl.train(
        [sections["a"], sections["b"]], genes=genes, config=config, target_norm="library_modelled", device="cpu"
    )
    assert model.target_norm == "library_modelled"
    loaded = hx.tl.HESpotEx.load(model.save(tmp_path / "m"))
    assert loaded.target_norm == "library_modelled"
    out = hx.tl.predict(sections["t"], loaded, device="cpu")
    params = out.uns["hespotex"]["params"]
    assert params["target_norm"] == "library_modelled"
    assert "modelled genes" in params["target"]
    # the measured layer beside the prediction is normalised like the model's targets
    expected = target_expression(sections["t"].tables["table"], genes, target_norm="library_modelled")
    np.testing.assert_allclose(np.asarray(out.layers["measured"]), expected, rtol=1e-6)
    # evaluation against the sample reapplies the same normalisation
    scores = hx.tl.evaluate(out, truth=sections["t"])
    from hespotex.tl.evaluation._metrics import pearson_per_gene

    r = pearson_per_gene(expected, np.asarray(out.layers["hespotex"]))
    np.testing.assert_allclose(scores["pearson"].to_numpy(), r, rtol=1e-5, equal_nan=True)
    with pytest.raises(ValueError, match="Unknown target_norm"):
        hx.tl.train([sections["a"], sections["b"]], genes=genes, config=config, target_norm="cpm", device="cpu")


def test_tta_embeddings_average_the_eight_views(sample_factory):
    import torch

    from hespotex.pp._embed import dihedral_views

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = dihedral_views(x)
    assert len(views) == 8
    assert len({tuple(v[0, 0].flatten().tolist()) for v in views}) == 8  # all distinct
    sdata = sample_factory(n_spots=12, seed=5)
    hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32, key_added="plain")
    hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32, key_added="tta", tta=True)
    table = sdata.tables["table"]
    assert table.uns["hespotex_embed"]["tta"]["tta"] == "dihedral8"
    assert "tta" not in table.uns["hespotex_embed"]["plain"]
    assert table.uns["hespotex_embed"]["tta"]["cache_key"] != table.uns["hespotex_embed"]["plain"]["cache_key"]
    # the TTA embedding of a patch equals that of its mirror image (invariant to the dihedral group)
    patches = hx.pp.extract_patches(sdata, size=32)
    from hespotex.pp._encoders import load_encoder

    enc = load_encoder("efficientnet_lite0.imagenet", input_size=32)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    xb = (torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.inference_mode():
        a = sum(enc.model(v) for v in dihedral_views(xb)) / 8
        b = sum(enc.model(v) for v in dihedral_views(torch.flip(xb, dims=(-1,)))) / 8
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(table.obsm["plain"], table.obsm["tta"])


def test_slide_embedding_norm_is_recorded_and_reapplied(tmp_path):
    sections = {}
    for name, seed in (("a", 1), ("b", 2), ("t", 3)):
        sdata = hx.datasets.synthetic(
            n_spots=80, n_genes=12, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"s{name}"
        )
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
        sections[name] = sdata
    config = ModelConfig.preset("hespotex", epochs=3, patience=None, **SMALL)
    train = [sections["a"], sections["b"]]
    kw = {"genes": list(sections["a"].tables["table"].var_names), "config": config, "device": "cpu"}
    slide = hx.tl.HESpotEx.load(hx.tl.train(train, embedding_norm="slide", **kw).save(tmp_path / "slide"))
    plain = hx.tl.train(train, **kw)
    assert slide.embedding_norm == "slide" and plain.embedding_norm == "training"
    table = sections["t"].tables["table"]
    shifted = table.copy()
    key = "X_hespotex_image"
    shifted.obsm[key] = table.obsm[key] * 1.7 + 0.3  # a stain-like shift of every embedding feature

    def run(model, t):
        out = hx.tl.predict(t.copy(), model, device="cpu")
        return out, np.asarray(out.layers["hespotex"])

    out, a = run(slide, table)
    assert out.uns["hespotex"]["params"]["embedding_norm"] == "slide"
    np.testing.assert_allclose(a, run(slide, shifted)[1], rtol=1e-3, atol=1e-4)  # invariant: the slide's own statistics
    assert not np.allclose(run(plain, table)[1], run(plain, shifted)[1], atol=1e-3)  # the training statistics are not
    with pytest.raises(ValueError, match="Unknown embedding_norm"):
        hx.tl.train(train, embedding_norm="macenko", **kw)
