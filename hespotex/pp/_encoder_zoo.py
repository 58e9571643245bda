"""Pathology foundation encoders from LazySlide's model zoo (``lazyslide-models``).

The zoo registers each model (UNI / UNI2-h, CONCH, Virchow2, H-optimus-0/1, Prov-GigaPath,
Phikon-v2, CTransPath, ...) with the code that builds it, its preprocessing, output width, licence
and hub id. hespotex does not copy any of that: a zoo name passed as ``encoder`` anywhere
(:func:`hespotex.pp.embed`, :func:`hespotex.tl.train`, ``predict``) builds the model with the zoo's
own constructor and runs the zoo's own ``encode_image``; the preprocessing (input size, mean, std)
is read from the zoo's transform. What hespotex adds is the scale: the zoo does not record the
µm/px a model was trained at, so :data:`NATIVE_MPP` does (20×, 0.5 µm/px, for the histology
encoders whose cards state it; the same 20× assumed for the others, marked as such), and
:func:`hespotex.pp.embed` cuts patches at that scale unless told otherwise.

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

import dis
import functools
import hashlib
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hespotex._settings import logger

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from hespotex.pp._encoder_base import Encoder

ZOO_SOURCE = "lazyslide-models"
#: prefix that names a zoo entry explicitly (``"lazyslide:uni"``); bare zoo names work too.
ZOO_PREFIX = "lazyslide:"

#: Native scale (µm/px, magnification) of zoo encoders as their model cards state it. Entries not
#: listed are assumed to be 20× (0.5 µm/px), the scale nearly all histology encoders are trained at;
#: :func:`list_encoders` marks which is which.
NATIVE_MPP: dict[str, tuple[float, str]] = {
    **dict.fromkeys(("uni", "uni2", "conch", "conch-madeleine", "titan", "conch_v1.5"), (0.5, "20x")),
    **dict.fromkeys(("virchow", "virchow2", "crisp"), (0.5, "20x")),
    **dict.fromkeys(("h-optimus-0", "h-optimus-1", "h0-mini"), (0.5, "20x")),
    **dict.fromkeys(("gigapath", "gigapath-flash"), (0.5, "20x")),
    **dict.fromkeys(("phikon", "phikonv2"), (0.5, "20x")),
}
DEFAULT_MPP: tuple[float, str] = (0.5, "20x")

_TASKS = ("vision", "multimodal")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".pt2", ".ckpt")
_PATCH_LOCK = threading.Lock()  # the timm redirect below patches a module attribute


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
def _registry() -> dict[str, type]:
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
    for key, cls in _registry().items():
        tasks = cls.task if isinstance(cls.task, list) else [cls.task]
        mpp, mag = NATIVE_MPP.get(key, DEFAULT_MPP)
        licence = cls.license if not isinstance(cls.license, list) else "; ".join(cls.license)
        entries[key] = ZooEntry(
            name=key,
            class_name=cls.__name__,
            task="; ".join(t.value for t in tasks),
            output_width=cls.encode_dim,
            native_mpp=mpp,
            magnification=mag,
            mpp_source="model card" if key in NATIVE_MPP else "assumed (20x)",
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
        if name not in _registry():
            known = ", ".join(sorted(_registry()))
            msg = f"{name!r} is not an image encoder of lazyslide-models; its encoders are: {known}."
            raise ValueError(msg)
        return name
    if encoder.startswith("hf-hub:") or "/" in encoder:
        return None
    import timm

    if timm.is_model(encoder.partition(".")[0]):  # timm names win without importing the zoo (no name is in both today)
        return None
    try:
        return name if name in _registry() else None
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
    ``magnification`` (the scale patches are cut at by default), ``mpp_source``, ``licence``,
    ``commercial``, ``hub_id``, ``gated`` and ``weights_offline`` (the weights are on this machine:
    packaged, or in the huggingface_hub cache). Nothing is downloaded or written.
    """
    import pandas as pd

    from hespotex.pp._encoder_base import EFFICIENTNET_LITE0_IMAGENET

    rows = [
        {
            "name": EFFICIENTNET_LITE0_IMAGENET,
            "source": "hespotex",
            "task": "vision",
            "output_width": 1280,
            "native_mpp": None,
            "magnification": None,
            "mpp_source": "ImageNet photos (patch size set by patch_um)",
            "licence": "Apache-2.0",
            "commercial": True,
            "hub_id": None,
            "gated": False,
            "weights_offline": True,
        }
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
    return pd.DataFrame(rows, columns=list(rows[0])).reset_index(drop=True)


def zoo_entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` of ``name`` (with or without the ``lazyslide:`` prefix)."""
    key = zoo_name(name)
    if key is None:
        msg = f"{name!r} is not a lazyslide-models image encoder; see hx.pp.list_encoders()."
        raise ValueError(msg)
    return zoo_entries()[key]


# --------------------------------------------------------------------------------------------------
# building


def _module_class() -> type:
    import torch

    class ZooEncoderModule(torch.nn.Module):
        """``encode_image`` of a zoo model as a module: normalised ``(B, 3, S, S)`` -> ``(B, F)``.

        Entries that preprocess with their own image processor (``get_transform() is None``) get
        the batch as uint8 RGB and do their own resizing and normalisation.
        """

        def __init__(self, zoo_model: Any, *, raw_input: bool) -> None:
            super().__init__()
            self.zoo_model = zoo_model
            self.raw_input = raw_input
            if isinstance(zoo_model.model, torch.nn.Module):
                self.net = zoo_model.model  # registered, so .to(), .eval() and parameters() reach it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.raw_input:
                x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
            out = self.zoo_model.encode_image(x)
            return torch.as_tensor(out).float()

    return ZooEncoderModule


def _transform_spec(zoo_model: Any) -> dict[str, Any]:
    """Input size, mean and std from the zoo's own transform (or image processor)."""
    transform = zoo_model.get_transform()
    if transform is None:  # preprocessed inside encode_image by a transformers image processor
        proc = getattr(zoo_model, "img_processor", None) or getattr(zoo_model, "processor", None)
        size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        return {"input_size": int(side or 224), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "raw_input": True}
    spec: dict[str, Any] = {"raw_input": False}
    for step in getattr(transform, "transforms", [transform]):
        kind = type(step).__name__
        if kind == "Resize":
            size = step.size
            spec["resize"] = int(size if isinstance(size, int) else size[0])
        elif kind == "CenterCrop":
            spec["input_size"] = int(step.size[0])
        elif kind == "Normalize":
            spec["mean"], spec["std"] = tuple(step.mean), tuple(step.std)
    spec.setdefault("input_size", spec.get("resize", 224))
    spec.setdefault("mean", (0.0, 0.0, 0.0))
    spec.setdefault("std", (1.0, 1.0, 1.0))
    return spec


def _reads_model_path(cls: type) -> bool:
    """Whether the zoo constructor uses its ``model_path`` argument (read from its bytecode)."""
    return any(ins.opname.startswith("LOAD_FAST") and "model_path" in str(ins.argval) for ins in dis.get_instructions(cls.__init__))


def _hub_error(entry: ZooEntry, err: BaseException) -> EncoderUnavailableError:
    """Turn a download / import failure of the zoo constructor into an error that says what to do."""
    from huggingface_hub.errors import GatedRepoError

    where = f"https://huggingface.co/{entry.hub_id}" if entry.hub_id else "its hub page"
    if isinstance(err, GatedRepoError) or "gated" in str(err).lower():
        msg = (
            f"The encoder {entry.name!r} is gated: request access at {where} with your Hugging Face account, then "
            "log in on this machine (`hf auth login`, or set HF_TOKEN) and call again. Or download the weights "
            "where you have access and pass them with `weights=`."
        )
    elif isinstance(err, ImportError):
        msg = f"The encoder {entry.name!r} needs a package that cannot be imported here: {err}"
    else:
        msg = (
            f"Could not get the hub files of {entry.name!r} ({type(err).__name__}: {str(err)[:200]}). Offline "
            f"(HF_HUB_OFFLINE=1 or no network) they load only from the huggingface_hub cache. Download them "
            f"where you have network (`hf download {entry.hub_id or '<repo>'}`; gated: {entry.gated}) into the "
            "cache, or pass a local copy with `weights=` (a checkpoint file or the downloaded repo folder)."
        )
    return EncoderUnavailableError(msg)


@contextmanager
def _timm_redirect(local_dir: Path | None, built: list[tuple[str, dict[str, Any], Any]], *, random: bool, device: Any):
    """Let the zoo constructor call ``timm.create_model`` as it does, recording what it builds.

    ``local_dir``: hub ids (``hf-hub:`` / ``hf_hub:``) become ``local-dir:`` so timm reads the config
    and weights of a local download. ``random``: build without pretrained weights (tests).
    """
    import timm
    import torch

    real = timm.create_model

    def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        if local_dir is not None and re.match(r"hf[-_]hub:", model_name):
            model_name = f"local-dir:{local_dir}"
        with torch.device(device):
            model = real(model_name, pretrained=pretrained and not random, **kwargs)
        built.append((model_name, kwargs, model))
        return model

    with _PATCH_LOCK:
        timm.create_model = create_model
        try:
            yield
        finally:
            timm.create_model = real


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES)


def _sha(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _construct(entry: ZooEntry, *, weights: str | Path | None, token: str | None) -> tuple[Any, str]:
    """Build the zoo model with its own constructor; return it and a fingerprint of its weights."""
    import lazyslide_models

    cls = _registry()[entry.name]
    if weights is None:
        try:
            zoo_model = cls(token=token)
        except (OSError, ImportError) as err:
            raise _hub_error(entry, err) from err
        from hespotex.pp._encoder_base import state_fingerprint

        return zoo_model, f"hub-{state_fingerprint(zoo_model.model)}"

    path = Path(weights).expanduser()
    if not path.exists():
        msg = f"Weights {path} not found; pass a checkpoint file or a folder holding the hub files of {entry.name!r}."
        raise FileNotFoundError(msg)
    files = _weight_files(path) if path.is_dir() else [path]
    if _reads_model_path(cls):
        if len(files) != 1:
            msg = (
                f"{entry.name!r} loads one checkpoint file; the folder {path} holds {len(files)} "
                f"({[f.name for f in files]}). Pass the file itself."
            )
            raise ValueError(msg)
        try:
            zoo_model = cls(model_path=str(files[0]), token=token)
        except (OSError, ImportError) as err:
            raise _hub_error(entry, err) from err
        except RuntimeError as err:  # load_state_dict: wrong keys or shapes
            msg = f"The checkpoint {files[0].name} does not fit {entry.name!r} as the zoo builds it: {str(err)[:400]}"
            raise ValueError(msg) from err
        return zoo_model, f"file-{_sha(files)}"
    if path.is_dir() and issubclass(cls, lazyslide_models.TimmModel) and (path / "config.json").is_file():
        built: list = []
        with _timm_redirect(path, built, random=False, device="cpu"):
            zoo_model = cls(token=token)
        if not any(name.startswith("local-dir:") for name, _, _ in built):
            msg = f"{entry.name!r} did not build from the folder {path}; pass a checkpoint file or use the hub cache."
            raise ValueError(msg)
        return zoo_model, f"dir-{_sha(files)}"
    how = (
        "a folder holding a download of the hub repository (config.json and model.safetensors or pytorch_model.bin)"
        if issubclass(cls, lazyslide_models.TimmModel)
        else "nothing local: its zoo constructor loads through the hub cache only; download it there "
        f"(`hf download {entry.hub_id}`) and call without `weights`"
    )
    msg = f"{entry.name!r} cannot load {path.name}: it takes {how}."
    raise ValueError(msg)


def _random_zoo_model(name: str, *, seed: int = 0, device: str = "cpu") -> tuple[Any, list]:
    """The zoo model of ``name`` built by its own constructor with random weights (for offline tests).

    Works for entries whose constructor builds a timm architecture from code before touching the
    hub (UNI, UNI2-h, GigaPath-Flash, CROWN, CRISP): a ``model_path`` that does not exist makes the
    constructor stop right after building the network, which is taken from the constructor's frame.
    Other entries raise :class:`EncoderUnavailableError` saying what they need (hub config or code,
    a package). ``device="meta"`` builds without allocating weights (shapes only).
    """
    import torch

    entry = zoo_entry(name)
    cls = _registry()[entry.name]
    absent = Path(tempfile.gettempdir()) / "hespotex-no-weights" / f"{entry.name}.absent"
    built: list = []
    zoo_model = None
    with torch.random.fork_rng(devices=[]), _timm_redirect(None, built, random=True, device=device):
        torch.manual_seed(seed)
        try:
            zoo_model = cls(model_path=str(absent))
        except (FileNotFoundError, OSError, ImportError, ValueError, RuntimeError) as err:
            if not built or absent.name not in str(err) or "Repo id" in str(err):
                reason = str(_hub_error(entry, err))
                msg = f"{entry.name!r} cannot be built offline with random weights: {reason}"
                raise EncoderUnavailableError(msg) from err
            zoo_model = _constructor_self(err, cls)
    if zoo_model is None:
        msg = f"Could not recover the network {entry.name!r}'s constructor built."
        raise EncoderUnavailableError(msg)
    zoo_model.model.eval()
    return zoo_model, built


def _constructor_self(err: BaseException, cls: type) -> Any:
    """The instance under construction in the outermost ``__init__`` frame of ``err``'s traceback."""
    tb = err.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "__init__" and isinstance(candidate, cls):
            return candidate
        tb = tb.tb_next
    return None


def load_zoo_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    token: str | None = None,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    _zoo_model: Any = None,
) -> Encoder:
    """A zoo entry as a hespotex :class:`~hespotex.pp._encoders.Encoder` (see the module docstring)."""
    from hespotex.pp._encoder_base import check_input_size, state_fingerprint, wrap_encoder

    entry = zoo_entry(name)
    if _zoo_model is None:
        zoo_model, fingerprint = _construct(entry, weights=weights, token=token)
    else:  # a zoo model already built (tests, random weights)
        zoo_model, fingerprint = _zoo_model, f"params-{state_fingerprint(_zoo_model.model)}"
    spec = _transform_spec(zoo_model)
    module = _module_class()(zoo_model, raw_input=spec["raw_input"])
    size = check_input_size(input_size) if input_size is not None else spec["input_size"]
    enc = wrap_encoder(
        module,
        name=entry.name,
        arch=f"zoo-{entry.name}-lsm{entry.version}",
        fingerprint=fingerprint,
        input_size=size,
        mean=spec["mean"],
        std=spec["std"],
        mean_override=mean,
        std_override=std,
    )
    if entry.output_width is not None and enc.num_features != entry.output_width:
        logger.warning(
            "%s outputs %d features; the zoo registers %d.", entry.name, enc.num_features, entry.output_width
        )
    return replace(enc, entry={**entry.record(), **({"weights": str(weights)} if weights is not None else {})})
