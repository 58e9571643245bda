"""``hx.tl.explain`` / ``patch_saliency`` of models trained on test-time-augmented (``hx.pp.embed(..., tta=True)``),
stain-normalised (``stain_norm="macenko"``) and stain-augmented embeddings: the pixel forward pass recomputes the
embedding the model actually used, so the attributions explain it (w.r.t. the patch as scanned).

The checks are independent of the attribution code where it matters: the stored embedding is recomputed in the test
with numpy flips / rotations (TTA) and a numpy Macenko mapping from the slide's recorded stain (stain
normalisation), and the baseline patch's score by the model's own whole-slide prediction with the target's
embedding replaced. The plain crop (what explain encoded before) is far from the stored embedding, so an
attribution that skipped the augmentation or the normalisation would fail them. Tiny models on synthetic sections
(as tests/test_explain_context.py).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from model_configs import TINY
from synthetic_sections import trio

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp._encoders import load_encoder
from hespotex.pp._patches import plan_patches, resize_batch
from hespotex.tl.explanation._attributions import _baseline_patch, patch_features
from hespotex.tl.explanation._explain import patch_saliency
from hespotex.tl.explanation._explain_inputs import stain_norm_pair
from hespotex.tl.model._data import GraphData, graph_data

pytestmark = pytest.mark.usefixtures("single_threaded")

ENC, SIZE, KEY = "efficientnet_lite0.imagenet", 32, "X_hespotex_image"


@pytest.fixture(scope="module")
def sections():
    """Two synthetic training sections and a test section (60 spots, 10 genes), never embedded: copy before use."""
    return trio("tta_")


@pytest.fixture(scope="module")
def tta(sections):
    """A model trained on TTA embeddings, explained at two spots from the blur baseline.

    128 integration steps: the convergence delta on this fixture (largest |delta| of the two spots, score changes
    0.23 and 0.51) is 0.037 at 32 steps, 0.0065 at 128 and 0.0027 at 256: at 128 within 3% of the score change."""
    s = copy.deepcopy(sections)
    for n in ("a", "b"):
        hx.pp.embed(s[n], encoder=ENC, input_size=SIZE, tta=True)
    model, test, gene = _train_on(s)
    return _explained(model, test, gene, n_steps=128)


@pytest.fixture(scope="module")
def stain(sections):
    """A model trained on Macenko stain-normalised embeddings, explained at two spots from the blur baseline.

    256 integration steps: the normalisation's clipping makes the path rougher (largest |delta| 0.23 at 16 steps,
    0.06 at 64, 0.019 at 128, 0.003 at 256, 0.003 at 1024; score changes 0.30 and 0.52)."""
    s = copy.deepcopy(sections)
    ref = hx.pp.stain_reference([s["a"], s["b"]], input_size=SIZE)
    for n in ("a", "b"):
        hx.pp.embed(s[n], encoder=ENC, input_size=SIZE, stain_norm="macenko", stain_reference=ref)
    model, test, gene = _train_on(s, stain_norm="macenko")
    return _explained(model, test, gene, n_steps=256)


def _train_on(s, **options):
    genes = list(s["a"].tables["table"].var_names)
    config = ModelConfig.preset("hespotex", epochs=3, patience=None, **TINY)
    model = hx.tl.train([s["a"], s["b"]], genes=genes, config=config, device="cpu", validation=0.2, seed=0, **options)
    hx.tl.predict(s["t"], model, device="cpu")  # embeds the test section as the model expects
    return model, s["t"], genes[0]


def _explained(model, test, gene, *, n_steps):
    logger = logging.getLogger("hespotex")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        ex = hx.tl.explain(test, model, genes=gene, n_spots=2, baseline="blur", n_steps=n_steps, neighbours=False)
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    return {"model": model, "test": test, "gene": gene, "ex": ex, "warnings": warnings}


def _crops(model, test, spots) -> torch.Tensor:
    """The float ``(n, 3, S, S)`` crops hx.pp.embed encodes (its plan and resizing), before any normalisation."""
    table = test.tables["table"]
    plan = plan_patches(test, patch_um=model.embedding["patch_um"], out_px=SIZE)
    return resize_batch(plan.read(table.obs_names.get_indexer(spots)), SIZE)


def _dihedral_mean(enc, x: torch.Tensor) -> np.ndarray:
    """The mean feature over the 8 flips / quarter turns of ``x``, made with numpy and the public encoder."""
    a = x.numpy()
    views = [np.rot90(v, k, axes=(-2, -1)) for v in (a, np.flip(a, axis=-1)) for k in range(4)]
    with torch.no_grad():
        return np.mean([enc.encode(torch.from_numpy(np.ascontiguousarray(v))).numpy() for v in views], axis=0)


def _macenko(x: torch.Tensor, slide: dict, reference: dict) -> torch.Tensor:
    """Macenko's mapping from the ``slide`` stain to the ``reference`` in numpy (float64)."""
    od = -np.log((x.numpy().astype(np.float64) * 255.0 + 1.0) / 240.0)
    conc = np.einsum("sc,nchw->nshw", np.linalg.pinv(np.asarray(slide["stain_matrix"])), od)
    conc *= (np.asarray(reference["max_concentrations"]) / np.asarray(slide["max_concentrations"]))[None, :, None, None]
    out = 240.0 * np.exp(-np.einsum("cs,nshw->nchw", np.asarray(reference["stain_matrix"]), conc))
    return torch.from_numpy((np.clip(out, 0, 255) / 255.0).astype(np.float32))


