"""The model card ``README.md`` that :meth:`HESpotEx.save` writes beside the weights, so a saved folder can be
published on the Hugging Face Hub as is (``hf upload owner/name my-model``) and loaded back with
``hx.tl.predict(adata, "hf-hub:owner/name")``.

The card follows Hugging Face's format (:class:`huggingface_hub.ModelCard`): YAML front matter
(``library_name: hespotex``, tags and a ``hespotex`` record of genes, encoder, patch size, normalisations
and validation scores), then what the model predicts, what it was trained on, its image embeddings,
its targets, its validation scores and how to load it. Everything comes from the model's setup
(``setup.json``), so the card and the weights never disagree.

The card's last line is a comment with the SHA-256 of the text above it. A card whose text no longer
matches was edited by someone: a later ``save(..., overwrite=True)`` into that folder keeps the edited
card (and says so) instead of replacing the user's text; :func:`model_card` gives the fresh card to
merge by hand, and deleting ``README.md`` lets the next save write it again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger("hespotex")

__all__ = ["CARD_FILE", "card_edited", "model_card", "write_card"]

CARD_FILE = "README.md"
#: Genes listed in the card's text; the full list is in the front matter and ``setup.json``.
N_GENES_SHOWN = 100
_SIGNATURE = "<!-- hespotex model card, sha256 of the text above: {} -->"
_SIGNATURE_RE = re.compile(r"\n<!-- hespotex model card, sha256 of the text above: ([0-9a-f]{64}) -->\n?\Z")


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def best_validation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``{"score", "epoch", "epochs"}`` of the best validation score in a training history (the epoch whose
    weights training kept), or ``None`` when training ran without validation."""
    scored = [(_finite(h.get("validation")), h.get("epoch", i)) for i, h in enumerate(history)]
    scored = [(s, e) for s, e in scored if s is not None]
    if not scored:
        return None
    score, epoch = max(scored, key=lambda t: t[0])
    return {"score": round(score, 4), "epoch": int(epoch), "epochs": len(history)}


def _members(model: Any) -> list[Any]:
    return list(getattr(model, "members", None) or [model])


def _validation(model: Any) -> list[dict[str, Any]]:
    """One record per member: metric, held-out samples (or spatial block), best score and its epoch."""
    out = []
    for i, m in enumerate(_members(model)):
        val = dict(getattr(m, "validation_", {}) or {})
        best = best_validation(getattr(m, "history_", []) or [])
        record = {
            "metric": val.get("metric", "mean per-gene Pearson"),
            "samples": list(val.get("samples") or []),
            "block_fraction": val.get("block_fraction"),
        }
        if best is not None:
            record.update(best)
        if hasattr(model, "members"):
            record = {"member": i, **record}
        out.append(record)
    return out


def _training_data(model: Any) -> dict[str, dict[str, int]]:
    """Spots per sample over all members (a sample held out by one member trains the others)."""
    out: dict[str, dict[str, int]] = {}
    for m in _members(model):
        for name, counts in (getattr(m, "training_data_", None) or {}).items():
            row = out.setdefault(name, {"train_spots": 0, "validation_spots": 0})
            if hasattr(model, "members"):  # per member; report the largest use
                row["train_spots"] = max(row["train_spots"], counts["train_spots"])
                row["validation_spots"] = max(row["validation_spots"], counts["validation_spots"])
            else:
                row.update(counts)
    return out


def _weights_source(embedding: dict[str, Any]) -> str:
    entry = embedding.get("encoder_entry") or {}
    if embedding.get("weights"):
        return f"local weights file {embedding['weights']!r}"
    if entry.get("hub_id"):
        name = f"{entry.get('source', 'registry')} entry {entry.get('name')!r} {entry.get('version', '')}".strip()
        return f"{name}, weights hf-hub:{entry['hub_id']}"
    return f"the encoder's pretrained weights ({embedding.get('encoder_id')})"


