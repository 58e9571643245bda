"""Prediction: :func:`~hespotex.tl.predict` in memory (``_predict``), streamed into a resumable zarr store for whole
slides (``_stream``), over a cohort of slides (``_cohort``), and where a prediction table is found and recorded."""
