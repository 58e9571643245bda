"""Tools: the HESpotEx model (train / predict / save / load), evaluation and baselines."""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "HESpotEx": "_model",
        "HESpotExEnsemble": "_ensemble",
        "load_model": "_ensemble",
        "model_card": "model._card",
        "ModelConfig": "_model",
        "train": "_train",
        "predict": "_predict",
        "evaluate": "_evaluate",
        "cross_validate": "_cross_validate",
        "summarize_cv": "_cross_validate",
        "make_baseline": "_baselines",
        "RidgeBaseline": "_baselines",
        "MLPBaseline": "_baselines",
        "RetrievalBaseline": "_baselines",
        "smooth": "_baselines",
        "attention": "_attention",
        "explain": "_explain",
        "Explanation": "_explain",
        "diagnostic_patches": "_diagnostic",
        "DiagnosticPatches": "_diagnostic",
        "consistency": "_consistency",
        "predict_slides": "_cohort",
    },
)
