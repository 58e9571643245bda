"""`hespotex demo` (what `make demo` runs): quiet, and it ends with a picture and a standalone explorer page.

The demo runs once, as a user runs it (a subprocess with Python's default warning filters, HESPOTEX_QUICK=1).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

import hespotex as hx

N_SHOWN = 4


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HESPOTEX_QUICK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["HESPOTEX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    env.pop("PYTHONWARNINGS", None)
    res = subprocess.run(
        [sys.executable, "-m", "hespotex.cli", "--no-progress", "demo", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return {"out": out, "stdout": res.stdout, "stderr": res.stderr}


def test_demo_is_quiet_and_says_where_its_outputs_are(demo_run):
    """No warnings (zarr's, torch_geometric's, hespotex's), no line twice, and the printed paths exist."""
    lines = (demo_run["stdout"] + demo_run["stderr"]).splitlines()
    assert [line for line in lines if re.search(r"warn", line, re.IGNORECASE)] == []
    logged = [line for line in lines if line.startswith(("INFO hespotex", "WARNING hespotex", "ERROR hespotex"))]
    # each record once: a second handler would repeat it right after, or in another format
    assert logged and [a for a, b in itertools.pairwise(lines) if a == b] == []
    assert not [line for line in lines if re.match(r"(INFO|WARNING|ERROR):hespotex:", line)]
    assert len(lines) < 25  # a few meaningful lines, not a log dump
    out = demo_run["out"]
    for name in ("prediction.png", "explorer.html", "prediction.zarr", "metrics.csv", "per_gene.csv", "model"):
        assert f"{out / name}" in demo_run["stdout"], name
        assert (out / name).exists(), name


def test_demo_results_are_a_trained_model_on_an_unseen_slide(demo_run):
    out = demo_run["out"]
    metrics = pd.read_csv(out / "metrics.csv")
    assert (
        metrics["pearson_mean"].iat[0] > 0.1
    )  # synthetic expression follows the image; a model that learnt nothing scores ~0
    pred = hx.io.read_zarr(out / "prediction.zarr")["hespotex"]
    assert pred.layers["hespotex"].shape == (pred.n_obs, 100) and "measured" in pred.layers
    model = hx.tl.HESpotEx.load(out / "model")
    assert model.train_samples_ and "synthetic_test" not in model.train_samples_ + model.validation_["samples"]


def test_demo_png_shows_the_best_genes_over_the_tissue(demo_run):
    """A real PNG (decoded by Pillow): N_SHOWN panels wide enough to see, many colours (tissue and colour map)."""
    from PIL import Image

    with Image.open(demo_run["out"] / "prediction.png") as img:
        assert img.format == "PNG"
        rgb = np.asarray(img.convert("RGB"))
    height, width, _ = rgb.shape
    assert width >= 400 and height >= 200
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 1000  # the tissue image under coloured spots, not a blank or one-colour figure
    best = pd.read_csv(demo_run["out"] / "per_gene.csv", index_col=0)["pearson"].nlargest(N_SHOWN).index
    assert all(gene in demo_run["stdout"] for gene in best)


def test_demo_html_is_standalone_and_holds_every_spot(demo_run):
    """The explorer page: no network resources, and its Bokeh documents hold the spots of the predicted slide."""
    html = (demo_run["out"] / "explorer.html").read_text()
    assert not re.findall(r"<script[^>]+src=[\"']https?://", html)
    n_spots = hx.io.read_zarr(demo_run["out"] / "prediction.zarr")["hespotex"].n_obs
    docs = re.findall(r'<script type="application/json" id="[^"]+">\s*(.+?)\s*</script>', html, re.DOTALL)
    assert docs
    text = json.dumps([json.loads(d) for d in docs])
    assert f'"length": {n_spots}' in text or f'"shape": [{n_spots}]' in text


@pytest.mark.browser
def test_demo_html_draws_in_a_browser(demo_run, browser, artifacts):
    """Opened from file:// in Chromium, the page draws the predicted and measured maps with every spot."""
    from test_browser import PLOTS_JS

    n_spots = hx.io.read_zarr(demo_run["out"] / "prediction.zarr")["hespotex"].n_obs
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto((demo_run["out"] / "explorer.html").as_uri())
        page.wait_for_function(
            f"(n) => {{ const plots = ({PLOTS_JS})(); return plots.filter(p => p.finished && "
            "p.glyphs.some(g => g[0] === 'Scatter' && g[1] === n)).length >= 2; }",
            arg=n_spots,
            timeout=60_000,
        )
        page.screenshot(path=artifacts / "demo_explorer.png", full_page=True)
        # the demo's model has an attention decoder: the explorer finds its weights (not evaluate's record)
        assert page.get_by_text("have no attention weights").count() == 0
    finally:
        context.close()
    assert not errors


def test_a_second_demo_reuses_its_own_folder_and_refuses_others(tmp_path):
    """`make demo` twice works: the folder an earlier demo marked is reused; a user's folder is refused."""
    from hespotex import _ownership
    from hespotex._demo import check_demo_folder

    ours = tmp_path / "demo-output"
    ours.mkdir()
    (ours / "metrics.csv").write_text("old")
    with pytest.raises(FileExistsError, match="did not write"):
        check_demo_folder(ours, overwrite=False)
    _ownership.mark(ours, "demo")
    check_demo_folder(ours, overwrite=False)  # an earlier demo's folder: no error
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_demo_folder(user, overwrite=False)
    check_demo_folder(user, overwrite=True)
    check_demo_folder(tmp_path / "new", overwrite=False)
    assert (user / "notes.txt").read_text() == "keep"
