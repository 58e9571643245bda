"""The STPath peer (lazyslide-models) scored by hx.tl.cross_validate on the same folds, offline.

STPath's files are written here in the layout its hub repositories use: ``stfm.pth`` (a plain
state dict of lazyslide-models' ``STFM``, here with random weights) and ``symbol2ensembl.json``
(symbol -> Ensembl id over exactly 38,982 ids, as the released vocabulary; here synthetic ids).
GigaPath itself (1.1 B parameters, architecture in its gated hub config) cannot run offline, so the
samples carry random 1536-d features with the record ``hx.pp.embed(encoder="gigapath")`` writes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import hespotex as hx
from hespotex.pp._embed import EMBED_KEY
from hespotex.tl.model._data import EMBEDDING_KEY, graph_data

pytest.importorskip("lazyslide_models")
pytest.importorskip("einops")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.usefixtures("single_threaded"),
    pytest.mark.filterwarnings("ignore:.*not in STPath's vocabulary:UserWarning"),
]

GENES = [f"g{i}" for i in range(30)]
IN_VOCAB = GENES[:20]  # g20..g29 are not in the vocabulary


@pytest.fixture(scope="module")
def stpath_files(tmp_path_factory):
    from lazyslide_models.feature_prediction.stpath._constants import N_ORGANS, N_TECH
    from lazyslide_models.feature_prediction.stpath._model import STFM
    from lazyslide_models.feature_prediction.stpath._vocab import N_GENE_TOKENS, N_UNIQUE_GENES

    folder = tmp_path_factory.mktemp("stpath")
    vocab = {f"FILLER{i}": f"ENSG9{i:010d}" for i in range(N_UNIQUE_GENES - len(IN_VOCAB))}
    vocab.update({g: f"ENSG0{i:010d}" for i, g in enumerate(IN_VOCAB)})
    (folder / "symbol2ensembl.json").write_text(json.dumps(vocab))
    torch.manual_seed(0)
    torch.save(STFM(n_genes=N_GENE_TOKENS, n_tech=N_TECH, n_organs=N_ORGANS).state_dict(), folder / "stfm.pth")
    return {"model_path": str(folder / "stfm.pth"), "gene_voc_path": str(folder / "symbol2ensembl.json")}


def _gigapath_samples(sample_factory, n: int = 3):
    """Samples with 1536-d features recorded as the zoo's GigaPath made them."""
    rng = np.random.default_rng(0)
    out = {}
    for s in range(n):
        sdata = sample_factory(n_spots=40, seed=s, sample_id=f"S{s}")
        table = sdata.tables["table"]
        table.obsm[EMBEDDING_KEY] = rng.normal(size=(table.n_obs, 1536)).astype(np.float32)
        table.uns[EMBED_KEY] = {
            EMBEDDING_KEY: {
                "encoder": "gigapath",
                "encoder_id": "zoo-gigapath-lsm0.1.0-test-224px",
                "patch_um": 112.0,
                "input_size": 224,
                "encoder_entry": {"source": "lazyslide-models", "name": "gigapath", "native_mpp": 0.5},
            }
        }
        out[f"S{s}"] = sdata
    return out


def test_stpath_is_scored_beside_hespotex_on_the_same_folds(sample_factory, stpath_files):
    """One fold, HESpotEx with a tiny config and STPath; STPath's scores equal STPath run directly."""
    from lazyslide_models.feature_prediction import STPath

    from hespotex.models import ModelConfig

    samples = _gigapath_samples(sample_factory)
    tiny = ModelConfig.preset("hespotex", epochs=2, ae_epochs=2, latent_dim=8, ae_hidden_dim=16,
                              projection_hidden_dim=16, head_hidden_dim=16, decoder_heads=1)  # fmt: skip
    cv = hx.tl.cross_validate(
        samples,
        methods=("hespotex", "stpath"),
        genes=GENES,
        folds=["S2"],
        config=tiny,
        validation=None,
        smoothed=False,
        device="cpu",
        baseline_kwargs={"stpath": stpath_files},
    )
    assert set(cv["method"]) == {"hespotex", "stpath"}
    st = cv[cv["method"] == "stpath"].set_index("gene")
    hes = cv[cv["method"] == "hespotex"].set_index("gene")
    assert list(st.index) == list(hes.index) == GENES and set(st["test_sample"]) == {"S2"}
    # not in STPath's vocabulary: no prediction, so r = 0 in every mean (never left out to flatter the mean)
    assert (st.loc[GENES[20:], "pearson"] == 0).all() and st.loc[GENES[20:], "prediction_constant"].all()

    # the same numbers as STPath run directly on the held-out sample
    table = samples["S2"].tables["table"]
    data = graph_data(
        table, "S2", genes=GENES, embedding_key=EMBEDDING_KEY, target_norm="library_modelled"
    )  # as cross_validate
    direct = STPath(genes=IN_VOCAB, **stpath_files).predict(data.emb, coords=data.coords_um)
    truth = np.asarray(
        data.expr[:, : len(IN_VOCAB)].toarray() if hasattr(data.expr, "toarray") else data.expr[:, : len(IN_VOCAB)]
    )
    varies = [j for j in range(len(IN_VOCAB)) if truth[:, j].std() > 0]
    assert len(varies) >= 10
    for j in varies:
        g = IN_VOCAB[j]
        expected = np.corrcoef(truth[:, j], direct[g])[0, 1]
        assert st.loc[g, "pearson"] == pytest.approx(expected, abs=1e-5), g


def test_stpath_refuses_features_of_another_encoder(sample_factory, stpath_files):
    samples = {f"S{s}": sample_factory(n_spots=30, seed=s, sample_id=f"S{s}") for s in range(2)}
    for sdata in samples.values():
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
    with pytest.raises(ValueError, match=r"STPath predicts from 'gigapath' features.*encoder='gigapath'"):
        hx.tl.cross_validate(
            samples, methods=("stpath",), genes=GENES, smoothed=False, baseline_kwargs={"stpath": stpath_files}
        )


def test_stpath_without_its_files_says_how_to_get_them(sample_factory):
    samples = _gigapath_samples(sample_factory, n=2)
    with pytest.raises(FileNotFoundError, match=r"hf download tlhuang/STPath stfm.pth"):
        hx.tl.cross_validate(samples, methods=("stpath",), genes=GENES, smoothed=False)
