"""The HESpotEx model: the :class:`HESpotEx` estimator and its :class:`ModelConfig` (``_model``), the arrays and
graphs it reads (``_data``), the checked ``setup.json`` / safetensors schema of a saved model folder
(``_setup_validation``), ensembles with :func:`load_model` (``_ensemble``), loading from folders and the Hugging Face
Hub (``_resolve``) and the model card written beside the weights (``_card``)."""
