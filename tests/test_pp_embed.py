"""Patches and embeddings: pixels, pyramid levels, transformations, caching, overwrite rules."""

from __future__ import annotations

import numpy as np
import pytest

import hespotex as hx
from hespotex.pp._patches import image_levels, plan_patches


@pytest.fixture(scope="module")
def tiny_encoder():
    return hx.pp.load_encoder("resnet18", input_size=32)


def _image(sdata) -> np.ndarray:
    return np.asarray(image_levels(sdata)[0].array).transpose(1, 2, 0)


def test_patches_equal_image_pixels_at_full_resolution(sample_factory):
    sdata = sample_factory(n_spots=40, image_shape=(600, 500), mpp=0.5)
    img = _image(sdata)
    patches = hx.pp.extract_patches(sdata, patch_um=40.0, size=80)  # 80 px at 0.5 µm/px: no resampling
    xy = sdata["table"].obsm["spatial"]
    for i, (x, y) in enumerate(xy):
        x0, y0 = round(x - 40), round(y - 40)
        if x0 >= 0 and y0 >= 0 and x0 + 80 <= img.shape[1] and y0 + 80 <= img.shape[0]:
            np.testing.assert_array_equal(patches[i], img[y0 : y0 + 80, x0 : x0 + 80])
        else:  # cut by the image edge: the outside is white
            assert (patches[i] == 255).any()


def test_coarser_pyramid_level_is_used_when_enough(sample_factory):
    sdata = sample_factory(n_spots=10, image_shape=(2400, 2200), mpp=0.5)
    levels = image_levels(sdata)
    assert len(levels) == 2 and levels[1].scale == (0.5, 0.5)
    plan = plan_patches(sdata, patch_um=200.0, out_px=64)  # 400 full-res px -> 64 px: level 1 still has 200 px
    assert plan.level.level == 1 and plan.size == 200
    plan = plan_patches(sdata, patch_um=50.0, out_px=64)  # 100 full-res px -> 64 px: level 1 would give 50 px
    assert plan.level.level == 0


