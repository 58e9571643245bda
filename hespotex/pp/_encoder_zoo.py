"""Pathology foundation encoders from LazySlide's model zoo (``lazyslide-models``).

The zoo registers each model (UNI / UNI2-h, CONCH, Virchow2, H-optimus-0/1, Prov-GigaPath,
Phikon-v2, CTransPath, ...) with the code that builds it, its preprocessing, output width, licence
and hub id. hespotex does not copy any of that: a zoo name passed as ``encoder`` anywhere
(:func:`hespotex.pp.embed`, :func:`hespotex.tl.train`, ``predict``) builds the model with the zoo's
own constructor and runs the zoo's own ``encode_image``; the preprocessing (input size, mean, std)
is read from the zoo's transform. What hespotex adds is the scale: the zoo does not record the
µm/px a model was trained at, so :data:`hespotex.pp._encoder_zoo_scale.NATIVE_SCALE` does, with its
source (model card, paper or the authors' repository; TRIDENT's per-encoder setting, or a fine-tune's
base model, where the authors say nothing; 20x assumed, and marked so, where none was found), and
:func:`hespotex.pp.embed` cuts patches at that scale unless told otherwise. Entries whose transform
resizes and then centre-crops (Prov-GigaPath: Resize 256 -> CenterCrop 224) get the whole recipe:
the patch is cut at the resize size and the network sees its centre crop (see
:mod:`hespotex.pp._encoder_zoo_load`).

Weights:

- default: the hub, as the zoo downloads them (cached by huggingface_hub; offline they load only
  from that cache). Gated models raise an error saying how to request access and log in.
- ``weights=`` a local file, for entries whose constructor reads a ``model_path`` (UNI, UNI2-h,
  GigaPath-Flash, CROWN, CRISP, CONCH, ...): the checkpoint file as the hub stores it.
- ``weights=`` a local folder holding a download of the hub repository (``config.json`` and
  ``model.safetensors`` / ``pytorch_model.bin``), for the timm-based entries that build from the
  hub config (Virchow2, H-optimus, Prov-GigaPath, Lunit, ...): timm reads it as ``local-dir:``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hespotex.pp._encoder_zoo_scale import native_scale

if TYPE_CHECKING:
    import pandas as pd

ZOO_SOURCE = "lazyslide-models"
#: prefix that names a zoo entry explicitly (``"lazyslide:uni"``); bare zoo names work too.
ZOO_PREFIX = "lazyslide:"

_TASKS = ("vision", "multimodal")


class EncoderUnavailableError(RuntimeError):
    """A zoo encoder that cannot be built here: gated, offline without cached weights, or a missing package."""


@dataclass(frozen=True)
class ZooEntry:
    """What the zoo (and hespotex's scale table) says about one encoder; no weights involved."""

    name: str
    class_name: str
    task: str
    output_width: int | None
    native_mpp: float
    magnification: str
    mpp_source: str
    mpp_assumed: bool
    mpp_evidence: str
    tile_px: int | None
    licence: str | None
    commercial: bool | None
    hub_id: str | None
    gated: bool
    param_size: str | None
    version: str

    @property
    def n_params(self) -> float | None:
        """Parameter count parsed from the zoo's ``param_size`` (``"303.4M"`` -> 3.034e8), if given."""
        match = re.fullmatch(r"\s*([\d.]+)\s*([KMB]?)\s*", str(self.param_size or ""))
        if match is None:
            return None
        return float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[match.group(2)]

    def record(self) -> dict[str, Any]:
        """The entry as stored with embeddings and in a model's setup (JSON-safe, no ``None``)."""
        keys = ("name", "native_mpp", "magnification", "hub_id", "version")
        return {"source": ZOO_SOURCE, **{k: getattr(self, k) for k in keys if getattr(self, k) is not None}}


# --------------------------------------------------------------------------------------------------
# registry


@functools.cache
def zoo_registry() -> dict[str, type]:
    """Zoo classes that embed tiles: a vision or multimodal task and an ``encode_image`` method."""
    try:
        import lazyslide_models
    except ImportError as err:
        msg = "Pathology foundation encoders need the package 'lazyslide-models' (`pip install lazyslide-models`)."
        raise ImportError(msg) from err
    out = {}
    for key, cls in lazyslide_models.MODEL_REGISTRY.items():
        tasks = cls.task if isinstance(cls.task, list) else [cls.task]
        if any(t.value in _TASKS for t in tasks) and callable(getattr(cls, "encode_image", None)):
            out[key] = cls
    return out


def _hub_id(cls: type) -> str | None:
    url = getattr(cls, "hf_url", None) or ""
    match = re.match(r"https://huggingface\.co/(?!collections/)([^/]+/[^/]+)", url)
    return match.group(1) if match else None


def zoo_entries() -> dict[str, ZooEntry]:
    """Every image encoder of the installed ``lazyslide-models``, by registry name."""
    from lazyslide_models import __version__

    entries = {}
    for key, cls in zoo_registry().items():
        tasks = cls.task if isinstance(cls.task, list) else [cls.task]
        scale = native_scale(key)
        licence = cls.license if not isinstance(cls.license, list) else "; ".join(cls.license)
        entries[key] = ZooEntry(
            name=key,
            class_name=cls.__name__,
            task="; ".join(t.value for t in tasks),
            output_width=cls.encode_dim,
            native_mpp=scale.mpp,
            magnification=scale.magnification,
            mpp_source=scale.label,
            mpp_assumed=scale.assumed,
            mpp_evidence=scale.evidence,
            tile_px=scale.tile_px,
            licence=licence,
            commercial=cls.commercial,
            hub_id=_hub_id(cls),
            gated=bool(cls.is_gated),
            param_size=None if cls.param_size is None else str(cls.param_size),
            version=str(__version__),
        )
    return entries


def zoo_name(encoder: Any) -> str | None:
    """The zoo entry ``encoder`` names (``"uni"`` or ``"lazyslide:uni"``), else ``None``.

    Bare names are looked up without importing the zoo when they cannot be zoo names (timm
    architectures, names with a pretrained tag, ``hf-hub:`` ids), so plain timm use stays fast.
    """
    if not isinstance(encoder, str):
        return None
    name = encoder.removeprefix(ZOO_PREFIX)
    if encoder.startswith(ZOO_PREFIX):
        if name not in zoo_registry():
            known = ", ".join(sorted(zoo_registry()))
            msg = f"{name!r} is not an image encoder of lazyslide-models; its encoders are: {known}."
            raise ValueError(msg)
        return name
    if encoder.startswith("hf-hub:") or "/" in encoder:
        return None
    import timm

    if timm.is_model(encoder.partition(".")[0]):  # timm names win without importing the zoo (no name is in both today)
        return None
    try:
        return name if name in zoo_registry() else None
    except ImportError:
        return None


def weights_cached(hub_id: str | None) -> bool:
    """Whether the huggingface_hub cache holds a snapshot of ``hub_id`` (usable offline)."""
    if hub_id is None:
        return False
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(p.is_dir() and any(p.iterdir()) for p in snapshots.iterdir())


def list_encoders(*, timm: str | None = None) -> pd.DataFrame:
    """The encoders hespotex accepts, one row each.

    Parameters
    ----------
    timm
        Also list the timm architectures with pretrained weights matching this pattern (e.g.
        ``"resnet50*"``; see ``timm.list_pretrained``). Any timm architecture name works as an
        encoder, randomly initialised, so they are not listed by default.

    Returns
    -------
    A DataFrame with columns ``name`` (what to pass as ``encoder``), ``source`` (``"hespotex"``,
    ``"lazyslide-models"`` or ``"timm"``), ``task``, ``output_width``, ``native_mpp`` and
    ``magnification`` (the scale the model was trained at, which patches are cut at by default),
    ``mpp_source`` (the model card or paper that states it, or ``"assumed ..."``), ``mpp_assumed``,
    ``mpp_evidence`` (``"publication"``: the authors state it; ``"toolkit"``: TRIDENT's per-encoder
    setting; ``"derived"``: a fine-tune keeps its base model's; ``"assumed"``), ``tile_px`` (the
    published tile side, when the source names one), ``licence``,
    ``commercial``, ``hub_id``, ``gated`` and ``weights_offline`` (the weights are on this machine:
    packaged, or in the huggingface_hub cache). Nothing is downloaded or written.
    """
    import pandas as pd

    from hespotex.pp._encoder_base import EFFICIENTNET_LITE0_IMAGENET, EFFICIENTNET_LITE0_IMAGENET_MULTILAYER

    rows = [
        {
            "name": name,
            "source": "hespotex",
            "task": "vision",
            "output_width": width,
            "native_mpp": None,
            "magnification": None,
            "mpp_source": "ImageNet photos (patch size set by patch_um)",
            "mpp_assumed": False,
            "mpp_evidence": None,
            "tile_px": None,
            "licence": "Apache-2.0",
            "commercial": True,
            "hub_id": None,
            "gated": False,
            "weights_offline": True,
        }
        for name, width in ((EFFICIENTNET_LITE0_IMAGENET_MULTILAYER, 1984), (EFFICIENTNET_LITE0_IMAGENET, 1280))
    ]
    for entry in zoo_entries().values():
        row = asdict(entry)
        for key in ("class_name", "param_size", "version"):
            row.pop(key)
        rows.append({**row, "source": ZOO_SOURCE, "weights_offline": weights_cached(entry.hub_id)})
    if timm is not None:
        import timm as timm_lib

        for name in timm_lib.list_pretrained(timm):
            cfg = timm_lib.models.get_pretrained_cfg(name)
            hub = getattr(cfg, "hf_hub_id", None)
            rows.append(
                {
                    "name": name,
                    "source": "timm",
                    "task": "vision",
                    "licence": getattr(cfg, "license", None),
                    "hub_id": hub,
                    "gated": False,
                    "weights_offline": weights_cached(hub),
                }
            )
    df = pd.DataFrame(rows, columns=list(rows[0])).reset_index(drop=True)
    df["tile_px"] = df["tile_px"].astype("Int64")
    return df


def zoo_entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` of ``name`` (with or without the ``lazyslide:`` prefix)."""
    key = zoo_name(name)
    if key is None:
        msg = f"{name!r} is not a lazyslide-models image encoder; see hx.pp.list_encoders()."
        raise ValueError(msg)
    return zoo_entries()[key]
