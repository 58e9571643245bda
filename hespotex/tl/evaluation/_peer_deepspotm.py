"""DeepSpot-M as a pretrained peer of HESpotEx in :func:`hespotex.tl.cross_validate` (``methods=("deepspotm",)``).

DeepSpot-M (Nonchev et al., medRxiv 2026, https://www.medrxiv.org/content/10.64898/2026.06.19.26356060v1)
predicts transcriptome-wide expression from one 224 px H&E tile at 20x (0.5 µm/px) with a LoRA-adapted
Midnight backbone and a cross-attention gene decoder. The PyPI package ``deepspotm`` builds it
(``pip install 'hespotex[deepspotm]'``; code PolyForm Noncommercial 1.0.0, weights CC-BY-NC-SA-4.0,
https://huggingface.co/ratschlab/DeepSpotM): hespotex does not copy its architecture. The released
model needs ``transformers<5``: ``deepspotm`` 1.0 targets LoRA at Midnight's ``query``/``key``/``value``
modules, which transformers 5 renamed (:func:`check_backbone_support` says so before building).

For each held-out spot hespotex cuts the 112 µm patch (224 px at 0.5 µm/px) centred on it, hands it
to DeepSpot-M's own image processor and predicts the fold's genes that are in the model's panel
(``model.gene_names``); the others are ``NaN`` (Pearson 0 in the means, as for STPath). Nothing is
fitted on the training fold. The output is DeepSpot-M's log1p-CPM scale: compare Pearson, not MSE.

Options (``baseline_kwargs={"deepspotm": {...}}``): ``model`` (hub id, default
``"ratschlab/DeepSpotM"``, or a folder holding ``config.json``, ``model.safetensors`` and
``tokens.csv``), ``source`` (gene-embedding source of a multi-source release: ``"scgpt"``,
``"evo2"``, ...), ``batch_size``, ``device``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("hespotex")

DEEPSPOTM_REPO = "ratschlab/DeepSpotM"
TILE_PX, TILE_MPP = 224, 0.5  # DeepSpot-M's tiles: 224 px at native ~20x


def load_deepspotm(model: str | Path = DEEPSPOTM_REPO, *, source: str | None = None, device: str = "cpu") -> Any:
    """``(model, image_processor)`` from ``deepspotm``'s own loader; clear errors when package or files are absent."""
    try:
        from deepspotm import DeepSpotM
    except ImportError as err:
        msg = (
            "The DeepSpot-M peer needs the package 'deepspotm' (`pip install 'hespotex[deepspotm]'`; its code is "
            f"PolyForm Noncommercial 1.0.0, its weights CC-BY-NC-SA-4.0). Import failed: {err}"
        )
        raise ImportError(msg) from err
    where = str(model)
    local = Path(where).expanduser()
    if local.is_dir():
        absent = [f for f in ("config.json", "model.safetensors", "tokens.csv") if not (local / f).is_file()]
        if absent:
            msg = f"DeepSpot-M folder {local} lacks {absent}; it needs config.json, model.safetensors and tokens.csv."
            raise FileNotFoundError(msg)
        check_backbone_support(json.loads((local / "config.json").read_text()).get("encoder_model", "MidnightEncoder"))
        where = str(local)
    elif where.startswith((".", "/", "~")) or where.count("/") != 1:
        msg = f"DeepSpot-M weights {where!r}: no such folder, and not a hub id like {DEEPSPOTM_REPO!r}."
        raise FileNotFoundError(msg)
    try:
        return DeepSpotM.from_pretrained(where, source=source, device=device)
    except ValueError as err:  # peft: the LoRA target modules are not in the backbone
        if "not found in the base model" not in str(err):
            raise
        check_backbone_support("MidnightEncoder")
        raise
    except OSError as err:  # hub: offline without the cache, gated or missing repository
        msg = (
            f"DeepSpot-M's files are not on this machine ({type(err).__name__}: {str(err)[:160]}). Where there is "
            f"network: `hf download {DEEPSPOTM_REPO} config.json model.safetensors tokens.csv` (into the hub cache; "
            "accept the licence on https://huggingface.co/ratschlab/DeepSpotM and `hf auth login` if it asks), or pass "
            "the downloaded folder: baseline_kwargs={'deepspotm': {'model': '/path/to/DeepSpotM'}}."
        )
        raise FileNotFoundError(msg) from err