def _rescore(model, test, gene):
    """``score(spot, row)``: the model's whole-slide prediction of ``gene`` at ``spot`` with its embedding ``row``."""
    table = test.tables["table"]
    sample = graph_data(table, "t", genes=None)
    g = model.genes.index(gene)

    def score(spot: str, row: np.ndarray) -> float:
        t = table.obs_names.get_loc(spot)
        emb = sample.emb.copy()
        emb[t] = row
        return float(
            model.predict_graph(GraphData("t", emb, sample.coords_um), device="cpu", smooth=0.5)["expression"][t, g]
        )

    return score


def _stored(test, spots) -> np.ndarray:
    table = test.tables["table"]
    return np.asarray(table.obsm[KEY])[table.obs_names.get_indexer(spots)]


def _check_complete(ex):
    """Integrated gradients complete within explain's own bound (the fixtures' step counts give under 3%)."""
    change = ex.pixel_score - ex.pixel_baseline_score
    assert (np.abs(change) > 1e-2).all()  # the baseline moves the score: not 0 == 0
    np.testing.assert_allclose(ex.pixel_attribution_sum - change, ex.pixel_delta, atol=1e-4)
    assert (np.abs(ex.pixel_delta) < 0.03 * np.abs(change) + 0.005).all(), (ex.pixel_delta, change)


def test_tta_forward_pass_recomputes_the_stored_embedding(tta):
    ex, model, test = tta["ex"], tta["model"], tta["test"]
    assert model.embedding["tta"] == "dihedral8" and ex.params["tta"] == "dihedral8"
    assert ex.params["attributed_to"] == "patch as scanned"
    enc = load_encoder(ENC, input_size=SIZE)
    x, stored = _crops(model, test, ex.spots), _stored(test, ex.spots)
    scale = np.abs(stored).max()
    # the test's own dihedral mean is what hx.pp.embed stored (float rounding only)
    assert np.abs(_dihedral_mean(enc, x) - stored).max() / scale < 1e-5
    with torch.no_grad():
        forward = patch_features(enc, x, tta=True).numpy()
        plain = patch_features(enc, x).numpy()
    # explain's forward pass gives it to float rounding (measured 1e-6 of the largest feature); the plain crop,
    # what explain encoded before, is 24% off
    assert np.abs(forward - stored).max() / scale < 1e-5
    assert np.abs(plain - stored).max() / scale > 0.05
    np.testing.assert_allclose(ex.pixel_score, ex.score, atol=1e-5)
    assert not [w for w in tta["warnings"] if "differ from the stored" in w or "incomplete" in w], tta["warnings"]


