"""The measured expression a prediction is compared with (``truth``), normalised like the prediction: one
definition for ``hx.tl.evaluate`` and the views of ``hx.pl.evaluation``."""

from __future__ import annotations

from typing import Any

import numpy as np

from hespotex._constants import MEASURED_LAYER
from hespotex._sample import get_table
from hespotex.pp._targets import target_expression


def measured_expression(table: Any, *, params: dict[str, Any] | None = None, truth: Any = None) -> np.ndarray:
    """Measured expression of the predicted spots and genes, normalised like the predictions.

    ``truth``: ``None`` uses ``layers["measured"]`` when present, else the table's own counts (``X`` or
    ``layers["counts"]``) log-normalised with the prediction's ``target_sum``; a string names a layer
    already normalised; a sample or AnnData is matched by ``obs_names`` and normalised the same way
    (``target_sum`` / ``target_norm`` of the prediction's record ``params``).
    """
    params = params or {}
    target_sum = float(params.get("target_sum", 1e4))
    target_norm = str(params.get("target_norm", "library_all"))
    genes = list(table.var_names)
    auto = truth is None
    if auto:
        truth = MEASURED_LAYER if MEASURED_LAYER in table.layers else table
    if isinstance(truth, str):
        if truth not in table.layers:
            msg = (
                f"Expected measured expression in layers[{truth!r}], found layers {list(table.layers)}. Pass "
                "`truth=` the measured sample."
            )
            raise KeyError(msg)
        y = table.layers[truth]
        return np.asarray(y.toarray() if hasattr(y, "toarray") else y, dtype=np.float32)
    measured = get_table(truth)
    missing = table.obs_names.difference(measured.obs_names)
    if len(missing):
        msg = (
            f"{len(missing)} predicted spots are absent from the truth table, e.g. {list(missing[:3])}; expected "
            "the same spots."
        )
        raise KeyError(msg)
    if measured is not table:
        measured = measured[table.obs_names]
    if not auto:
        return target_expression(measured, genes, target_norm=target_norm, target_sum=target_sum)
    try:  # the automatic fallback on the table's own counts: say what is missing
        return target_expression(measured, genes, target_norm=target_norm, target_sum=target_sum)
    except (KeyError, ValueError) as err:
        msg = (
            "Found no measured expression for the predictions: no layers['measured'] and the table's counts "
            f"cannot be used ({err}). Pass `truth=`."
        )
        raise ValueError(msg) from err
