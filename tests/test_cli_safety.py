"""The ``hespotex`` command on bad outputs: a summary table when a slide of several fails, clear messages and
exit codes for a read-only or file ``--out`` and a refused overwrite, and no "finished" for NaN predictions."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import hespotex as hx
from hespotex.cli import main

pytestmark = pytest.mark.usefixtures("single_threaded")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    return hx.datasets.synthetic_wsi(
        tmp_path_factory.mktemp("wsi") / "good.ome.tif", width=1500, height=1300, n_blobs=4,
        microns_per_pixel=1.0, tile=256, seed=3,
    )  # fmt: skip


def test_predict_several_slides_one_failing_ends_with_the_summary_table(wsi, trained_synthetic, tmp_path, capsys):
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    out = tmp_path / "preds"
    rc = main(["--no-progress", "predict", "--model", str(trained_synthetic["model_dir"]), "--out", str(out),
               "--workers", "1", str(wsi), str(bad)])  # fmt: skip
    assert rc == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["slide", "status", "n_tiles", "seconds"]
    good_row = next(line for line in lines if line.split()[0] == "good")  # to_string right-aligns the columns
    bad_row = next(line for line in lines if line.split()[0] == "bad")
    assert good_row.split()[1] == "finished" and int(good_row.split()[2]) > 0
    assert bad_row.split()[1] == "failed" and "ValueError" in bad_row
    assert (out / "good.done.json").is_file() and not (out / "bad.done.json").exists()


def test_out_naming_an_existing_file_exits_2(wsi, trained_synthetic, tmp_path, caplog, capsys):
    path = tmp_path / "results"
    path.write_text("mine")
    rc = main(["predict", "--model", str(trained_synthetic["model_dir"]), "--out", str(path), str(wsi)])
    assert rc == 2 and "is an existing file; expected a folder" in capsys.readouterr().err
    rc = main(["train", "--out", str(path), "--overwrite", str(tmp_path / "sample.zarr")])
    assert rc == 2 and "is an existing file; expected a model folder" in capsys.readouterr().err
    assert path.read_text() == "mine"


def test_train_refuses_a_folder_it_did_not_write_before_training(tmp_path, caplog):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    sample = tmp_path / "sample.zarr"
    hx.io.write_zarr(hx.datasets.synthetic(n_spots=40, n_genes=20, seed=1, microns_per_pixel=1.0), sample)
    rc = main(["train", "--out", str(folder), "--overwrite", "--epochs", "1", str(sample)])
    assert rc == 2
    assert "a folder that hespotex did not write" in caplog.text and "notes.txt" in caplog.text
    assert "--overwrite or not" in caplog.text
    assert (folder / "notes.txt").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_predict_with_non_finite_predictions_is_not_reported_finished(wsi, trained_synthetic, tmp_path, capsys, caplog):
    import torch

    model = copy.deepcopy(trained_synthetic["model"])
    with torch.no_grad():
        model.module_.direct_head[-1].bias[5] = float("nan")
    folder = model.save(tmp_path / "nan-model")
    out = tmp_path / "preds"
    rc = main(["--no-progress", "predict", "--model", str(folder), "--out", str(out), str(wsi)])
    assert rc == 1
    assert "finished" not in capsys.readouterr().out
    assert "NaN" in caplog.text
    assert not (out / "good.done.json").exists() and (out / "good.error.txt").is_file()


def _as_other_user(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """Run ``hespotex`` as a user without write access to root-owned folders (nobody, when we are root)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "HESPOTEX_CACHE": str(home / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "hespotex.cli", *args]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_read_only_out_exits_2_with_a_clear_message(wsi, trained_synthetic):
    top = Path(tempfile.mkdtemp(prefix="hespotex-ro-"))  # pytest's tmp_path is private to root: not readable by nobody
    try:
        top.chmod(0o755)
        model = top / "model"
        shutil.copytree(trained_synthetic["model_dir"], model)
        slide = top / "slide.ome.tif"
        shutil.copy(wsi, slide)
        home = top / "home"
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        for p in [model, *model.iterdir(), slide]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        ro = top / "read-only"
        ro.mkdir()
        ro.chmod(0o555)  # not writable by the user running the command (root-owned and 0555)
        res = _as_other_user(["predict", "--model", str(model), "--out", str(ro / "preds"), str(slide)], home)
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"cannot write to {str(ro)!r} (permission denied or a read-only file system)" in res.stderr
        res = _as_other_user(["train", "--out", str(ro / "model"), str(slide)], home)
        assert res.returncode == 2 and "cannot write to" in res.stderr, res.stderr[-2000:]
        assert list(ro.iterdir()) == []
    finally:
        shutil.rmtree(top, ignore_errors=True)
