"""The DeepSpot-M peer (package ``deepspotm``) scored by hx.tl.cross_validate on the same folds, offline.

The released model (``ratschlab/DeepSpotM``) is a LoRA-adapted Midnight ViT-g (1.1 B parameters) that
cannot be written and run here on a shared CPU, so the model is built by ``deepspotm``'s own class with
one of its registered backbones, H0-mini (ViT-B/14; its random weights written into a huggingface_hub
cache in the hub's layout, where ``deepspotm`` looks for them), a small gene vocabulary and an scGPT-sized
gene router, and saved as the release is (``config.json``, ``model.safetensors``, ``tokens.csv``); it is
loaded back through ``DeepSpotM.from_pretrained`` as for the real weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import hespotex as hx
from hespotex.pp._embed import EMBED_KEY
from hespotex.tl.model._data import EMBEDDING_KEY, graph_data

deepspotm = pytest.importorskip("deepspotm")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.usefixtures("single_threaded")]

GENES = [f"g{i}" for i in range(12)]
PANEL = [*GENES[:8], "NOT_IN_DATA"]  # g8..g11 are not in the model's panel


@pytest.fixture(scope="module")
def deepspotm_dir(tmp_path_factory):
    import pandas as pd
    import timm
    from deepspotm.image_encoder import H0miniEncoder
    from huggingface_hub import constants
    from safetensors.torch import save_file, save_model

    root = tmp_path_factory.mktemp("deepspotm")
    patch = pytest.MonkeyPatch()
    patch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))  # the backbone's weights are looked up there
    repo = root / "hub" / "models--bioptimus--H0-mini"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    net = timm.create_model(H0miniEncoder.TIMM_NAME, pretrained=False, num_classes=0, **H0miniEncoder._build_kwargs())
    save_file(net.state_dict(), str(snapshot / "model.safetensors"))

    folder = root / "DeepSpotM"
    folder.mkdir()
    pd.DataFrame({"token": PANEL, "token_type": "gene", "token_id": range(len(PANEL))}).to_csv(
        folder / "tokens.csv", index=False
    )
    torch.manual_seed(1)
    model = deepspotm.DeepSpotM(
        encoder_model="H0miniEncoder",
        token_path=str(folder / "tokens.csv"),
        backbone_pretrained=False,
        init_gene_embeddings=["scgpt"],
        bio_dims={"scgpt": 512},
    )
    hparams = {k: v for k, v in dict(model.hparams).items() if k not in ("token_path", "backbone_pretrained")}
    (folder / "config.json").write_text(json.dumps(hparams))
    save_model(model, str(folder / "model.safetensors"))
    yield folder
    patch.undo()


def _samples(sample_factory, n: int = 3):
    rng = np.random.default_rng(0)
    out = {}
    for s in range(n):
        sdata = sample_factory(n_spots=16, n_genes=len(GENES), seed=s, sample_id=f"S{s}")
        table = sdata.tables["table"]
        table.obsm[EMBEDDING_KEY] = rng.normal(size=(table.n_obs, 16)).astype(np.float32)  # for ridge only
        table.uns[EMBED_KEY] = {
            EMBEDDING_KEY: {"encoder": "test-features", "encoder_id": "test-features-16", "patch_um": 112.0}
        }
        out[f"S{s}"] = sdata
    return out


def _tiles(sdata) -> list[np.ndarray]:
    """224 px tiles (112 µm at 0.5 µm/px) centred on the spots, cut here from the image array, white outside."""
    (key,) = sdata.images
    element = sdata.images[key]
    image = np.asarray(element["scale0"]["image"] if hasattr(element, "children") else element)
    h, w = image.shape[1:]
    tiles = []
    for cx, cy in sdata.tables["table"].obsm["spatial"]:
        x0, y0 = round(cx - 112), round(cy - 112)
        tile = np.full((224, 224, 3), 255, dtype=np.uint8)
        ys, xs = slice(max(y0, 0), min(y0 + 224, h)), slice(max(x0, 0), min(x0 + 224, w))
        tile[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = image[:3, ys, xs].transpose(1, 2, 0)
        tiles.append(tile)
    return tiles


def test_deepspotm_is_scored_beside_ridge_on_the_same_folds(sample_factory, deepspotm_dir):
    from PIL import Image

    samples = _samples(sample_factory)
    cv = hx.tl.cross_validate(
        samples,
        methods=("ridge", "deepspotm"),
        genes=GENES,
        folds=["S2"],
        smoothed=False,
        device="cpu",
        baseline_kwargs={"deepspotm": {"model": str(deepspotm_dir), "source": "scgpt", "batch_size": 8}},
    )
    assert set(cv["method"]) == {"ridge", "deepspotm"}
    ds = cv[cv["method"] == "deepspotm"].set_index("gene")
    assert list(ds.index) == GENES and set(ds["test_sample"]) == {"S2"}
    # not in the model's panel: no prediction, r = 0 in every mean
    assert (ds.loc[GENES[8:], "pearson"] == 0).all() and ds.loc[GENES[8:], "prediction_constant"].all()

    # the same numbers as DeepSpot-M run directly on tiles cut independently from the held-out image
    model, processor = deepspotm.DeepSpotM.from_pretrained(str(deepspotm_dir), source="scgpt", device="cpu")
    x = torch.stack([processor(Image.fromarray(t)) for t in _tiles(samples["S2"])])
    with torch.inference_mode():
        direct = model.predict_genes(x, GENES[:8]).numpy()
    data = graph_data(
        samples["S2"].tables["table"], "S2", genes=GENES, embedding_key=EMBEDDING_KEY, target_norm="library_modelled"
    )
    truth = np.asarray(data.expr.toarray() if hasattr(data.expr, "toarray") else data.expr)
    varies = [j for j in range(8) if truth[:, j].std() > 0 and direct[:, j].std() > 0]
    assert len(varies) >= 5
    for j in varies:
        expected = np.corrcoef(truth[:, j], direct[:, j])[0, 1]
        assert ds.loc[GENES[j], "pearson"] == pytest.approx(expected, abs=1e-4), GENES[j]


def test_deepspotm_without_its_files_or_image_says_what_to_do(sample_factory, tmp_path):
    samples = _samples(sample_factory, n=2)

    def run(kwargs):
        hx.tl.cross_validate(
            samples, methods=("deepspotm",), genes=GENES, smoothed=False, baseline_kwargs={"deepspotm": kwargs}
        )

    with pytest.raises(FileNotFoundError, match=r"hf download ratschlab/DeepSpotM config.json model.safetensors"):
        run({})  # the hub id, offline without the cache
    with pytest.raises(FileNotFoundError, match=r"no such folder"):
        run({"model": str(tmp_path / "absent")})
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks \['model.safetensors', 'tokens.csv'\]"):
        run({"model": str(tmp_path / "partial")})
    with pytest.raises(ValueError, match=r"Unknown DeepSpot-M options \['epochs'\]"):
        run({"epochs": 3})


def test_released_midnight_backbone_is_refused_where_deepspotm_cannot_adapt_it(sample_factory, tmp_path):
    """deepspotm 1.0 targets LoRA at 'query'/'key'/'value'; transformers 5's Dinov2 (Midnight) has none of them."""
    import importlib.resources

    import transformers
    from transformers import AutoConfig, AutoModel

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5: the released backbone builds")
    with importlib.resources.path("deepspotm.assets", "midnight_config.json") as path:
        config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):  # the released 1.1 B-parameter backbone, shapes only
        backbone = AutoModel.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    assert {"q_proj", "k_proj", "v_proj"} <= names and not {"query", "key", "value"} & names

    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"encoder_model": "MidnightEncoder"}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokens.csv").write_text("token,token_type,token_id\nEPCAM,gene,0\n")
    with pytest.raises(RuntimeError, match=r"transformers<5' deepspotm"):
        hx.tl.cross_validate(
            _samples(sample_factory, n=2),
            methods=("deepspotm",),
            genes=GENES,
            smoothed=False,
            baseline_kwargs={"deepspotm": {"model": str(folder)}},
        )
