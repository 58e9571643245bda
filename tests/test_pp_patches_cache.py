"""Patch reading through the decoded-chunk cache: the same crops as direct reads, each stored tile decoded once."""

from __future__ import annotations

import numpy as np
import pytest

import hespotex as hx
from hespotex.pp._patches import ChunkCache, plan_patches, read_crops


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A pyramidal JPEG-tiled slide (256 px tiles) covered with pseudo-spots."""
    path = hx.datasets.synthetic_wsi(
        tmp_path_factory.mktemp("wsi") / "s.ome.tif",
        width=1800,
        height=1400,
        n_blobs=5,
        microns_per_pixel=1.0,
        tile=256,
        seed=3,
    )
    sdata = hx.io.read_wsi(path)
    hx.pp.detect_tissue(sdata)
    hx.pp.tile(sdata, spot_diameter_um=55, spacing_um=100)
    return sdata


def test_cached_crops_equal_direct_reads_and_tiles_are_decoded_once(tiled):
    plan = plan_patches(tiled, patch_um=110, out_px=64)
    assert plan.cache is not None and plan.cache.lazy  # a dask level of 256 px chunks
    direct = np.concatenate([read_crops(plan.level, plan.x0[b], plan.y0[b], plan.size) for b in plan.batches(8)])
    cached = np.concatenate([plan.read(b) for b in plan.batches(8)])
    np.testing.assert_array_equal(cached, direct)
    ys, xs = plan.cache.y_edges, plan.cache.x_edges
    h, w = plan.level.shape
    distinct, per_box = set(), 0
    for b in plan.batches(8):  # stored chunks under each batch's crop box: what direct reads decode
        y0, y1 = max(plan.y0[b].min(), 0), min(plan.y0[b].max() + plan.size, h)
        x0, x1 = max(plan.x0[b].min(), 0), min(plan.x0[b].max() + plan.size, w)
        rows = range(np.searchsorted(ys, y0, "right") - 1, np.searchsorted(ys, y1, "left"))
        cols = range(np.searchsorted(xs, x0, "right") - 1, np.searchsorted(xs, x1, "left"))
        box = {(i, j) for i in rows for j in cols}
        distinct |= box
        per_box += len(box)
    assert 0 < plan.cache.misses <= len(distinct) < per_box  # each stored tile decoded at most once, where direct
    # reads decode a tile again for every box over it


def test_a_small_cache_evicts_and_stays_correct(tiled):
    plan = plan_patches(tiled, patch_um=110, out_px=64)
    small = ChunkCache(plan.level, max_bytes=4 * 256 * 256 * 3 * 16)
    small.max_bytes = 2 * 256 * 256 * 3  # at most two chunks kept
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(plan.x0))[:60]
    got = read_crops(plan.level, plan.x0[idx], plan.y0[idx], plan.size, cache=small)
    np.testing.assert_array_equal(got, read_crops(plan.level, plan.x0[idx], plan.y0[idx], plan.size))
    assert small.nbytes <= 2 * 256 * 256 * 3 and small.misses > len(small.chunks)  # evicted, then decoded again
    box = small.read(100, 700, 50, 900)  # a box over several chunks, assembled
    np.testing.assert_array_equal(box, np.asarray(plan.level.array.data[:3, 100:700, 50:900]))


def test_image_fingerprint_through_the_cache_is_the_direct_one_and_leaves_its_chunks_decoded(tiled):
    from dataclasses import replace

    from hespotex.pp._embed import image_fingerprint

    plan = plan_patches(tiled, patch_um=110, out_px=64)
    assert plan.level.level == plan.base.level and plan.cache.misses == 0
    via_cache = image_fingerprint(plan)
    decoded = plan.cache.misses
    assert decoded > 0  # the windows were read through the plan's cache
    direct = image_fingerprint(replace(plan, cache=None, memo={}))  # the dask read of the 64 windows
    assert via_cache == direct  # same pixels, same key: embedding caches stay valid
    cached = np.concatenate([plan.read(b) for b in plan.batches(8)])
    np.testing.assert_array_equal(cached, np.concatenate([read_crops(plan.level, plan.x0[b], plan.y0[b], plan.size)
                                                          for b in plan.batches(8)]))  # fmt: skip
    changed = replace(plan, cache=None, memo={}, base=replace(plan.base, offset=(plan.base.offset[0] + 1, 0.0)))
    assert image_fingerprint(changed) != via_cache  # and the key still tells placements apart


def test_encode_patches_reports_its_first_batch(tiled):
    from dataclasses import replace

    from hespotex.pp import load_encoder
    from hespotex.pp._embed import encode_patches

    plan = plan_patches(tiled, patch_um=110, out_px=32)
    idx = plan.order[:20]
    sub = replace(plan, x0=plan.x0[idx], y0=plan.y0[idx], order=np.arange(20))
    encoder = load_encoder("resnet18", input_size=32)
    timings = {}
    feats = encode_patches(sub, encoder, batch_size=8, timings=timings)
    np.testing.assert_array_equal(feats, encode_patches(sub, encoder, batch_size=8))  # the record changes nothing
    assert timings["first_batch_n"] == 8 and timings["first_batch_s"] > 0


@pytest.mark.parametrize(("out_px", "warns"), [(160, False), (330, True)])
def test_warns_only_when_patches_are_enlarged_more_than_twice(tiled, caplog, out_px, warns):
    """110 µm patches of a 1 µm/px slide: 160 px (1.45 times, as 100 µm ST spots of a 0.69 µm/px scan at 224 px) is
    the usual case and silent; 330 px (3 times) names the image, the factor and what to do."""
    import logging

    with caplog.at_level(logging.WARNING, logger="hespotex"):
        plan_patches(tiled, patch_um=110, out_px=out_px)
    messages = [r.getMessage() for r in caplog.records if "enlarged" in r.getMessage()]
    assert bool(messages) == warns
    if warns:
        assert "3.0 times" in messages[0] and "finer image" in messages[0]