def _context_text(record: dict[str, Any]) -> str:
    if record.get("context_um") is None:
        return "none (the spot patch only)"
    return (
        f"{record['context_um']} µm patch centred on the spot, same encoder; its features follow the spot patch's "
        "(two-scale embeddings)"
    )


def _record(model: Any) -> dict[str, Any]:
    """The ``hespotex`` record of the front matter."""
    from hespotex import __version__

    emb = model.embedding
    record = {
        "hespotex_version": __version__,
        "model_id": model.model_id,
        "n_genes": len(model.genes),
        "genes": list(model.genes),
        "encoder": emb.get("encoder"),
        "encoder_id": emb.get("encoder_id"),
        "encoder_entry": emb.get("encoder_entry"),
        "encoder_weights": _weights_source(emb),
        "patch_um": emb.get("patch_um"),
        "patch_px": emb.get("crop_px"),
        "encoder_input_px": emb.get("input_size"),
        "microns_per_pixel": emb.get(
            "mpp", (emb.get("patch_um") or 0) / emb["input_size"] if emb.get("input_size") else None
        ),
        "tta": emb.get("tta"),
        "context_um": emb.get("context_um"),
        "target_norm": model.target_norm,
        "target_sum": model.target_sum,
        "embedding_norm": model.embedding_norm,
        "spot_geometry": dict(model.spot_geometry or {}),
        "training_data": _training_data(model),
        "validation": _validation(model),
    }
    if hasattr(model, "members"):
        record["ensemble_members"] = len(model.members)
    return {k: v for k, v in record.items() if v is not None}


def _um(value: Any) -> str:
    return f"{value:.4g} µm" if isinstance(value, int | float) else "(not recorded)"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _body(model: Any, record: dict[str, Any]) -> str:
    from hespotex.pp._stain import EMBEDDING_NORMS
    from hespotex.pp._targets import TARGET_NORMS

    genes = record["genes"]
    shown = ", ".join(f"`{g}`" for g in genes[:N_GENES_SHOWN])
    more = (
        f", ... ({len(genes) - N_GENES_SHOWN} more: the full list is `genes` in the front matter and in `setup.json`)"
        if len(genes) > N_GENES_SHOWN
        else ""
    )
    kind = (
        f"an ensemble of {record['ensemble_members']} HESpotEx models (predictions averaged, spread as uncertainty)"
        if "ensemble_members" in record
        else "a HESpotEx model"
    )
    data = record["training_data"]
    data_text = (
        _table(
            [[n, c["train_spots"], c["validation_spots"]] for n, c in data.items()],
            ["sample", "training spots", "validation spots"],
        )
        if data
        else "Samples: "
        + (", ".join(f"`{s}`" for s in model.train_samples_) or "not recorded")
        + " (spot counts not recorded by this model's version)."
    )
    val_rows = []
    for v in record["validation"]:
        held = (
            ", ".join(v["samples"])
            if v["samples"]
            else (f"{v['block_fraction']:.0%} spatial block of each sample" if v.get("block_fraction") else "none")
        )
        score = (
            f"{v['score']:.4f} (epoch {v['epoch']} of {v['epochs']})"
            if "score" in v
            else "not recorded (trained without validation)"
        )
        val_rows.append(([v["member"]] if "member" in v else []) + [v["metric"], held, score])
    val_header = (["member"] if "ensemble_members" in record else []) + [
        "metric",
        "held out",
        "best score (weights kept)",
    ]
    geometry = record["spot_geometry"]
    lines = [
        f"# HESpotEx: {record['n_genes']} genes from H&E",
        "",
        f"This is {kind} made with hespotex. It predicts the spatial "
        f"expression of {record['n_genes']} genes at every spot of an H&E slide from frozen image embeddings of "
        f"`{record.get('encoder')}` and the spot graph. Model id `{record['model_id']}`.",
        "",
        "## How to use",
        "",
        "```python",
        "import hespotex as hx",
        "",
        'hx.tl.predict(adata, "hf-hub:<owner>/<name>")  # this repo, or the local folder holding this card',
        "```",
        "",
        "or on the command line: `hespotex predict --model hf-hub:<owner>/<name> --out predictions slide.svs`.",
        "",
        "Predictions are spatially smoothed by default (`smooth=0.5`: each spot keeps half its predicted expression "
        "and takes half from its 6 nearest spots; `smooth=None` for the network's output). The validation scores "
        "below are of the network's unsmoothed output.",
        "",
        "## Genes",
        "",
        f"{record['n_genes']} genes: {shown}{more}.",
        "",
        "## Training data",
        "",
        data_text,
        "",
        f"Spot geometry of the training data: {_um(geometry.get('spot_diameter_um'))} spots, "
        f"{_um(geometry.get('spacing_um'))} apart.",
        "",
        "## Image embeddings",
        "",
        f"- encoder: `{record.get('encoder')}` (`{record.get('encoder_id')}`)",
        f"- weights: {record['encoder_weights']}",
        f"- patch: {record.get('patch_um')} µm ({record.get('patch_px')} px of the scan, resized to "
        f"{record.get('encoder_input_px')} px for the encoder)",
        f"- context: {_context_text(record)}",
        f"- test-time augmentation: {record.get('tta') or 'none'}",
        f"- embedding normalisation: `{record['embedding_norm']}` "
        f"({EMBEDDING_NORMS.get(record['embedding_norm'], '')})",
        "",
        "## Targets",
        "",
        f"Predictions are `{record['target_norm']}`: {TARGET_NORMS.get(record['target_norm'], '')} "
        f"(target_sum {record['target_sum']:g}).",
        "",
        "## Validation (recorded at training)",
        "",
        _table(val_rows, val_header),
        "",
        "## Versions",
        "",
        f"Saved by hespotex {record['hespotex_version']}; package versions at training are in `setup.json`.",
        "",
    ]
    return "\n".join(lines)


