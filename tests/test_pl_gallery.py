"""hx.pl.diagnostic_patches: one tile per patch in rank order, titled, with saliency overlays iff present."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

import hespotex as hx


@dataclass
class Patches:
    """The contract of ``hx.tl.DiagnosticPatches`` (the gallery duck-types it)."""

    table: pd.DataFrame
    images: np.ndarray
    saliency: np.ndarray | None
    params: dict = field(default_factory=dict)


def planted(n: int = 6, *, groups=None, h: int = 40, w: int = 48, seed: int = 0) -> Patches:
    """Patches with a bright planted blob whose size falls with rank; saliency peaks on the blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    images, sal = [], []
    for i in range(n):
        img = rng.integers(150, 230, (h, w, 3)).astype(np.uint8)  # pale H&E-like background
        blob = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (12 - i) ** 2
        img[blob] = (120, 30, 110)  # purple nucleus-like blob
        images.append(img)
        sal.append(np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (2 * (10 - i) ** 2)))
    groups = groups or ["invasive"] * n
    rank = pd.Series(groups).groupby(groups).cumcount().to_numpy() + 1
    table = pd.DataFrame(
        {
            "rank": rank,
            "score": np.round(np.linspace(3.0, 1.0, n), 3),
            "group": groups,
            "x": np.arange(n) * 100.0,
            "y": 50.0,
            "sample_id": "syn",
        },
        index=pd.Index([f"syn_{i}" for i in range(n)], name="spot"),
    )
    return Patches(table, np.stack(images), np.stack(sal).astype(np.float32), {"by": "planted"})


def tiles(layout):
    import holoviews as hv

    return [item for item in layout if not isinstance(item, hv.Empty)]


def parts(tile):
    """``(rgb, saliency image or None)`` of one tile."""
    import holoviews as hv

    if isinstance(tile, hv.Overlay):
        rgb = [e for e in tile if isinstance(e, hv.RGB)]
        imgs = [e for e in tile if type(e) is hv.Image]
        assert len(rgb) == 1 and len(imgs) <= 1
        return rgb[0], (imgs[0] if imgs else None)
    assert isinstance(tile, hv.RGB)
    return tile, None


def title(element, backend="bokeh"):
    return element.opts.get("plot", backend=backend).kwargs.get("title")


def test_one_tile_per_patch_in_rank_order_with_titles_and_overlays():
    res = planted(6)
    before = copy.deepcopy(res)
    layout = hx.pl.diagnostic_patches(res, ncols=3, alpha=0.4, cmap="viridis")
    shown = tiles(layout)
    assert len(shown) == 6
    for i, tile in enumerate(shown):
        rgb, sal = parts(tile)
        np.testing.assert_array_equal(np.asarray(rgb.data)[..., :3], res.images[i])
        assert sal is not None
        low = res.saliency[i] < 0.1  # transparent (NaN) below the threshold
        assert low.any() and not low.all()
        np.testing.assert_allclose(np.asarray(sal.data)[~low], res.saliency[i][~low])
        assert np.isnan(np.asarray(sal.data)[low]).all()
        style = sal.opts.get("style", backend="bokeh").kwargs
        assert style["alpha"] == 0.4 and style["cmap"] == "viridis"
        expected = f"#{i + 1} syn_{i} · score {res.table['score'].iloc[i]:.3g}"
        assert title(tile) == expected and title(tile, "matplotlib") == expected
    assert layout._max_cols == 3
    pd.testing.assert_frame_equal(res.table, before.table)  # the result is untouched
    np.testing.assert_array_equal(res.images, before.images)


def test_no_overlay_without_saliency():
    res = planted(4)
    assert all(parts(t)[1] is None for t in tiles(hx.pl.diagnostic_patches(res, saliency=False)))
    res.saliency = None
    shown = tiles(hx.pl.diagnostic_patches(res))
    assert len(shown) == 4 and all(parts(t)[1] is None for t in shown)
    assert title(shown[0]) == "#1 syn_0 · score 3"


def test_rank_order_and_groups_start_new_rows():
    import holoviews as hv

    res = planted(7, groups=["invasive"] * 4 + ["stroma"] * 3)
    perm = [3, 1, 0, 2, 6, 4, 5]  # out of rank order within the groups (groups keep their order of appearance)
    shuffled = Patches(res.table.iloc[perm], res.images[perm], res.saliency[perm])
    layout = hx.pl.diagnostic_patches(shuffled, ncols=3)
    items = list(layout)
    # invasive ranks 1-4 fill a row and a cell, two empty cells, then stroma ranks 1-3 on a new row
    assert [isinstance(i, hv.Empty) for i in items] == [False] * 4 + [True] * 2 + [False] * 3
    titles = [title(t) for t in tiles(layout)]
    assert titles[0] == "#1 syn_0 · score 3 · invasive"
    assert titles[4].startswith("#1 syn_4") and titles[4].endswith("· stroma")
    assert [t.split()[1] for t in titles] == [f"syn_{i}" for i in range(7)]
    for i, tile in enumerate(tiles(layout)):  # images follow their rows when reordered
        np.testing.assert_array_equal(np.asarray(parts(tile)[0].data)[..., :3], res.images[i])
    top = tiles(hx.pl.diagnostic_patches(res, max_patches=4))  # best of each group in turn
    assert [title(t).split()[1] for t in top] == ["syn_0", "syn_1", "syn_4", "syn_5"]


def test_bad_inputs_are_explained():
    res = planted(3)
    with pytest.raises(TypeError, match="diagnostic_patches"):
        hx.pl.diagnostic_patches(res.table)
    with pytest.raises(ValueError, match="n_patches=3"):
        hx.pl.diagnostic_patches(Patches(res.table, res.images[:2], None))
    with pytest.raises(ValueError, match="saliency"):
        hx.pl.diagnostic_patches(Patches(res.table, res.images, res.saliency[:, :10]))


def test_gallery_png_artifact(artifacts):
    from PIL import Image

    res = planted(8, groups=["invasive"] * 5 + ["stroma"] * 3)
    path = hx.pl.export(
        hx.pl.diagnostic_patches(res, ncols=4),
        artifacts / "gallery.png",
        title="Diagnostic patches (planted)",
        overwrite=True,
    )
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 200
        assert np.asarray(im.convert("L")).std() > 10  # not blank