def test_tta_completeness_and_baseline_through_the_views(tta):
    ex, model, test = tta["ex"], tta["model"], tta["test"]
    _check_complete(ex)
    enc = load_encoder(ENC, input_size=SIZE)
    score = _rescore(model, test, tta["gene"])
    x = _crops(model, test, ex.spots)
    for i, spot in enumerate(ex.spots):
        base = _baseline_patch(x[i : i + 1], "blur")
        # the baseline patch goes through the 8 views too (its plain encoding would score differently)
        assert score(spot, _dihedral_mean(enc, base)[0]) == pytest.approx(ex.pixel_baseline_score[i], abs=1e-4)
        with torch.no_grad():
            plain = enc.encode(base)[0].numpy()
        assert abs(score(spot, plain) - ex.pixel_baseline_score[i]) > 1e-3
    assert ex.saliency.shape == (2, SIZE, SIZE) and np.isfinite(ex.saliency).all() and (ex.saliency >= 0).all()


def test_tta_patch_saliency_and_diagnostic(tta):
    """patch_saliency (and so hx.tl.diagnostic_patches' saliency) take the same path: same patches and saliency as
    explain with the same options."""
    ex, model, test, gene = tta["ex"], tta["model"], tta["test"], tta["gene"]
    spot = ex.spots[:1]
    small = hx.tl.explain(test, model, genes=gene, spots=spot, baseline="blur", n_steps=8, neighbours=False)
    patches, sal = patch_saliency(test, model, spots=spot, genes=gene, baseline="blur", n_steps=8)
    np.testing.assert_array_equal(patches, ex.patches[:1])
    np.testing.assert_allclose(sal, small.normalised_saliency(), atol=1e-5)


def test_stain_normalised_forward_pass_and_completeness(stain):
    ex, model, test = stain["ex"], stain["model"], stain["test"]
    assert ex.params["stain_norm"] == "macenko" and ex.params["tta"] is None
    table = test.tables["table"]
    norm = table.uns["hespotex_embed"][KEY]["stain_norm"]
    enc = load_encoder(ENC, input_size=SIZE)
    x, stored = _crops(model, test, ex.spots), _stored(test, ex.spots)
    scale = np.abs(stored).max()
    with torch.no_grad():
        ours = enc.encode(_macenko(x, norm["slide"], norm["reference"])).numpy()
        forward = patch_features(enc, x, stain_norm=(norm["slide"], norm["reference"])).numpy()
        plain = patch_features(enc, x).numpy()
    assert np.abs(ours - stored).max() / scale < 1e-4  # float64 numpy vs the float32 torch mapping
    assert np.abs(forward - stored).max() / scale < 1e-5  # measured 2.6e-6
    assert np.abs(plain - stored).max() / scale > 0.05  # measured 0.28
    np.testing.assert_allclose(ex.pixel_score, ex.score, atol=1e-5)
    assert not [w for w in stain["warnings"] if "differ from the stored" in w or "incomplete" in w], stain["warnings"]
    # attributed w.r.t. the raw patch: the returned patches are the crops as scanned, not normalised
    np.testing.assert_array_equal(
        ex.patches, hx.pp.extract_patches(test, patch_um=model.embedding["patch_um"], size=SIZE, spots=ex.spots)
    )
    _check_complete(ex)
    score = _rescore(model, test, stain["gene"])
    for i, spot in enumerate(ex.spots):  # the blurred raw patch, normalised, encoded
        base = _baseline_patch(x[i : i + 1], "blur")
        with torch.no_grad():
            row = enc.encode(_macenko(base, norm["slide"], norm["reference"]))[0].numpy()
        assert score(spot, row) == pytest.approx(ex.pixel_baseline_score[i], abs=1e-3)


