"""HESpotEx ensembles: members per held-out validation section (2 by default), predictions averaged.

Each member is an ordinary :class:`~hespotex.tl.HESpotEx` trained on the same samples with a
whole sample held out for early stopping, each sample held out by as many members, so every sample trains some
member and early stopping stays honest, and with its own seed (:func:`member_seed`), so members start from different
weights; members holding out the same sample share one pre-trained autoencoder (``config.ae_seed``). To the
user the ensemble is one model: :func:`hespotex.tl.predict` averages the members' expression and decoder
attention and stores the members' spread (standard deviation) as an uncertainty layer
``layers[f"{key_added}_spread"]``; :meth:`HESpotExEnsemble.save` writes one folder
(``ensemble.json`` and one sub-folder per member), :func:`load_model` reads either kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hespotex.tl.model._model import HESpotEx

logger = logging.getLogger("hespotex")

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = 1
SPREAD_SUFFIX = "_spread"
DEFAULT_MEMBERS_PER_SAMPLE = 2  # members per held-out sample of hx.tl.train(ensemble="auto" / True)


class HESpotExEnsemble:
    """Several :class:`~hespotex.tl.HESpotEx` on the same genes and embeddings, used as one model.

    Parameters
    ----------
    members
        Trained models with the same genes, encoder, patch size, target and embedding normalisation.
    seed
        The seed the members' seeds were derived from (:func:`member_seed`; ``None`` when not known), recorded
        in ``ensemble.json`` and in a prediction's ``params["seed"]``.

    Attributes
    ----------
    members
        The member models. ``genes``, ``embedding``, ``config``, ``target_sum``, ``target_norm``,
        ``embedding_norm``, ``spot_geometry`` are shared by all of them (read from the first).
    """

    def __init__(self, members: Sequence[HESpotEx], *, seed: int | None = None) -> None:
        members = list(members)
        if len(members) < 2:
            msg = f"An ensemble needs at least 2 trained members; found {len(members)}."
            raise ValueError(msg)
        first = members[0]
        for i, m in enumerate(members):
            if not isinstance(m, HESpotEx):
                msg = f"Member {i} is a {type(m).__name__}, expected a trained HESpotEx."
                raise TypeError(msg)
            m._check_trained()
            same = (
                m.genes == first.genes
                and m.embedding.get("encoder_id") == first.embedding.get("encoder_id")
                and m.embedding.get("patch_um") == first.embedding.get("patch_um")
                and m.embedding.get("tta") == first.embedding.get("tta")
                and m.embedding.get("context_um") == first.embedding.get("context_um")
                and (m.target_norm, m.target_sum, m.embedding_norm)
                == (first.target_norm, first.target_sum, first.embedding_norm)
            )
            if not same:
                msg = (
                    f"Member {i} differs from member 0 in genes, encoder, patch size or normalisation; an ensemble "
                    "averages members trained on the same genes and embeddings."
                )
                raise ValueError(msg)
        self.members = members
        self.seed = None if seed is None else int(seed)

    def __repr__(self) -> str:
        return (
            f"HESpotExEnsemble({len(self.members)} members, {len(self.genes)} genes, "
            f"encoder={self.embedding.get('encoder')!r})"
        )

    # shared settings, read from the first member
    def __getattr__(self, name: str) -> Any:
        if name in {"genes", "embedding", "config", "target_sum", "target_norm", "embedding_norm", "stain_augment",
                    "spot_geometry",
                    "gene_selection", "module_", "embedding_mean_", "embedding_scale_", "train_strategy_"}:  # fmt: skip
            return getattr(self.__dict__["members"][0], name)
        raise AttributeError(name)

    @property
    def is_trained_(self) -> bool:
        return all(m.is_trained_ for m in self.members)

    @property
    def train_samples_(self) -> list[str]:
        return sorted({s for m in self.members for s in m.train_samples_})

    @property
    def validation_(self) -> dict[str, Any]:
        """``"samples"``: the samples held out for early stopping by any member (each by as many members as the
        ensemble has per sample); ``"members"``: each member's own record."""
        held = list(dict.fromkeys(s for m in self.members for s in m.validation_.get("samples", [])))
        return {"samples": held, "members": [m.validation_ for m in self.members]}

    @property
    def history_(self) -> list[dict[str, Any]]:
        """Every member's training history, one row per member and epoch (``"member"``: its position)."""
        return [{"member": k, **h} for k, m in enumerate(self.members) for h in (m.history_ or [])]

    def _check_trained(self) -> None:
        for m in self.members:
            m._check_trained()

    def predict_graph(
        self, sample, *, device: str | None = "auto", max_nodes: int = 50_000, blocks=None, on_block=None, smooth=None
    ) -> dict[str, Any] | None:
        """The members' mean expression, their spread (per-spot, per-gene standard deviation), their agreement per
        gene (:func:`member_agreement`), the first member's latent and the mean decoder attention (see
        :meth:`HESpotEx.predict_graph`).

        With ``on_block`` (streaming), each member runs the ``blocks`` in turn and hands every block over as
        ``on_block(i, core, result)`` with ``result["member"]`` the member's position; the per-block results
        are a member's own (latent and decoder features feed that member's gene heads only), so they are not
        averaged here: :mod:`hespotex.tl.prediction._stream_ensemble` combines the members' expression rows.
        Returns ``None`` then."""
        if on_block is not None:
            for k, member in enumerate(self.members):

                def hand_over(i: int, core: np.ndarray, result: dict[str, Any], k: int = k) -> None:
                    on_block(i, core, {**result, "member": k})

                member.predict_graph(sample, device=device, max_nodes=max_nodes, blocks=blocks, on_block=hand_over)
            return None
        outs = [  # each member smoothed (``smooth``) before the mean and spread, as streaming does
            m.predict_graph(sample, device=device, max_nodes=max_nodes, blocks=blocks, smooth=smooth)
            for m in self.members
        ]
        stack = np.stack([o["expression"] for o in outs])
        attention = None
        if all(o["attention"] is not None for o in outs):
            attention = sum(o["attention"] for o in outs) / len(outs)
            attention = attention.tocsr()
        return {
            "expression": stack.mean(axis=0),
            "spread": stack.std(axis=0),
            "agreement": member_agreement(stack),
            "latent": outs[0]["latent"],
            "attention": attention,
        }

    def setup_dict(self) -> dict[str, Any]:
        """The first member's setup with an ``"ensemble"`` record (members' ids and validation samples)."""
        setup = self.members[0].setup_dict()
        setup["ensemble"] = {
            "n_members": len(self.members),
            "combine": "mean",
            "spread": "standard deviation over members",
            "member_ids": [m.model_id for m in self.members],
            "seed": self.seed,
            "member_seeds": [m.config.seed for m in self.members],
            "validation": [m.validation_.get("samples") for m in self.members],
        }
        return setup

    @property
    def model_id(self) -> str:
        """Fingerprint of the members' fingerprints."""
        return hashlib.sha256("".join(m.model_id for m in self.members).encode()).hexdigest()[:16]

    @property
    def n_parameters(self) -> int:
        return sum(m.n_parameters for m in self.members)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the ensemble to one folder: ``ensemble.json``, a model card ``README.md`` (as
        :meth:`HESpotEx.save`) and ``member_0/``, ``member_1/``... (each a :meth:`HESpotEx.save` folder).
        Written beside the destination under a name unique to the call, with the user's umask and the
        model marker, and renamed into place; an existing folder is replaced only with ``overwrite=True``
        and only when hespotex wrote it (as :meth:`HESpotEx.save`)."""
        from hespotex import _ownership
        from hespotex.tl.model._card import write_card

        path = Path(path)
        with _ownership.replacing_dir(path, "model", what="hespotex model folder", overwrite=overwrite) as tmp:
            names = []
            for i, m in enumerate(self.members):
                names.append(f"member_{i}")
                m.save(tmp / names[-1])
            record = {
                "format": "hespotex-ensemble",
                "format_version": ENSEMBLE_FORMAT,
                "members": names,
                **self.setup_dict()["ensemble"],
            }
            _ownership.write_text_atomic(tmp / ENSEMBLE_FILE, json.dumps(record, indent=1))
            write_card(self, tmp, previous=path if path.is_dir() else None)  # README.md; a user-edited one is kept
        logger.info("Saved %r to %s.", self, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HESpotExEnsemble:
        """Load an ensemble saved with :meth:`save`."""
        path = Path(path)
        try:
            record = json.loads((path / ENSEMBLE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{str(path)!r} is not a readable hespotex ensemble folder ({err}); save the ensemble again."
            raise ValueError(msg) from err
        if (
            not isinstance(record, dict)
            or record.get("format") != "hespotex-ensemble"
            or record.get("format_version") != ENSEMBLE_FORMAT
        ):
            msg = (
                f"Unsupported ensemble record in {str(path / ENSEMBLE_FILE)!r}; this hespotex reads format "
                f"{ENSEMBLE_FORMAT}."
            )
            raise ValueError(msg)
        members = record.get("members")
        if not isinstance(members, list) or not all(
            isinstance(m, str) and "/" not in m and m not in ("", ".", "..") for m in members
        ):
            msg = f"The ensemble record in {str(path)!r} lists no valid member folders; save the ensemble again."
            raise ValueError(msg)
        seed = record.get("seed")  # absent in ensembles saved before members had seeds of their own
        return cls([HESpotEx.load(path / m) for m in members], seed=seed if isinstance(seed, int) else None)


class AgreementStats:
    """Running sums for :func:`member_agreement` over blocks of spots (members x spots x genes each): per member
    and gene the sum and sum of squares, per pair of members the sum of products, in float64."""

    def __init__(self, n_members: int, n_genes: int) -> None:
        self.n = 0
        self.s1 = np.zeros((n_members, n_genes))
        self.s2 = np.zeros((n_members, n_genes))
        self.pairs = [(a, b) for a in range(n_members) for b in range(a + 1, n_members)]
        self.cross = np.zeros((len(self.pairs), n_genes))

    def update(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float64)
        self.n += block.shape[1]
        self.s1 += block.sum(axis=1)
        self.s2 += (block**2).sum(axis=1)
        for k, (a, b) in enumerate(self.pairs):
            self.cross[k] += (block[a] * block[b]).sum(axis=0)

    def agreement(self) -> np.ndarray:
        """The mean pairwise Pearson per gene; NaN where a member is constant, or with < 2 members or spots."""
        if not self.pairs or self.n < 2:
            return np.full(self.s1.shape[1], np.nan)
        mean = self.s1 / self.n
        var = self.s2 / self.n - mean**2
        scale = np.maximum(self.s2 / self.n, 1e-30)
        constant = (var <= 1e-12 * scale).any(axis=0)
        sd = np.sqrt(np.where(var > 0, var, 1.0))
        r = [(self.cross[k] / self.n - mean[a] * mean[b]) / (sd[a] * sd[b]) for k, (a, b) in enumerate(self.pairs)]
        return np.where(constant, np.nan, np.clip(np.mean(r, axis=0), -1.0, 1.0))


def member_agreement(stack: np.ndarray) -> np.ndarray:
    """Per gene, how much the members agree on its spatial pattern: the mean pairwise Pearson, across spots, of the
    members' predictions (``stack``: members x spots x genes). 1 when they agree up to scale and shift; NaN for a
    gene that some member predicts constant, and with fewer than 2 members or 2 spots. On held-out her2st sections
    it ranks the genes by how well the ensemble predicts them (``benchmarks/results/shift_defaults.md``)."""
    stack = np.asarray(stack)
    stats = AgreementStats(stack.shape[0], stack.shape[2])
    for start in range(0, stack.shape[1], 4096):  # float64 copies of a block at a time
        stats.update(stack[:, start : start + 4096])
    return stats.agreement()


def member_seed(seed: int, train_samples: Sequence[str]) -> int:
    """The seed of the ensemble member trained on ``train_samples``: derived from ``seed`` and those samples' names
    (numpy ``SeedSequence``). Members of one ensemble train on different samples, so they start from different
    weights; the same samples and seed give the same seed, so cross-validation folds that train a member on the
    same samples reuse its pre-trained autoencoder (kept in memory per process)."""
    names = sorted({str(n) for n in train_samples})
    words = [int(seed), *(zlib.crc32(n.encode()) for n in names)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def train_ensemble(
    samples: Any, *, fit: Any, seed: int = 0, per_sample: int = DEFAULT_MEMBERS_PER_SAMPLE, **kwargs: Any
) -> HESpotExEnsemble:
    """``per_sample`` ``fit(...)`` (:func:`hespotex.tl.train`, passed in by it) per sample held out for early
    stopping (needs 3 or more samples). Round ``r`` of members is seeded :func:`member_seed` of
    ``1_000_000 * r + seed``; later rounds take the autoencoder of the first round's member holding out the same
    sample (``config.ae_seed``: same training samples, so the same pre-trained autoencoder, computed once)."""
    from hespotex._sample import as_sample_dict
    from hespotex.models._net import resolve_config

    named = as_sample_dict(samples)
    if len(named) < 3:
        msg = (
            f"An ensemble holds out one whole sample per member and needs at least 3 samples; found {len(named)}. "
            "Use ensemble=False."
        )
        raise ValueError(msg)
    kwargs.pop("validation", None)
    config = resolve_config(kwargs.pop("config", None))
    members = []
    for r in range(per_sample):
        for name in named:
            rest = [n for n in named if n != name]
            own = member_seed(1_000_000 * r + seed, rest)
            cfg = config
            if config.ae_samples == "all" and config.ae_seed is None:  # one autoencoder on every sample, shared
                cfg = config.replace(ae_seed=member_seed(seed, list(named)))
            elif r > 0:  # the first round's autoencoder for these training samples
                cfg = config.replace(ae_seed=member_seed(seed, rest) if config.ae_seed is None else config.ae_seed)
            members.append(fit(named, validation=[name], seed=own, config=cfg, ensemble=False, **kwargs))
    return HESpotExEnsemble(members, seed=seed)
