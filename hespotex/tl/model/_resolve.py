"""One way to name a model: a :class:`~hespotex.tl.HESpotEx` / :class:`~hespotex.tl.HESpotExEnsemble`, a saved
folder, or a Hugging Face Hub id ``"hf-hub:owner/name"`` (optionally ``"hf-hub:owner/name@revision"``).

Hub ids are downloaded with :func:`huggingface_hub.snapshot_download`, restricted to the files a saved model
needs (:data:`HUB_FILES`), into the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``). Offline
(``HF_HUB_OFFLINE=1`` or no network) the cached snapshot is used when it is there; otherwise a clear error
says what was tried and what to do. The downloaded folder is then read by the same safe loader as a local
folder (safetensors weights and a validated ``setup.json``; no pickle).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hespotex.tl.model._ensemble import ENSEMBLE_FILE, HESpotExEnsemble
from hespotex.tl.model._model import HESpotEx

logger = logging.getLogger("hespotex")

__all__ = ["HUB_FILES", "HUB_PREFIX", "as_model", "model_folder", "parse_hub_id"]

#: Prefix of a Hugging Face Hub model id (as in timm / open_clip).
HUB_PREFIX = "hf-hub:"
#: Files of a saved model (or ensemble) fetched from the Hub; nothing else in the repo is downloaded.
HUB_FILES = [
    "model.safetensors",
    "setup.json",
    "ensemble.json",
    "README.md",
    "member_*/model.safetensors",
    "member_*/setup.json",
]


def parse_hub_id(text: str) -> tuple[str, str | None]:
    """``("owner/name", revision or None)`` of ``"hf-hub:owner/name[@revision]"``."""
    body = text[len(HUB_PREFIX) :] if text.startswith(HUB_PREFIX) else text
    repo_id, _, revision = body.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (_ and not revision):
        msg = (
            "Expected a Hugging Face Hub model id 'hf-hub:owner/name' or 'hf-hub:owner/name@revision', "
            f"found {text!r}. "
            "Write the repo as owner/name, e.g. 'hf-hub:my-lab/hespotex-her2st'."
        )
        raise ValueError(msg)
    return repo_id, revision or None


def _hub_error(repo_id: str, revision: str | None, err: Exception) -> FileNotFoundError:
    """The error of a Hub id that could not be fetched: what was tried, why it failed, what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    rev = revision or "main"
    if isinstance(err, GatedRepoError):
        why = f"the repository {repo_id!r} is gated: accept its terms on huggingface.co and log in"
    elif isinstance(err, RepositoryNotFoundError):
        why = f"the repository {repo_id!r} does not exist, or it is private or gated and you are not logged in"
    elif isinstance(err, RevisionNotFoundError):
        why = f"the repository {repo_id!r} has no revision {rev!r}"
    elif constants.HF_HUB_OFFLINE:
        why = "this machine is offline (HF_HUB_OFFLINE=1), and that snapshot is not in the local cache"
    else:
        why = (
            "the Hugging Face Hub could not be reached (no network?), and that snapshot is not in the local cache; "
            "or the repository is missing, private or gated"
        )
    msg = (
        f"Cannot load the model 'hf-hub:{repo_id}' (revision {rev!r}): tried to download it from the Hugging Face Hub "
        f"and to find it in the local cache {constants.HF_HUB_CACHE!r}, but {why} "
        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). "
        f"To use it: log in with `hf auth login` (or `huggingface-cli login`) if it is gated or private; "
        f"or, on a machine with network access, download it with `hf download {repo_id} --local-dir my-model` "
        f"(add `--revision {rev}` to pin it) and pass that folder, e.g. `hx.tl.predict(adata, 'my-model')`."
    )
    return FileNotFoundError(msg)


