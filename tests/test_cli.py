"""The ``hespotex`` command line: help, exit codes, and ``tile`` then ``predict`` on a small slide end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hespotex as hx
from hespotex.cli import main

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A small pyramidal OME-TIFF at 1 µm/px, the resolution the trained_synthetic model saw."""
    return hx.datasets.synthetic_wsi(
        tmp_path_factory.mktemp("slide") / "small.ome.tif",
        width=2400,
        height=2000,
        n_blobs=6,
        microns_per_pixel=1.0,
        tile=256,
        seed=5,
    )


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "hespotex.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("predict", ["--model DIR", "--workers", "--mpp", "examples:", "hespotex predict --model", "exit codes"]),
        ("train", ["--genes N|FILE", "--encoder", "--her2st", "--sections", "examples:", "hespotex train --out"]),
        ("tile", ["--spot-diameter", "--spacing", "--layout", "examples:", "hespotex tile --out"]),
        ("export", ["--format", "geojson", "ome-tiff", "--per-gene", "examples:", "hespotex export"]),
    ],
)
def test_each_subcommand_explains_itself(command, expected, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for phrase in expected:
        assert phrase in text, phrase


def test_top_level_help_lists_the_commands():
    res = _cli("--help")
    assert res.returncode == 0
    for command in ("demo", "predict", "train", "tile", "export"):
        assert command in res.stdout


def test_bad_usage_exits_2(tmp_path, slide, trained_synthetic, capsys):
    model = str(trained_synthetic["model_dir"])
    assert main(["predict", "--out", str(tmp_path / "o"), str(slide)]) == 2  # no --model
    assert "--model" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), str(slide)]) == 2
    assert main(["predict", "--model", model, "--out", str(tmp_path / "o"), str(tmp_path / "missing.tif")]) == 2
    assert main(["predict", "--model", model, "--out", str(tmp_path / "o"), "--workers", "0", str(slide)]) == 2
    assert main(["predict", "--model", model, "--out", str(tmp_path / "o"), "--smooth", "2", str(slide)]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert main(["tile", "--out", str(tmp_path / "t.zarr"), str(slide)]) == 2  # neither --model nor a geometry
    assert "--spot-diameter" in capsys.readouterr().err
    assert main(["tile", "--out", str(tmp_path / "t.zarr"), "--spot-diameter", "55", str(slide)]) == 2  # no --spacing
    assert main(["train", "--out", str(tmp_path / "m")]) == 2  # no samples
    for bad in ("0", "two", "-1"):  # --ensemble: auto, yes, no or members per held-out sample
        assert main(["train", "--out", str(tmp_path / "m"), "--ensemble", bad, str(tmp_path)]) == 2
    assert main(["train", "--out", str(tmp_path / "m"), "--genes", "nofile.txt", str(tmp_path)]) == 2
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.zarr").exists() and not (tmp_path / "m").exists()


def test_refused_overwrite_exits_2_and_touches_nothing(tmp_path, slide, trained_synthetic):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("user data")
    assert main(["train", "--out", str(taken), str(tmp_path)]) == 2
    assert main(["tile", "--out", str(taken), "--model", str(trained_synthetic["model_dir"]), str(slide)]) == 2
    assert (taken / "file").read_text() == "user data" and len(list(taken.iterdir())) == 1


def test_train_saves_a_model_from_zarr_samples(tmp_path):
    samples = []
    for i in range(2):
        sdata = hx.datasets.synthetic(n_spots=70, n_genes=30, seed=i, microns_per_pixel=2.0, sample_id=f"s{i}")
        hx.io.write_zarr(sdata, tmp_path / f"s{i}.zarr")
        samples.append(str(tmp_path / f"s{i}.zarr"))
    genes = [g for g in hx.io.read_zarr(samples[0]).tables["table"].var_names[:12]]
    (tmp_path / "genes.txt").write_text("# panel\n" + "\n".join(genes) + "\n")
    args = ["train", "--out", str(tmp_path / "model"), "--genes", str(tmp_path / "genes.txt"), "--encoder", "resnet18",
            "--input-size", "32", "--epochs", "2", "--set", "ae_epochs=2", "--set", "latent_dim=8",
            "--validation", "none", *samples]  # fmt: skip
    assert main(args) == 0
    model = hx.tl.HESpotEx.load(tmp_path / "model")
    assert list(model.genes) == genes and model.config.latent_dim == 8 and sorted(model.train_samples_) == ["s0", "s1"]
    assert model.stain_augment["n_views"] == 4  # by default trained on 4 stain-augmented views per spot
    assert model.stain_augment["ranges"]["zoom"] == pytest.approx([1 / 1.15, 1.15])  # fields of view ±15 %
    assert model.stain_augment["method"] == "hed_jitter+zoom+dihedral"  # and flipped / turned
    # and on two-scale embeddings (--context-um auto): the spot patch and a context patch twice as wide
    assert model.embedding["patch_um"] == 55.0 and model.embedding["context_um"] == 110.0
    assert len(model.embedding_mean_) == 2 * 512  # resnet18's 512 features at each scale
    assert main(args) == 2  # the model folder now exists
    bad = ["train", "--out", str(tmp_path / "other"), "--validation", "none", *samples]
    assert (
        main([*bad, "--set", "nonsense"]) == 2 and main([*bad, "--set", "no_such_field=1"]) == 2
    )  # refused before any work
    assert not (tmp_path / "other").exists()


def test_tile_then_predict_end_to_end(tmp_path, slide, trained_synthetic, capsys):
    import spatialdata

    model = trained_synthetic["model_dir"]
    env = {**os.environ, "HESPOTEX_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    tiles = tmp_path / "small-tiles.zarr"
    res = _cli("tile", "--out", tiles, "--model", model, slide, env=env)
    assert res.returncode == 0, res.stderr
    assert "pseudo-spots" in res.stdout
    tiled = spatialdata.read_zarr(tiles)
    table = tiled.tables["table"]
    n = table.n_obs
    assert 50 < n < 1000
    info = table.uns["hespotex_sample"]
    geometry = trained_synthetic["model"].spot_geometry
    assert info["spot_diameter_um"] == pytest.approx(geometry["spot_diameter_um"])
    xy = np.asarray(table.obsm["spatial"])
    assert (xy >= 0).all() and (xy[:, 0] < 2400).all() and (xy[:, 1] < 2000).all()
    assert not tiled.images  # the image stays in the slide file; its path is recorded
    assert tiled.attrs["hespotex_slide"]["path"] == str(slide.resolve())

    out = tmp_path / "predictions"
    res = _cli("predict", "--model", model, "--out", out, tiles, env=env)
    assert res.returncode == 0, res.stderr
    assert "finished" in res.stdout
    pred = spatialdata.read_zarr(out / "small-tiles.zarr").tables["hespotex"]
    assert pred.n_obs == n and np.isfinite(np.asarray(pred.layers["hespotex"])).all()
    marker = json.loads((out / "small-tiles.done.json").read_text())
    assert marker["n_tiles"] == n

    assert (
        main(["predict", "--model", str(model), "--out", str(out), str(tiles)]) == 0
    )  # finished: skipped, still success
    assert "skipped" in capsys.readouterr().out
    assert json.loads((out / "small-tiles.done.json").read_text()) == marker

    assert pred.uns["hespotex"]["params"]["smooth"] == 0.5  # hx.tl.predict's default smoothing
    for value, recorded in (("none", None), ("0.8", 0.8)):  # --smooth reaches hx.tl.predict: recorded, maps change
        other = tmp_path / f"smooth-{value}"
        assert main(["predict", "--model", str(model), "--out", str(other), "--smooth", value, str(tiles)]) == 0
        table = spatialdata.read_zarr(other / "small-tiles.zarr").tables["hespotex"]
        assert table.uns["hespotex"]["params"].get("smooth") == recorded  # zarr drops None
        assert not np.allclose(np.asarray(table.layers["hespotex"]), np.asarray(pred.layers["hespotex"]))


def test_predict_reports_failed_slides_with_exit_1(tmp_path, trained_synthetic, caplog):
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    rc = main(
        [
            "--no-progress",
            "predict",
            "--model",
            str(trained_synthetic["model_dir"]),
            "--out",
            str(tmp_path / "o"),
            str(bad),
        ]
    )
    assert rc == 1
    assert "bad.ome.tif" in caplog.text
    assert (tmp_path / "o" / "bad.error.txt").read_text().startswith("ValueError: bad.ome.tif")
    assert not (tmp_path / "o" / "bad.done.json").exists()


def test_ensemble_argument_maps_to_train():
    from hespotex.cli._train import _ensemble_choice

    assert [_ensemble_choice(t) for t in ("auto", "yes", "no", "1", "3")] == ["auto", True, False, 1, 3]
