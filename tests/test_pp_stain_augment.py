"""Stain augmentation of training patches: views embedded once and cached, one drawn per spot per epoch, recorded in
the model."""

from __future__ import annotations

import numpy as np
import pytest
from model_configs import TINY as SMALL

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp._stain_augment import jitter_params, sample_views, stain_jitter, views_key

pytestmark = pytest.mark.usefixtures("single_threaded")

ENC = "efficientnet_lite0.imagenet"


def _he_patches(n: int = 6, size: int = 24) -> np.ndarray:
    """Pink/purple H&E-like patches (n, 3, h, w) in [0, 1], built in HED space."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng(0)
    hed = np.stack(
        [rng.uniform(0.02, 0.12, (n, size, size)), rng.uniform(0.02, 0.1, (n, size, size)), np.zeros((n, size, size))],
        -1,
    )
    return np.moveaxis(hed2rgb(hed), -1, 1).astype(np.float32)


def test_stain_views_change_colour_statistics():
    from skimage.color import rgb2hed

    x = _he_patches()
    params = jitter_params(len(x), 3, seed=0)
    spots = np.arange(len(x))
    views = [stain_jitter(x, params, v, spots) for v in range(3)]
    assert all(v.shape == x.shape and v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1 for v in views)

    def stain_means(p):  # mean haematoxylin and eosin density per patch
        return rgb2hed(np.moveaxis(p.astype(np.float64), 1, -1)).mean(axis=(1, 2))[:, :2]

    clean = stain_means(x)
    for v in views:
        assert np.abs(stain_means(v) - clean).max() > 5e-3  # the stains moved
    assert np.abs(stain_means(views[0]) - stain_means(views[1])).max() > 5e-3  # views differ from each other
    # seeded: the same seed gives the same views, another seed others
    np.testing.assert_array_equal(views[0], stain_jitter(x, jitter_params(len(x), 3, seed=0), 0, spots))
    assert not np.allclose(views[0], stain_jitter(x, jitter_params(len(x), 3, seed=1), 0, spots))


def test_embed_stain_augment_stores_and_caches_views(sample_factory):
    sdata = sample_factory(n_spots=10, seed=4)
    hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="plain")
    hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="aug", stain_augment=3)
    table = sdata.tables["table"]
    views = table.obsm[views_key("aug")]
    assert views.shape == (10, 3, table.obsm["aug"].shape[1])
    np.testing.assert_allclose(
        table.obsm["aug"], table.obsm["plain"], rtol=1e-5, atol=1e-6
    )  # the clean embedding is unchanged
    for v in range(3):
        assert not np.allclose(views[:, v], table.obsm["plain"], atol=1e-3)
    assert not np.allclose(views[:, 0], views[:, 1], atol=1e-3)
    rec = table.uns["hespotex_embed"]["aug"]
    assert rec["stain_augment"]["n_views"] == 3 and rec["stain_augment"]["method"] == "hed_jitter"
    assert "stain_augment" not in table.uns["hespotex_embed"]["plain"]
    assert rec["cache_key"] != table.uns["hespotex_embed"]["plain"]["cache_key"]
    # cached with the embeddings: a second sample with the same image gets the same views from disk
    from hespotex.pp import _embed

    other = sample_factory(n_spots=10, seed=4)
    calls = []
    original = _embed.encode_patches
    _embed.encode_patches = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        hx.pp.embed(other, encoder=ENC, input_size=32, key_added="aug", stain_augment=3)
    finally:
        _embed.encode_patches = original
    assert calls == []
    np.testing.assert_array_equal(other.tables["table"].obsm[views_key("aug")], views)
    with pytest.raises(ValueError, match="stain_augment to be a number of views"):
        hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="bad", stain_augment=-1)


def test_sample_views_draws_among_clean_and_views():
    n, k, d = 2000, 3, 2
    emb = np.zeros((n, d), dtype=np.float32)
    views = np.broadcast_to(np.arange(1, k + 1, dtype=np.float32)[None, :, None], (n, k, d)).copy()
    drawn = sample_views(emb, views, np.random.default_rng(0))[:, 0]
    counts = np.bincount(drawn.astype(int), minlength=k + 1)
    assert (counts > n / (k + 1) * 0.8).all()  # the clean one and every view are drawn, about equally
    assert not np.array_equal(drawn, sample_views(emb, views, np.random.default_rng(1))[:, 0])  # a new draw per epoch
    with pytest.raises(ValueError, match="Expected stain views of shape"):
        sample_views(emb, views[:10], np.random.default_rng(0))


def _sections():
    sections = {}
    for name, seed in (("a", 1), ("b", 2), ("t", 3)):
        sdata = hx.datasets.synthetic(
            n_spots=60, n_genes=10, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"s{name}"
        )
        hx.pp.embed(sdata, encoder=ENC, input_size=32, stain_augment=2)
        sections[name] = sdata
    return sections


def test_train_stain_augment_uses_views_is_recorded_and_predicts_on_clean(tmp_path):
    import torch

    sections = _sections()
    train = [sections["a"], sections["b"]]
    config = ModelConfig.preset("hespotex", epochs=4, patience=None, **SMALL)
    kw = {"genes": list(sections["a"].tables["table"].var_names), "config": config, "device": "cpu", "validation": 0.2}
    aug = hx.tl.train(train, stain_augment=True, **kw)
    plain = hx.tl.train(train, stain_augment=False, **kw)
    # the default (None) trains on the views the samples carry: the same model as stain_augment=True
    default = hx.tl.train(train, **kw)
    assert default.stain_augment == aug.stain_augment
    assert all(torch.equal(v, aug.module_.state_dict()[k]) for k, v in default.module_.state_dict().items())
    assert aug.stain_augment["n_views"] == 2 and aug.stain_augment["key"] == views_key("X_hespotex_image")
    assert plain.stain_augment is None
    # the sampler draws from the views: with views equal to the clean embeddings training is exactly the plain one
    same = [s for s in (hx.datasets.synthetic(n_spots=60, n_genes=10, seed=seed, program_seed=0, microns_per_pixel=1.0,
                                              sample_id=f"s{n}")
                        for n, seed in (("a", 1), ("b", 2)))]  # fmt: skip
    for s, src in zip(same, train, strict=True):
        t, st = s.tables["table"], src.tables["table"]
        t.obsm["X_hespotex_image"] = st.obsm["X_hespotex_image"].copy()
        t.uns["hespotex_embed"] = dict(st.uns["hespotex_embed"])
        t.obsm[views_key("X_hespotex_image")] = np.repeat(st.obsm["X_hespotex_image"][:, None], 2, axis=1)
    ident = hx.tl.train(same, stain_augment=True, **kw)
    w = {k: v for k, v in plain.module_.state_dict().items()}
    assert all(torch.equal(v, ident.module_.state_dict()[k]) for k, v in w.items())
    assert not all(torch.equal(v, aug.module_.state_dict()[k]) for k, v in w.items())  # the real views changed training
    # saved and loaded: the setting is recorded, prediction runs on clean embeddings alone
    loaded = hx.tl.HESpotEx.load(aug.save(tmp_path / "aug"))
    assert loaded.stain_augment == aug.stain_augment
    test = sections["t"].tables["table"].copy()
    del test.obsm[views_key("X_hespotex_image")]
    out = hx.tl.predict(test.copy(), aug, device="cpu")
    assert out.uns["hespotex"]["params"]["stain_augment_views"] == 2
    a = np.asarray(out.layers["hespotex"])
    b = np.asarray(hx.tl.predict(test.copy(), loaded, device="cpu").layers["hespotex"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.isfinite(a).all()
    # an ensemble records it too
    ens = hx.tl.train(
        list(sections.values()), stain_augment=True, ensemble=True, **{k: v for k, v in kw.items() if k != "validation"}
    )
    assert ens.stain_augment["n_views"] == 2 and all(m.stain_augment for m in ens.members)
    # samples without views: a clear error
    for s in train:
        del s.tables["table"].obsm[views_key("X_hespotex_image")]
    with pytest.raises(KeyError, match="stain_augment=True needs stain-augmented views"):
        hx.tl.train(train, stain_augment=True, **kw)


def test_default_stain_augment_is_on_when_train_embeds_or_views_exist():
    from hespotex.pp._stain_augment import default_stain_augment

    def section(seed, *, views=None):
        sdata = hx.datasets.synthetic(n_spots=20, n_genes=5, seed=seed, microns_per_pixel=1.0, sample_id=f"d{seed}")
        table = sdata.tables["table"]
        if views is not None:
            table.obsm["X_hespotex_image"] = np.zeros((table.n_obs, 4), dtype=np.float32)
            if views:
                table.obsm[views_key("X_hespotex_image")] = np.zeros((table.n_obs, 2, 4), dtype=np.float32)
        return sdata

    assert default_stain_augment({"a": section(1), "b": section(2)}, "X_hespotex_image")  # train embeds both
    assert default_stain_augment({"a": section(1, views=True), "b": section(2)}, "X_hespotex_image")
    # a sample embedded beforehand without views: they cannot be made there, so clean embeddings only
    assert not default_stain_augment({"a": section(1, views=False), "b": section(2)}, "X_hespotex_image")


def test_zoomed_views_cut_each_view_at_its_own_field_of_view(sample_factory):
    from hespotex.pp._patches import plan_patches, resize_batch
    from hespotex.pp._stain_augment import zoom_factors, zoomed_views

    sdata = sample_factory(n_spots=6, seed=2)
    plan = plan_patches(sdata, out_px=32)
    idx = np.arange(6)
    wide = int(np.ceil(plan.size * 1.3))
    factors = np.stack([np.ones(6), np.full(6, wide / plan.size), np.full(6, 0.7)])  # as is, widest, zoomed in
    views = zoomed_views(plan, idx, factors, 32)
    assert [tuple(v.shape) for v in views] == [(6, 3, 32, 32)] * 3
    # factor 1: exactly the plain patch; the widest: the crop read `wide` pixels across about the same centre
    np.testing.assert_array_equal(views[0].numpy(), resize_batch(plan.read(idx), 32).numpy())
    np.testing.assert_array_equal(views[1].numpy(), resize_batch(plan.read_around(idx, wide), 32).numpy())
    assert not np.allclose(views[2].numpy(), views[0].numpy(), atol=1e-2)  # zoomed in: other pixels
    # the wider crop holds the plain one at its centre
    around = plan.read_around(idx, plan.size + 10)
    np.testing.assert_array_equal(around[:, :, 5 : 5 + plan.size, 5 : 5 + plan.size], plan.read(idx))
    # factors: log-uniform within [1 / 1.15, 1.15], seeded, and the stain jitter of the same seed unchanged
    z = zoom_factors(500, 3, seed=0, scale_augment=0.15)
    assert z.shape == (3, 500) and z.min() >= 1 / 1.15 - 1e-12 and z.max() <= 1.15 + 1e-12
    assert abs(np.log(z).mean()) < 0.02 and z.min() < 0.9 and z.max() > 1.1
    np.testing.assert_array_equal(z, zoom_factors(500, 3, seed=0, scale_augment=0.15))


def test_embed_scale_augment_records_its_range_and_rejects_bad_values(sample_factory):
    sdata = sample_factory(n_spots=10, seed=4)
    hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="aug", stain_augment=2, cache=False)
    hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="zoom", stain_augment=2, scale_augment=0.15, cache=False)
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["zoom"], table.obsm["aug"], rtol=1e-5, atol=1e-6)  # clean unchanged
    assert not np.allclose(table.obsm[views_key("zoom")], table.obsm[views_key("aug")], atol=1e-3)
    rec, plain = table.uns["hespotex_embed"]["zoom"], table.uns["hespotex_embed"]["aug"]
    assert rec["stain_augment"]["method"] == "hed_jitter+zoom"
    np.testing.assert_allclose(rec["stain_augment"]["ranges"]["zoom"], [1 / 1.15, 1.15])
    assert "zoom" not in plain["stain_augment"]["ranges"] and rec["cache_key"] != plain["cache_key"]
    with pytest.raises(ValueError, match="stain_augment=0 makes none"):
        hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="bad", scale_augment=0.15)
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=r"scale_augment .*\[0, 1\)"):
            hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="bad", stain_augment=2, scale_augment=bad)


def test_turned_views_are_the_dihedral_transforms_and_recorded(sample_factory):
    import torch

    from hespotex.pp._encode import dihedral_views
    from hespotex.pp._stain_augment import turn_choices, turned

    x = torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    turns = np.arange(8)
    out = turned(x, turns)
    for i in range(8):  # patch i in transform i: the i-th of the 8 dihedral views, in their order
        torch.testing.assert_close(out[i], dihedral_views(x[i : i + 1])[i][0])
    t = turn_choices(400, 3, seed=0)
    assert t.shape == (3, 400) and set(np.unique(t)) == set(range(8))
    np.testing.assert_array_equal(t, turn_choices(400, 3, seed=0))
    sdata = sample_factory(n_spots=10, seed=4)
    hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="aug", stain_augment=2, cache=False)
    hx.pp.embed(
        sdata, encoder=ENC, input_size=32, key_added="turn", stain_augment=2, dihedral_augment=True, cache=False
    )
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["turn"], table.obsm["aug"], rtol=1e-5, atol=1e-6)  # clean unchanged
    assert not np.allclose(table.obsm[views_key("turn")], table.obsm[views_key("aug")], atol=1e-3)
    rec = table.uns["hespotex_embed"]["turn"]
    assert rec["stain_augment"]["method"] == "hed_jitter+dihedral"
    assert rec["cache_key"] != table.uns["hespotex_embed"]["aug"]["cache_key"]
    with pytest.raises(ValueError, match="stain_augment=0 makes none"):
        hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="bad", dihedral_augment=True)
    with pytest.raises(ValueError, match="dihedral_augment to be True or False"):
        hx.pp.embed(sdata, encoder=ENC, input_size=32, key_added="bad", stain_augment=2, dihedral_augment="yes")
