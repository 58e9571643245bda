"""Loading a model is safe: checked before anything is allocated, read fully into memory, never NaN.

Each test edits a real saved model folder the way a careless or hostile user could (or a damaged disk
would) and checks that :meth:`hespotex.tl.HESpotEx.load` refuses it with a clear error, or that a
loaded model no longer depends on its file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.tl.model._data import EMBEDDING_KEY, GraphData

pytestmark = pytest.mark.usefixtures("single_threaded")
SOURCE = Path(hx.__file__).resolve().parents[1]  # the hespotex under test, for subprocesses
TINY = ModelConfig.preset(
    "hespotex",
    epochs=2,
    ae_epochs=2,
    ae_hidden_dim=32,
    latent_dim=16,
    projection_hidden_dim=32,
    head_hidden_dim=32,
    decoder_heads=2,
)


@pytest.fixture(scope="module")
def section():
    sdata = hx.datasets.synthetic(
        n_spots=120, n_genes=30, seed=31, program_seed=0, microns_per_pixel=1.0, sample_id="s31"
    )
    hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=64)
    return sdata


@pytest.fixture(scope="module")
def model(section):
    return hx.tl.train(
        section, config=TINY, validation=None, seed=0, device="cpu", genes=list(section.tables["table"].var_names)
    )


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def folder(saved, tmp_path):
    """A fresh copy of the saved model folder for a test to edit."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


def _graph(section) -> GraphData:
    table = section.tables["table"]
    return GraphData(
        "s31",
        np.asarray(table.obsm[EMBEDDING_KEY], dtype=np.float32),
        np.asarray(table.obsm["spatial"], dtype=np.float64),
    )


def _edit_setup(folder: Path, change) -> None:
    setup = json.loads((folder / "setup.json").read_text())
    change(setup)
    (folder / "setup.json").write_text(json.dumps(setup))


def _header(folder: Path) -> tuple[dict, int]:
    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), 8 + n


def _overwrite_tensor(folder: Path, name: str, values: np.ndarray) -> None:
    """Write ``values`` over tensor ``name`` inside model.safetensors, in place (same size)."""
    header, start = _header(folder)
    begin, end = header[name]["data_offsets"]
    data = np.asarray(values, dtype=np.float32).tobytes()
    assert len(data) == end - begin
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.seek(start + begin)
        fh.write(data)


# ---------------------------------------------------------------------------------------------- in memory
def test_replacing_the_file_in_place_does_not_change_a_loaded_model(folder, section):
    loaded = hx.tl.HESpotEx.load(folder)
    before = loaded.predict_graph(_graph(section), device="cpu")["expression"]
    dim = len(loaded.embedding_mean_)
    _overwrite_tensor(folder, "setup.embedding_mean", np.full(dim, 5.0))
    _overwrite_tensor(folder, "setup.embedding_scale", np.full(dim, 0.5))
    after = loaded.predict_graph(_graph(section), device="cpu")["expression"]
    np.testing.assert_array_equal(after, before)
    # the edited file is a different model: loading it again gives other predictions
    again = hx.tl.HESpotEx.load(folder).predict_graph(_graph(section), device="cpu")["expression"]
    assert np.abs(again - before).mean() > 1e-3


