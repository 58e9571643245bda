"""Macenko stain normalisation before the encoder: reference from the training slides, one stain estimate per slide,
recorded in the model and re-applied at prediction (in memory and streamed)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
from model_configs import TINY as SMALL
from synthetic_sections import trio

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp._stain_norm import fit_stain, normalize_patches

pytestmark = pytest.mark.usefixtures("single_threaded")

ENC = "efficientnet_lite0.imagenet"


def _pixels(patches: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 patches -> (m, 3) pixels."""
    return patches.reshape(-1, 3)


def _restain(patches: np.ndarray) -> np.ndarray:
    """A re-stained copy (n, h, w, 3) uint8: haematoxylin stronger, eosin weaker, a small shift, in HED space."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(patches.astype(np.float64) / 255.0)
    hed = hed * np.array([1.3, 0.75, 1.0]) + np.array([0.02, -0.01, 0.0])
    return np.clip(hed2rgb(hed) * 255 + 0.5, 0, 255).astype(np.uint8)


def _normalise(patches: np.ndarray, source: dict, reference: dict) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.moveaxis(patches, -1, 1).astype(np.float32) / 255.0)
    return np.moveaxis(normalize_patches(x, source, reference).numpy(), 1, -1) * 255.0


@pytest.fixture(scope="module")
def her2st_patches(shared_data):
    """The training section C2 (for the reference) and 48 spot patches of the held-out section C3 (uint8)."""
    sections = hx.datasets.her2st(shared_data / "her2st", sections=["C2", "C3"])
    patches = hx.pp.extract_patches(sections["C3"], patch_um=100, size=96)[:48]
    return sections, np.ascontiguousarray(patches)


@pytest.mark.realdata
def test_mapping_is_torchstains_macenko_with_the_slide_stain_fixed(her2st_patches):
    """On one patch whose 'slide' estimate is that patch's own, the mapping equals torchstain's normalize."""
    import torchstain

    _, patches = her2st_patches
    patch = patches[5]
    reference = fit_stain(_pixels(patches[:24]), what="reference patches")
    lib = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    lib.HERef, lib.maxCRef = np.asarray(reference["stain_matrix"]), np.asarray(reference["max_concentrations"])
    with np.errstate(all="ignore"):
        expected, _, _ = lib.normalize(patch, stains=False)
    ours = _normalise(patch[None], fit_stain(_pixels(patch), what="the patch"), reference)[0]
    # torchstain truncates to uint8; ours is float
    assert np.abs(ours - expected.astype(np.float64)).max() <= 1.01
    assert np.abs(ours - patch).mean() > 2  # and it did change the patch


@pytest.mark.realdata
def test_restained_real_patches_come_back_towards_the_original(her2st_patches):
    sections, patches = her2st_patches
    reference = hx.pp.stain_reference({"C2": sections["C2"]}, patch_um=100)
    assert reference["fitted_on"] == ["C2"] and reference["method"] == "macenko"  # the training slide only
    assert "torchstain" in reference["library"]
    restained = _restain(patches)
    before = np.abs(restained.astype(np.float64) - patches).mean()
    # each copy of the held-out slide gets its own stain estimate (from all its patches), mapped to the reference
    own = fit_stain(_pixels(patches), what="C3")
    own_restained = fit_stain(_pixels(restained), what="C3 re-stained")
    assert not np.allclose(own["stain_matrix"], own_restained["stain_matrix"], atol=1e-3)
    after = np.abs(_normalise(restained, own_restained, reference) - _normalise(patches, own, reference)).mean()
    assert before > 8  # the perturbation is visible
    assert after < 0.5 * before
    # per patch: most patches are closer after normalisation
    per_before = np.abs(restained.astype(np.float64) - patches).mean(axis=(1, 2, 3))
    per_after = np.abs(_normalise(restained, own_restained, reference) - _normalise(patches, own, reference)).mean(
        axis=(1, 2, 3)
    )
    assert (per_after < per_before).mean() > 0.9


def _sections(n_spots: int = 60):
    return trio("s", n_spots=n_spots)


def test_embed_needs_a_valid_reference_and_tissue(sample_factory):
    from hespotex.io import build_sample

    s = _sections()
    ref = hx.pp.stain_reference([s["a"], s["b"]], input_size=32)
    with pytest.raises(ValueError, match="needs the reference stain of the training slides"):
        hx.pp.embed(s["t"], encoder=ENC, input_size=32, stain_norm="macenko")
    with pytest.raises(ValueError, match="Unknown stain_norm 'vahadane'"):
        hx.pp.embed(s["t"], encoder=ENC, input_size=32, stain_norm="vahadane", stain_reference=ref)
    with pytest.raises(ValueError, match="without stain_norm"):
        hx.pp.embed(s["t"], encoder=ENC, input_size=32, stain_reference=ref)
    bad = {**ref, "stain_matrix": [[1.0, 0.0]]}
    with pytest.raises(ValueError, match="stain_matrix should be 3 x 2"):
        hx.pp.embed(s["t"], encoder=ENC, input_size=32, stain_norm="macenko", stain_reference=bad)
    # a slide with nothing but background: its own stain cannot be estimated
    rng = np.random.default_rng(0)
    xy = rng.uniform(50, 350, (20, 2))
    blank = build_sample(
        np.full((400, 400, 3), 245, dtype=np.uint8), xy, rng.poisson(2, (20, 5)), sample_id="blank",
        obs=pd.DataFrame(index=[f"b{i}" for i in range(20)]), var=pd.DataFrame(index=[f"g{i}" for i in range(5)]),
        microns_per_pixel=1.0, spot_diameter_um=55.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"Cannot estimate the stain of slide 'blank': 0 of .* tissue"):
        hx.pp.embed(blank, encoder=ENC, input_size=32, stain_norm="macenko", stain_reference=ref)
    assert "X_hespotex_image" not in blank.tables["table"].obsm  # nothing written


def test_train_records_the_reference_and_predict_reapplies_it(tmp_path):
    s = _sections()
    genes = list(s["a"].tables["table"].var_names)
    config = ModelConfig.preset("hespotex", epochs=3, patience=None, **SMALL)
    kw = {"genes": genes, "config": config, "device": "cpu", "validation": 0.2}
    # embedded beforehand (small input) with a reference fitted on the training samples only
    ref = hx.pp.stain_reference({"sa": s["a"], "sb": s["b"]}, input_size=32)
    plain = {n: copy.deepcopy(s[n]) for n in ("a", "b", "t")}
    for n in ("a", "b"):
        hx.pp.embed(s[n], encoder=ENC, input_size=32, stain_norm="macenko", stain_reference=ref)
        hx.pp.embed(plain[n], encoder=ENC, input_size=32)
    rec = s["a"].tables["table"].uns["hespotex_embed"]["X_hespotex_image"]["stain_norm"]
    assert rec["reference"]["fitted_on"] == ["sa", "sb"] and rec["slide"]["tissue_pixels"] > 0
    assert not np.allclose(rec["slide"]["stain_matrix"], rec["reference"]["stain_matrix"], atol=1e-4)
    emb_norm = s["a"].tables["table"].obsm["X_hespotex_image"]
    assert not np.allclose(emb_norm, plain["a"].tables["table"].obsm["X_hespotex_image"], atol=1e-3)
    model = hx.tl.train([s["a"], s["b"]], stain_norm="macenko", **kw)
    assert model.embedding["stain_norm"]["reference"] == json.loads(json.dumps(ref))
    # saved and loaded: the reference is in setup.json and re-applied
    folder = model.save(tmp_path / "m")
    setup = json.loads((folder / "setup.json").read_text())
    assert setup["embedding"]["stain_norm"]["reference"]["stain_matrix"] == ref["stain_matrix"]
    loaded = hx.tl.HESpotEx.load(folder)
    # in memory: the new slide is embedded with its own stain estimate mapped to the model's reference
    mem = copy.deepcopy(s["t"])
    out = hx.tl.predict(mem, loaded, device="cpu")
    trec = mem.tables["table"].uns["hespotex_embed"]["X_hespotex_image"]["stain_norm"]
    assert trec["reference"]["stain_matrix"] == ref["stain_matrix"]
    assert not np.allclose(trec["slide"]["stain_matrix"], rec["slide"]["stain_matrix"], atol=1e-6)  # its own
    assert out.uns["hespotex"]["params"]["stain_norm"] == "macenko"
    same = copy.deepcopy(s["t"])
    hx.pp.embed(same, encoder=ENC, input_size=32, stain_norm="macenko", stain_reference=model.embedding["stain_norm"])
    np.testing.assert_allclose(
        mem.tables["table"].obsm["X_hespotex_image"], same.tables["table"].obsm["X_hespotex_image"], atol=1e-6
    )
    a = np.asarray(out.layers["hespotex"])
    b = np.asarray(hx.tl.predict(copy.deepcopy(s["t"]), model, device="cpu").layers["hespotex"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # streamed: the same embeddings and predictions
    streamed = hx.tl.predict(copy.deepcopy(s["t"]), loaded, device="cpu", out=tmp_path / "t.zarr", chunk_size=25)
    np.testing.assert_allclose(np.asarray(streamed.layers["hespotex"]), a, rtol=1e-4, atol=1e-5)
    assert streamed.uns["hespotex"]["params"]["stain_norm"] == "macenko"
    # a slide embedded without the normalisation (or to another reference) is refused, saying why
    hx.pp.embed(plain["t"], encoder=ENC, input_size=32)
    with pytest.raises(ValueError, match=r"macenko normalisation to the reference fitted on .*no stain normalisation"):
        hx.tl.predict(plain["t"], loaded, device="cpu")
    other = hx.pp.stain_reference({"st": s["t"]}, input_size=32)
    moved = copy.deepcopy(s["t"])
    hx.pp.embed(moved, encoder=ENC, input_size=32, stain_norm="macenko", stain_reference=other)
    with pytest.raises(ValueError, match=r"fitted on \['st'\]"):
        hx.tl.predict(moved, loaded, device="cpu")
    # training on samples embedded without it, asking for it: refused
    with pytest.raises(ValueError, match="made without stain normalisation"):
        hx.tl.train([plain["a"], plain["b"]], stain_norm="macenko", **kw)
    # a damaged reference in setup.json is refused at load
    setup["embedding"]["stain_norm"]["reference"]["max_concentrations"] = [1.0, -1.0]
    (folder / "setup.json").write_text(json.dumps(setup))
    with pytest.raises(ValueError, match="valid stain reference"):
        hx.tl.HESpotEx.load(folder)


@pytest.mark.slow
def test_train_fits_the_reference_on_its_samples_when_it_embeds(tmp_path):
    s = _sections(n_spots=40)
    config = ModelConfig.preset("hespotex", epochs=2, patience=None, **SMALL)
    genes = list(s["a"].tables["table"].var_names)
    model = hx.tl.train(
        [s["a"], s["b"]], genes=genes, config=config, device="cpu", validation=0.2, stain_norm="macenko", encoder=ENC
    )
    ref = model.embedding["stain_norm"]["reference"]
    assert ref["fitted_on"] == ["sa", "sb"]
    for n in ("a", "b"):
        rec = s[n].tables["table"].uns["hespotex_embed"]["X_hespotex_image"]["stain_norm"]
        assert rec["reference"] == ref
