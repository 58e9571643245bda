"""One way to find a prediction: the helpers of ``hespotex.tl.prediction._tables`` that attention, diagnostic
patches, evaluate, streaming, the plots and the exporters all use."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from hespotex.tl.prediction._tables import (
    PREDICTION_KEY,
    find_prediction,
    prediction_records,
    recorded_params,
    spot_tables,
)


def _table(n: int = 5, genes=("a", "b")) -> AnnData:
    t = AnnData(np.ones((n, len(genes)), dtype=np.float32), var=pd.DataFrame(index=list(genes)))
    t.obs_names = [f"s{i}" for i in range(n)]
    return t


def test_recorded_params_reads_what_predict_recorded_and_nothing_else():
    t = _table()
    t.uns["hespotex"] = {"params": {"layer": "hespotex", "model_id": "m1"}}
    t.uns["mine"] = {"params": {"layer": "mine"}}
    t.uns["no_params"] = {"other": 1}
    t.uns["not_a_dict"] = "text"
    assert recorded_params(t) == {"layer": "hespotex", "model_id": "m1"}
    assert recorded_params(t, "mine") == {"layer": "mine"}
    assert recorded_params(t, "no_params") is None
    assert recorded_params(t, "not_a_dict") is None
    assert recorded_params(t, "absent") is None


def test_find_prediction_prefers_the_default_key_then_any_recorded_layer():
    t = _table()
    t.layers["other"] = np.zeros((5, 2), dtype=np.float32)
    t.uns["other"] = {"params": {"layer": "other", "model_id": "m2"}}
    t.uns["stale"] = {"params": {"layer": "gone"}}  # names a layer the table no longer has: not a prediction
    assert list(prediction_records(t)) == ["other"]
    assert find_prediction(t) == ("other", {"layer": "other", "model_id": "m2"})

    t.layers[PREDICTION_KEY] = np.ones((5, 2), dtype=np.float32)
    t.uns[PREDICTION_KEY] = {"params": {"layer": PREDICTION_KEY, "model_id": "m1"}}
    assert list(prediction_records(t)) == ["other", PREDICTION_KEY]
    layer, params = find_prediction(t)
    assert (layer, params["model_id"]) == (PREDICTION_KEY, "m1")
    params["model_id"] = "changed"  # a copy: the record in uns is untouched
    assert t.uns[PREDICTION_KEY]["params"]["model_id"] == "m1"

    assert find_prediction(t, "other")[1]["model_id"] == "m2"
    t.layers["bare"] = np.zeros((5, 2), dtype=np.float32)
    assert find_prediction(t, "bare") == ("bare", {"layer": "bare"})
    assert find_prediction(t, "missing") is None
    assert find_prediction(_table()) is None


def test_find_prediction_falls_back_to_an_unrecorded_default_layer():
    t = _table()
    t.layers[PREDICTION_KEY] = np.ones((5, 2), dtype=np.float32)
    assert find_prediction(t) == (PREDICTION_KEY, {"layer": PREDICTION_KEY})


def test_spot_tables_orders_the_spot_table_first_and_filters_other_spots(sample_factory):
    sdata = sample_factory(n_spots=30, n_genes=6)
    main = sdata.tables["table"]
    other_genes = AnnData(
        np.zeros((main.n_obs, 3), dtype=np.float32), obs=pd.DataFrame(index=main.obs_names.copy())
    )  # the table predict writes when the genes differ: same spots
    other_spots = _table(7)
    sdata.tables["zzz_other_spots"] = other_spots
    sdata.tables[PREDICTION_KEY] = other_genes

    same = spot_tables(sdata)
    assert [name for name, _ in same] == ["table", PREDICTION_KEY]
    assert same[0][1] is main and same[1][1] is sdata.tables[PREDICTION_KEY]

    every = spot_tables(sdata, same_spots=False, prefer=PREDICTION_KEY)
    assert [name for name, _ in every] == ["table", PREDICTION_KEY, "zzz_other_spots"]
    every = spot_tables(sdata, same_spots=False, prefer="zzz_other_spots")
    assert [name for name, _ in every] == ["table", "zzz_other_spots", PREDICTION_KEY]

    assert [name for name, _ in spot_tables(main)] == ["table"]  # a bare AnnData is its own spot table
