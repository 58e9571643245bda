"""Tools: the HESpotEx model (train / predict / save / load), evaluation and baselines.

Layout: ``model/`` (the model class, its setup and saved folders, ensembles), ``training/`` (``train``, the
training loop, data-parallel training, baseline tuning), ``prediction/`` (``predict`` in memory and streamed,
cohorts, prediction tables), ``evaluation/`` (``evaluate``, metrics, baselines, cross-validation, consistency)
and ``explanation/`` (attention, attributions, diagnostic patches).
"""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "HESpotEx": "model._model",
        "HESpotExEnsemble": "model._ensemble",
        "load_model": "model._resolve",
        "model_card": "model._card",
        "ModelConfig": "model._model",
        "train": "training._train",
        "predict": "prediction._predict",
        "evaluate": "evaluation._evaluate",
        "cross_validate": "evaluation._cross_validate",
        "summarize_cv": "evaluation._cross_validate",
        "make_baseline": "evaluation._baselines",
        "RidgeBaseline": "evaluation._baselines",
        "MLPBaseline": "evaluation._baselines",
        "RetrievalBaseline": "evaluation._baselines",
        "smooth": "evaluation._baselines",
        "attention": "explanation._attention",
        "explain": "explanation._explain",
        "Explanation": "explanation._explain",
        "diagnostic_patches": "explanation._diagnostic",
        "DiagnosticPatches": "explanation._diagnostic",
        "consistency": "evaluation._consistency",
        "predict_slides": "prediction._cohort",
    },
)