def test_scaled_image_element_gives_the_same_patch(sample_factory):
    """A downscaled copy of the image with a Scale transformation (like Visium hires) is read correctly."""
    import pandas as pd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    yy, xx = np.mgrid[0:600, 0:600]
    img = np.stack(
        [128 + 100 * np.sin(xx / 25.0), 128 + 100 * np.cos(yy / 30.0), 128 + 60 * np.sin((xx + yy) / 40.0)], axis=-1
    )
    img = img.round().astype(np.uint8)
    rng = np.random.default_rng(0)
    sdata = hx.io.build_sample(
        img, rng.uniform(100, 500, (20, 2)), rng.poisson(2, (20, 5)),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(20)]), var=pd.DataFrame(index=[f"g{i}" for i in range(5)]),
        sample_id="S", microns_per_pixel=0.5, spot_diameter_um=55.0,
    )  # fmt: skip
    small = img.reshape(300, 2, 300, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    info = dict(sdata["table"].uns["hespotex_sample"])
    sdata.images["half"] = Image2DModel.parse(
        small, dims=("y", "x", "c"), transformations={info["coordinate_system"]: Scale([2.0, 2.0], axes=("y", "x"))}
    )
    full = hx.pp.extract_patches(sdata, patch_um=60.0, size=60)
    sdata["table"].uns["hespotex_sample"]["image_key"] = "half"
    half = hx.pp.extract_patches(sdata, patch_um=60.0, size=60)
    diff = np.abs(full.astype(int) - half.astype(int)).mean()
    assert diff < 3.0  # same content up to resampling (of 0..255)
    assert np.abs(full.astype(int) - full[::-1].astype(int)).mean() > 20  # while different spots differ


def test_embed_matches_direct_forward_and_is_batch_invariant(sample_factory, tiny_encoder):
    import torch

    sdata = sample_factory(n_spots=30, image_shape=(500, 500))
    hx.pp.embed(sdata, encoder=tiny_encoder, patch_um=50.0, batch_size=7, cache=False)
    emb = sdata["table"].obsm["X_hespotex_image"]
    assert emb.shape == (30, tiny_encoder.num_features) and emb.dtype == np.float32
    patches = hx.pp.extract_patches(sdata, patch_um=50.0, size=32)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        direct = tiny_encoder.model(tiny_encoder.normalize(x)).numpy()
    np.testing.assert_allclose(emb, direct, atol=2e-2, rtol=1e-2)  # patches above were rounded to uint8
    other = sample_factory(n_spots=30, image_shape=(500, 500))
    hx.pp.embed(other, encoder=tiny_encoder, patch_um=50.0, batch_size=64, cache=False)
    np.testing.assert_allclose(other["table"].obsm["X_hespotex_image"], emb, atol=1e-4)
    params = sdata["table"].uns["hespotex_embed"]["X_hespotex_image"]
    assert params["encoder_id"] == tiny_encoder.encoder_id and params["patch_um"] == 50.0 and params["input_size"] == 32


def test_second_embed_runs_no_forward_pass(sample_factory, tiny_encoder):
    calls = []
    handle = tiny_encoder.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = sample_factory(n_spots=20, seed=5)
        hx.pp.embed(first, encoder=tiny_encoder, patch_um=50.0)
        assert calls, "the first call must run the encoder"
        calls.clear()
        hx.pp.embed(first, encoder=tiny_encoder, patch_um=50.0)  # same object: nothing to do
        again = sample_factory(n_spots=20, seed=5)  # same pixels and spots, fresh object: disk cache
        hx.pp.embed(again, encoder=tiny_encoder, patch_um=50.0)
        assert not calls
        np.testing.assert_array_equal(again["table"].obsm["X_hespotex_image"], first["table"].obsm["X_hespotex_image"])
        changed = sample_factory(n_spots=20, seed=5)
        hx.pp.embed(changed, encoder=tiny_encoder, patch_um=60.0)  # other geometry: a new forward pass
        assert calls
    finally:
        handle.remove()


def test_embed_refuses_to_overwrite_other_embeddings(sample_factory, tiny_encoder):
    sdata = sample_factory(n_spots=15)
    hx.pp.embed(sdata, encoder=tiny_encoder, patch_um=50.0)
    before = sdata["table"].obsm["X_hespotex_image"].copy()
    with pytest.raises(ValueError, match="overwrite=True"):
        hx.pp.embed(sdata, encoder=tiny_encoder, patch_um=70.0)
    np.testing.assert_array_equal(sdata["table"].obsm["X_hespotex_image"], before)
    hx.pp.embed(sdata, encoder=tiny_encoder, patch_um=70.0, overwrite=True)
    assert sdata["table"].uns["hespotex_embed"]["X_hespotex_image"]["patch_um"] == 70.0


def test_embed_needs_an_image(sample_factory, tiny_encoder):
    sdata = sample_factory(n_spots=15, image_shape=None)
    with pytest.raises(KeyError, match="no H&E image"):
        hx.pp.embed(sdata, encoder=tiny_encoder)


def test_image_reads_stay_local_under_a_distributed_client(sample_factory, tiny_encoder):
    """A notebook with a dask ``Client`` running: patch and window reads must not ship the image to the cluster
    (for an in-memory image every read's graph carries the whole image); results equal those without a client."""
    from dask.distributed import Client, LocalCluster, get_task_stream

    plain = sample_factory(n_spots=25, image_shape=(400, 400), seed=7)
    hx.pp.embed(plain, encoder=tiny_encoder, patch_um=50.0, cache=False)
    sdata = sample_factory(n_spots=25, image_shape=(400, 400), seed=7)
    image = next(iter(sdata.images.values()))
    assert hasattr(image.data, "dask"), "the fixture's image must be a dask array for this test to mean anything"
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        with get_task_stream(client) as ours:
            hx.pp.embed(sdata, encoder=tiny_encoder, patch_um=50.0, cache=False)
            hx.pp.detect_tissue(sdata)
        with get_task_stream(client) as theirs:
            image.data.sum().compute()  # the same client runs ordinary dask work: the stream does see tasks
    assert not ours.data, [t["key"] for t in ours.data]
    assert theirs.data
    np.testing.assert_array_equal(sdata["table"].obsm["X_hespotex_image"], plain["table"].obsm["X_hespotex_image"])