def check_backbone_support(encoder_model: str) -> None:
    """Refuse, before building it, the released Midnight backbone where ``deepspotm`` cannot adapt it.

    ``deepspotm`` 1.0 puts LoRA on Midnight's (a transformers Dinov2) ``query``/``key``/``value``
    modules, the names of transformers < 5; transformers 5 names them ``q_proj``/``k_proj``/``v_proj``,
    so peft finds no target and the released checkpoint's keys would not match either.
    """
    if encoder_model != "MidnightEncoder":
        return
    import transformers
    from deepspotm.image_encoder import MidnightEncoder

    major = int(transformers.__version__.split(".")[0])
    if major >= 5 and set(MidnightEncoder.LORA_TARGET_MODULES) >= {"query", "key", "value"}:
        import deepspotm

        msg = (
            f"DeepSpot-M's released model (deepspotm {getattr(deepspotm, '__version__', '1.x')}) adapts its Midnight "
            "backbone with LoRA on the modules 'query', 'key', 'value' of transformers < 5; this environment has "
            f"transformers {transformers.__version__}, whose Dinov2 names them q_proj/k_proj/v_proj, so the model "
            "cannot be built and its checkpoint would not load. Run the DeepSpot-M peer in an environment with "
            "`pip install 'transformers<5' deepspotm`."
        )
        raise RuntimeError(msg)


def deepspotm_predictions(
    samples: Mapping[str, Any], genes: list[str], *, kwargs: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Predictions ``(n_spots, n_genes)`` of DeepSpot-M for every held-out sample (SpatialData with its image)."""
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from hespotex.pp._patches import plan_patches

    options = dict(kwargs)
    batch_size = int(options.pop("batch_size", 32))
    device = options.pop("device", "cpu")
    unknown = set(options) - {"model", "source"}
    if unknown:
        msg = f"Unknown DeepSpot-M options {sorted(unknown)}; expected model, source, batch_size, device."
        raise ValueError(msg)
    for name, sdata in samples.items():
        if not getattr(sdata, "images", None):
            msg = f"DeepSpot-M predicts from the H&E image; sample {name!r} has none (pass SpatialData with its image)."
            raise ValueError(msg)
    model, processor = load_deepspotm(**options, device=device)
    in_panel = set(model.gene_names)
    panel = [g for g in genes if g in in_panel]
    cols = np.array([genes.index(g) for g in panel], dtype=np.int64)
    out = {}
    for name, sdata in samples.items():
        plan = plan_patches(sdata, patch_um=TILE_PX * TILE_MPP, out_px=TILE_PX)
        pred = np.full((len(plan.x0), len(genes)), np.nan, dtype=np.float32)
        if panel:
            for idx in tqdm(list(plan.batches(batch_size)), desc=f"DeepSpot-M {name}", leave=False):
                crops = plan.read(idx)  # (b, 3, s, s) uint8 at the level's resolution; the processor resizes to 224
                x = torch.stack([processor(Image.fromarray(np.ascontiguousarray(c.transpose(1, 2, 0)))) for c in crops])
                with torch.inference_mode():
                    values = model.predict_genes(x.to(device), panel)
                pred[np.ix_(idx, cols)] = values.float().cpu().numpy()
        if len(panel) < len(genes):
            logger.info(
                "DeepSpot-M has no output for %d of the %d genes of %s.", len(genes) - len(panel), len(genes), name
            )
        out[name] = pred
    return out