def test_truncating_the_file_does_not_crash_a_loaded_model(folder, section, tmp_path):
    """Run in a subprocess: with a memory-mapped file this dies of a bus error."""
    emb = tmp_path / "emb.npz"
    g = _graph(section)
    np.savez(emb, emb=g.emb, coords=g.coords_um)
    script = textwrap.dedent(
        f"""
        import os, numpy as np, hespotex as hx
        from hespotex.tl.model._data import GraphData
        d = np.load({str(emb)!r})
        m = hx.tl.HESpotEx.load({str(folder)!r})
        first = m.predict_graph(GraphData("s", d["emb"], d["coords"]), device="cpu")["expression"]
        os.truncate({str(folder / "model.safetensors")!r}, 16)
        second = m.predict_graph(GraphData("s", d["emb"], d["coords"]), device="cpu")["expression"]
        assert np.array_equal(first, second)
        print("same predictions", float(m.embedding_scale_.sum()) > 0)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "same predictions True" in proc.stdout


# ---------------------------------------------------------------------------------------------- setup.json
def test_edited_gene_names_are_refused(folder, model):
    hx.tl.HESpotEx.load(folder)  # the intact copy loads

    def rename(setup):
        setup["genes"][0] = "ERBB2"

    _edit_setup(folder, rename)
    with pytest.raises(
        ValueError,
        match=r"30 gene names do not match the gene_hash .*predictions would be labelled with the wrong genes",
    ):
        hx.tl.HESpotEx.load(folder)


def test_missing_embedding_dim_is_a_clear_error(folder):
    _edit_setup(folder, lambda s: s.pop("embedding_dim"))
    with pytest.raises(
        ValueError,
        match=r"cannot be read by this hespotex \(embedding_dim\).*lacks 'embedding_dim' \(the width of the image "
        r"embeddings\)",
    ):
        hx.tl.HESpotEx.load(folder)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("target_sum", -1.0, r"'target_sum' should be a positive, finite number, found -1.0"),
        ("target_sum", "1e4", r"'target_sum' should be a number, found '1e4' \(str\)"),
        ("embedding_dim", "1280", r"'embedding_dim' should be the width of the image embeddings, found '1280' \(str\)"),
        ("embedding_dim", True, r"'embedding_dim' should be the width of the image embeddings, found True \(bool\)"),
        ("genes", "ABC", r"'genes' should be a list of gene names, found 'ABC'"),
        ("history", {"a": 1}, r"'history' should be a list of per-epoch records"),
        (
            "spot_geometry",
            {"spot_diameter_um": -55.0},
            r"'spot_geometry' should be positive, finite µm values \(found spot_diameter_um=-55.0\)",
        ),
        ("config.lr", "fast", r"config field 'lr' should be float, found 'fast' \(str\)"),
        ("config.decoder_stacked", 1, r"config field 'decoder_stacked' should be bool, found 1 \(int\)"),
        (
            "embedding.patch_um",
            "big",
            r"'embedding' should be an object whose patch_um is a positive, finite number \(found 'big'\)",
        ),
        ("surprise", 1, r"setup.json has fields this hespotex does not know, \['surprise'\]"),
    ],
)
def test_setup_fields_of_the_wrong_type_are_refused(folder, field, value, match):
    def change(setup):
        if "." in field:
            outer, inner = field.split(".")
            setup[outer][inner] = value
        else:
            setup[field] = value

    _edit_setup(folder, change)
    with pytest.raises(ValueError, match=match):
        hx.tl.HESpotEx.load(folder)


def _peak_rss_mb_of_load(folder: Path, edit: dict) -> tuple[str, float]:
    """Load an intact copy (warm-up), then the edited folder, in a fresh process: its error and the
    growth of peak memory (MB) during the second load."""
    script = textwrap.dedent(
        f"""
        import json, resource, shutil, hespotex as hx
        hx.tl.HESpotEx.load({str(folder)!r})
        setup = json.loads(open({str(folder / "setup.json")!r}).read())
        setup["config"].update({edit!r})
        open({str(folder / "setup.json")!r}, "w").write(json.dumps(setup))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            hx.tl.HESpotEx.load({str(folder)!r})
            print("ERROR none")
        except Exception as err:
            print("ERROR", type(err).__name__, str(err)[:300].replace(chr(10), " "))
        print("GROWTH", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("ERROR", "GROWTH")))
    assert proc.returncode == 0 and "GROWTH" in lines, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return lines["ERROR"], float(lines["GROWTH"])


@pytest.mark.parametrize("size", [3 * 10**6, 10**9])
def test_absurd_hidden_sizes_fail_fast_without_allocating(folder, size):
    error, growth = _peak_rss_mb_of_load(folder, {"ae_hidden_dim": size, "head_hidden_dim": size})
    assert error.startswith("ModelFolderError The weights in") and "do not fit the model its setup describes" in error
    assert f"autoencoder.weight1 is F32 [30, 32] in the weights, F32 [30, {size}] in setup.json" in error
    assert growth < 100, f"loading the refused model grew peak memory by {growth:.0f} MB"


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize(
    ("tensor", "value", "match"),
    [
        (
            "net.direct_head.4.bias",
            np.nan,
            r"1 weight tensors hold NaN or infinite values \(\['net.direct_head.4.bias'\]\)",
        ),
        (
            "net.projection.net.0.weight",
            np.inf,
            r"1 weight tensors hold NaN or infinite values \(\['net.projection.net.0.weight'\]\)",
        ),
        ("setup.embedding_mean", np.nan, r"NaN or infinite values \(\['setup.embedding_mean'\]\)"),
        ("setup.embedding_scale", 0.0, r"embedding scale has 1 zero or negative values"),
        ("setup.embedding_scale", np.inf, r"NaN or infinite values \(\['setup.embedding_scale'\]\)"),
    ],
)
def test_non_finite_weights_and_a_zero_embedding_scale_are_refused(folder, model, tensor, value, match):
    header, _ = _header(folder)
    assert tensor in header, sorted(header)
    shape = header[tensor]["shape"]
    values = np.full(shape, 0.5, dtype=np.float32)
    values.flat[0] = value
    _overwrite_tensor(folder, tensor, values)
    with pytest.raises(ValueError, match=match):
        hx.tl.HESpotEx.load(folder)


def test_weights_listed_in_the_header_but_not_in_the_file_are_refused(folder):
    """A header that claims more bytes than the file holds is refused before the data is read."""
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(
        ValueError, match=r"model.safetensors is corrupt \(\d+ bytes described, \d+ found: truncated or padded\)"
    ):
        hx.tl.HESpotEx.load(folder)


# ---------------------------------------------------------------------------------------------- predictions
def test_predict_refuses_to_store_non_finite_predictions(section, model):
    """Finite weights can still overflow (here two gene-head biases of 3e38 add up to inf)."""
    import copy

    import torch

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.module_.direct_head[-1].bias.fill_(3e38)
        broken.module_.decoder.gene_head[-1].bias.fill_(3e38)
    table = section.tables["table"][:, model.genes].copy()
    with pytest.raises(
        ValueError, match=r"predictions are NaN or infinite at 120 spots \(30 genes\), e.g. spot 0; nothing was stored"
    ):
        hx.tl.predict(table, broken, device="cpu")
    assert "hespotex" not in table.layers
    assert "X_hespotex" not in table.obsm
    hx.tl.predict(table, model, device="cpu")  # the intact model stores its predictions
    assert np.isfinite(table.layers["hespotex"]).all()