def model_card(model: Any) -> Any:
    """The model card of a trained :class:`~hespotex.tl.HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble`.

    Returns
    -------
    A :class:`huggingface_hub.ModelCard`: front matter (``library_name: hespotex``, tags, and a ``hespotex``
    record of genes, encoder, patch size, normalisations, training data and validation scores) and the text.

    Reads the model; writes nothing (``model.save`` writes the card as ``README.md``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    model._check_trained()
    record = _record(model)
    tags = ["hespotex", "spatial-transcriptomics", "histopathology", "gene-expression", "H&E"]
    if record.get("encoder"):
        tags.append(str(record["encoder"]))
    data = ModelCardData(library_name="hespotex", tags=tags, hespotex=record)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(model, record)}")


def _signed(text: str) -> str:
    text = text.rstrip("\n") + "\n"
    return text + _SIGNATURE.format(hashlib.sha256(text.encode()).hexdigest()) + "\n"


def card_edited(folder: str | Path) -> bool:
    """Whether ``folder/README.md`` exists and is not the card hespotex wrote (edited, or written by someone else)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return False
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return True
    match = _SIGNATURE_RE.search(text)
    return match is None or hashlib.sha256(text[: match.start() + 1].encode()).hexdigest() != match.group(1)


def write_card(model: Any, folder: str | Path, *, previous: str | Path | None = None) -> bool:
    """Write the card of ``model`` to ``folder/README.md``; when ``previous`` (the folder being replaced) holds
    a card someone edited, copy that one instead and warn. Returns whether the generated card was written."""
    from hespotex._ownership import write_text_atomic

    folder = Path(folder)
    if previous is not None and card_edited(previous):
        shutil.copyfile(Path(previous) / CARD_FILE, folder / CARD_FILE)  # byte for byte, the user's umask
        logger.warning(
            "Kept the edited %s of %s instead of writing a new model card; its facts (genes, training data, scores) "
            "may now be out of date. Merge them by hand from `hx.tl.model_card(model)`, or delete %s and save again.",
            CARD_FILE, previous, Path(previous) / CARD_FILE,
        )  # fmt: skip
        return False
    write_text_atomic(folder / CARD_FILE, _signed(str(model_card(model))))
    return True
