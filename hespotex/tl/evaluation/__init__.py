"""Evaluation: :func:`~hespotex.tl.evaluate` and the per-gene metrics behind it (``_metrics``), the baselines
(``_baselines``), cross-validation over samples (``_cross_validate``), the peer predictions it compares against
(``_peers``) and the consistency of predictions across sections (``_consistency``)."""