def test_stain_estimated_when_the_slide_has_no_record(stain):
    """Without the slide's embedding record the slide's stain is estimated as hx.tl.predict does: the same one."""
    model, test = stain["model"], stain["test"]
    table = copy.deepcopy(test.tables["table"])
    norm = table.uns["hespotex_embed"][KEY]["stain_norm"]
    plan = plan_patches(test, patch_um=model.embedding["patch_um"], out_px=SIZE)
    assert stain_norm_pair(model, table, plan, KEY) == (norm["slide"], norm["reference"])
    del table.uns["hespotex_embed"]
    slide, reference = stain_norm_pair(model, table, plan, KEY)
    np.testing.assert_allclose(slide["stain_matrix"], norm["slide"]["stain_matrix"], atol=1e-6)
    assert reference["stain_matrix"] == norm["reference"]["stain_matrix"]


def test_stain_augmented_model_explains_the_clean_embedding(sections):
    """Stain-augmented views are training-only: the model predicts (and explain attributes) the clean embedding."""
    s = copy.deepcopy(sections)
    for n in ("a", "b"):
        hx.pp.embed(s[n], encoder=ENC, input_size=SIZE, stain_augment=2)
    model, test, gene = _train_on(s, stain_augment=True)
    assert model.embedding["input_size"] == SIZE
    assert model.embedding.get("stain_augment") and not model.embedding.get("tta")
    res = _explained(model, test, gene, n_steps=8)
    ex = res["ex"]
    np.testing.assert_allclose(ex.pixel_score, ex.score, atol=1e-5)
    assert not [w for w in res["warnings"] if "differ from the stored" in w], res["warnings"]
    assert ex.params["tta"] is None and ex.params["stain_norm"] is None
    assert np.isfinite(ex.saliency).all() and (ex.saliency.reshape(2, -1).max(axis=1) > 0).all()


def test_two_scale_tta_model_augments_both_patches(sections):
    """Two scales and TTA: the spot and the context patch each go through the 8 views (the stored embedding is
    ``[mean over spot views, mean over context views]``)."""
    s = copy.deepcopy(sections)
    patch = float(s["a"].tables["table"].uns["hespotex_sample"]["spot_diameter_um"])
    for n in ("a", "b"):
        hx.pp.embed(s[n], encoder=ENC, input_size=SIZE, patch_um=patch, context_um=2 * patch, tta=True)
    model, test, gene = _train_on(s)
    res = _explained(model, test, gene, n_steps=8)
    ex = res["ex"]
    assert ex.params["tta"] == "dihedral8" and ex.params["context_um"] == 2 * patch
    np.testing.assert_allclose(ex.pixel_score, ex.score, atol=1e-5)
    assert not [w for w in res["warnings"] if "differ from the stored" in w], res["warnings"]
    enc = load_encoder(ENC, input_size=SIZE)
    x = _crops(model, test, ex.spots)
    wide = resize_batch(
        plan_patches(test, patch_um=2 * patch, out_px=SIZE).read(test.tables["table"].obs_names.get_indexer(ex.spots)),
        SIZE,
    )
    stored = _stored(test, ex.spots)
    ours = np.concatenate([_dihedral_mean(enc, x), _dihedral_mean(enc, wide)], axis=1)
    assert np.abs(ours - stored).max() / np.abs(stored).max() < 1e-5
    with torch.no_grad():
        plain_context = np.concatenate([_dihedral_mean(enc, x), enc.encode(wide).numpy()], axis=1)
    assert np.abs(plain_context - stored).max() / np.abs(stored).max() > 0.05
    assert ex.context_saliency.shape == (2, SIZE, SIZE) and np.isfinite(ex.context_saliency).all()
