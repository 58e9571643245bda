"""Training: the public :func:`~hespotex.tl.train` front end (``_train``), the mini-batch training loop over spatial
blocks (``_training``), data-parallel training with torch.distributed (``_distributed``) and the hyperparameter
search of the baselines (``_tune``)."""