def _download(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of the Hub repo ``repo_id`` at ``revision`` (downloaded or from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, library_name="hespotex", library_version=_version()
        )
    except HFValidationError as err:
        msg = f"Expected a Hugging Face Hub model id 'hf-hub:owner/name', found 'hf-hub:{repo_id}' ({err})."
        raise ValueError(msg) from err
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:  # offline, missing, gated, revision, network
        raise _hub_error(repo_id, revision, err) from err
    folder = Path(folder)
    if not (folder / "setup.json").is_file() and not (folder / "ensemble.json").is_file():
        msg = (
            f"The Hugging Face Hub repo {repo_id!r} (revision {revision or 'main'!r}) holds no hespotex model: "
            f"its snapshot {str(folder)!r} has no setup.json or ensemble.json. Check the repo id, or publish a "
            "folder written by `model.save(path)`."
        )
        raise FileNotFoundError(msg)
    logger.info("Using the model hf-hub:%s (revision %s) from %s.", repo_id, revision or "main", folder)
    return folder


def _version() -> str:
    from hespotex import __version__

    return __version__


def model_folder(model: str | Path) -> Path:
    """The local folder of a saved model named by a path or a Hub id (downloaded or taken from the Hub cache).

    Parameters
    ----------
    model
        A folder written by ``model.save(path)``, or ``"hf-hub:owner/name"`` / ``"hf-hub:owner/name@revision"``.

    Returns
    -------
    The folder (for a Hub id: its snapshot in the Hugging Face cache; read it, do not edit it).
    """
    if isinstance(model, str) and model.startswith(HUB_PREFIX):
        return _download(*parse_hub_id(model))
    if not isinstance(model, str | Path):
        msg = (
            f"Expected a HESpotEx, a HESpotExEnsemble, a saved model folder or a Hub id 'hf-hub:owner/name', "
            f"found a {type(model).__name__}."
        )
        raise TypeError(msg)
    path = Path(model)
    if not path.is_dir():
        hint = ""
        if isinstance(model, str) and model.count("/") == 1 and not path.parent.exists():
            hint = f" If it names a Hugging Face Hub repo, write 'hf-hub:{model}'."
        msg = (
            f"Expected a saved model folder (written by `model.save(path)`) or a Hub id 'hf-hub:owner/name', "
            f"found {str(model)!r}, which is {'a file' if path.exists() else 'not there'}.{hint}"
        )
        raise FileNotFoundError(msg)
    return path


def load_folder(path: str | Path) -> Any:
    """Load a saved folder: an ensemble when it holds ``ensemble.json``, else a :class:`HESpotEx` (safe loaders)."""
    path = Path(path)
    if (path / ENSEMBLE_FILE).is_file():
        return HESpotExEnsemble.load(path)
    return HESpotEx.load(path)


def as_model(model: Any) -> Any:
    """The model named by ``model``: a trained model object as is, else loaded from its folder or the Hub.

    Parameters
    ----------
    model
        A :class:`~hespotex.tl.HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble` (returned as is), a folder
        written by ``model.save(path)`` (str or :class:`~pathlib.Path`), or a Hugging Face Hub id
        ``"hf-hub:owner/name"``, optionally pinned to a branch, tag or commit: ``"hf-hub:owner/name@v1"``.
        Hub ids are fetched with :func:`huggingface_hub.snapshot_download` (only the model's files) when
        online; offline (``HF_HUB_OFFLINE=1`` or no network) the local Hugging Face cache is used.

    Returns
    -------
    The :class:`~hespotex.tl.HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble`. Loading reads safetensors
    weights and a validated ``setup.json`` only (no pickle); see :meth:`hespotex.tl.HESpotEx.load`.
    """
    if isinstance(model, HESpotEx | HESpotExEnsemble):
        return model
    return load_folder(model_folder(model))


def load_model(path: Any) -> HESpotEx | HESpotExEnsemble:
    """Load a model: a saved folder (an ensemble when it holds ``ensemble.json``, else a :class:`HESpotEx`),
    a Hugging Face Hub id ``"hf-hub:owner/name[@revision]"``, or a model object (returned as is); see
    :func:`as_model`.

    Reads the folder (or the Hub cache, downloading when online); writes nothing but the Hub's cache.
    """
    return as_model(path)
