"""The ST-Net-style image-only baseline (:class:`MLPBaseline`: a small MLP trained with MSE in torch)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from hespotex.tl.evaluation._baseline_base import Baseline, check_X, check_y, safe_scale

logger = logging.getLogger("hespotex")


class MLPBaseline(Baseline):
    """ST-Net-style image-only regression head: an MLP from embedding to genes, trained with MSE.

    ST-Net (He et al., Nat Biomed Eng 2020) regresses expression from each spot's patch alone, with no
    neighbourhood information; here the frozen encoder's embeddings replace the fine-tuned CNN, and
    an MLP (``Linear -> GELU -> Dropout`` per hidden layer, then ``Linear`` to genes) is trained. Inputs
    are standardised and each gene's target is z-scored with statistics of the training data, so every
    gene weighs alike in the loss; predictions are returned on the original scale.

    Parameters
    ----------
    hidden
        Widths of the hidden layers; ``()`` gives a linear model.
    epochs
        Maximum number of passes over the training spots.
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    dropout
        Dropout after each hidden layer.
    batch_size
        Spots per optimisation step.
    patience
        Early stopping: with validation data, stop after this many epochs without improvement of the
        validation loss and restore the best weights.
    seed
        Seeds weight initialisation, shuffling and dropout (the global torch RNG state is restored after
        fitting). Same seed, same result on CPU.
    device
        Torch device (``"auto"`` follows :data:`hespotex.settings`).

    Attributes
    ----------
    module_
        The trained ``torch.nn.Module``, in eval mode, on ``device``.
    history_
        ``{"train_loss": [...], "val_loss": [...]}`` per epoch (standardised-target MSE).
    best_epoch_
        Epoch (1-based) whose weights were kept.
    """

    name = "mlp"
    _param_names = (
        "hidden",
        "epochs",
        "lr",
        "weight_decay",
        "dropout",
        "batch_size",
        "patience",
        "seed",
        "device",
    )

    def __init__(
        self,
        hidden: Sequence[int] = (256,),
        *,
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        batch_size: int = 128,
        patience: int = 20,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if isinstance(hidden, int):
            hidden = (hidden,)
        if any(int(h) < 1 for h in hidden):
            msg = f"`hidden` must be positive layer widths; found {hidden}."
            raise ValueError(msg)
        if epochs < 1 or batch_size < 1 or patience < 1:
            msg = f"`epochs`, `batch_size` and `patience` must be >= 1; found {epochs}, {batch_size}, {patience}."
            raise ValueError(msg)
        if not 0 <= dropout < 1:
            msg = f"`dropout` must lie in [0, 1); found {dropout}."
            raise ValueError(msg)
        self.hidden = tuple(int(h) for h in hidden)
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.device = device

    def _build(self, n_in: int, n_out: int):
        from torch import nn

        layers: list[nn.Module] = []
        width = n_in
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(self.dropout)]
            width = h
        layers.append(nn.Linear(width, n_out))
        return nn.Sequential(*layers)

    def fit(self, X: Any, y: Any, *, validation: tuple[Any, Any] | None = None) -> MLPBaseline:
        """Train on embeddings ``X`` and expression ``y``.

        Parameters
        ----------
        X, y
            Training embeddings ``(n, n_features)`` and expression ``(n, n_genes)`` (read, not modified).
        validation
            Optional ``(X_val, y_val)`` used only for early stopping: spots held out from training and
            **never the test spots**. Without it, all ``epochs`` run and the last weights are kept.

        Returns
        -------
        ``self``, with ``module_``, ``history_``, ``best_epoch_`` and the standardisation statistics set.
        """
        import torch

        from hespotex._settings import resolve_device

        X = check_X(X, dtype=np.float32)
        y = check_y(y, X.shape[0], dtype=np.float32)
        dev = resolve_device(self.device)

        self.x_mean_ = X.mean(axis=0)
        self.x_scale_ = safe_scale(X.std(axis=0))
        self.y_mean_ = y.mean(axis=0)
        self.y_scale_ = safe_scale(y.std(axis=0))
        xt = torch.from_numpy((X - self.x_mean_) / self.x_scale_)
        yt = torch.from_numpy((y - self.y_mean_) / self.y_scale_)
        val = None
        if validation is not None:
            if len(validation) != 2:
                msg = "`validation` must be a pair (X_val, y_val) of held-out spots (never test spots)."
                raise ValueError(msg)
            xv = check_X(validation[0], "X_val", dtype=np.float32)
            if xv.shape[1] != X.shape[1]:
                msg = f"`X_val` has {xv.shape[1]} features but `X` has {X.shape[1]}."
                raise ValueError(msg)
            yv = check_y(validation[1], xv.shape[0], "y_val", dtype=np.float32)
            if yv.shape[1] != y.shape[1]:
                msg = f"`y_val` has {yv.shape[1]} genes but `y` has {y.shape[1]}."
                raise ValueError(msg)
            val = (
                torch.from_numpy((xv - self.x_mean_) / self.x_scale_).to(dev),
                torch.from_numpy((yv - self.y_mean_) / self.y_scale_).to(dev),
            )

        fork = {"devices": [dev.index or 0], "device_type": "cuda"} if dev.type == "cuda" else {"devices": []}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(self.seed)
            module = self._build(X.shape[1], y.shape[1]).to(dev)
            gen = torch.Generator().manual_seed(self.seed)
            opt = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
            best_loss, best_state, best_epoch, stale = np.inf, None, self.epochs, 0
            n = X.shape[0]
            for epoch in range(1, self.epochs + 1):
                module.train()
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for start in range(0, n, self.batch_size):
                    idx = perm[start : start + self.batch_size]
                    xb, yb = xt[idx].to(dev), yt[idx].to(dev)
                    loss = torch.nn.functional.mse_loss(module(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                history["train_loss"].append(total / n)
                if val is None:
                    continue
                module.eval()
                with torch.inference_mode():
                    vloss = float(torch.nn.functional.mse_loss(module(val[0]), val[1]))
                history["val_loss"].append(vloss)
                if vloss < best_loss:
                    best_loss, best_epoch, stale = vloss, epoch, 0
                    best_state = copy.deepcopy(module.state_dict())
                else:
                    stale += 1
                    if stale >= self.patience:
                        logger.debug("MLPBaseline: early stop at epoch %d (best %d)", epoch, best_epoch)
                        break
            if best_state is not None:
                module.load_state_dict(best_state)
        module.eval()
        self.module_ = module
        self.history_ = history
        self.best_epoch_ = best_epoch if val is not None else len(history["train_loss"])
        self._set_shapes(X, y)
        self.is_fitted_ = True
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted expression, ``float32`` ``(n_spots, n_genes_)``, computed in batches."""
        import torch

        X = self._check_predict(X, dtype=np.float32)
        xs = torch.from_numpy((X - self.x_mean_) / self.x_scale_)
        dev = next(self.module_.parameters()).device
        out = np.empty((X.shape[0], self.n_genes_), dtype=np.float32)
        step = max(self.batch_size, 1024)
        with torch.inference_mode():
            for start in range(0, X.shape[0], step):
                out[start : start + step] = self.module_(xs[start : start + step].to(dev)).cpu().numpy()
        return out * self.y_scale_ + self.y_mean_
