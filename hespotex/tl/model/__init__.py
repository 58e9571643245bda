"""The HESpotEx model and what belongs to it: its setup, ensembles, loading (folders and the Hugging Face Hub) and model card."""
