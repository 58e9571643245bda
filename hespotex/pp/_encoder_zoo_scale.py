"""The scale each LazySlide zoo encoder was trained at, with where that is written: one table.

``lazyslide-models`` registers architecture, preprocessing, width and licence, but not the µm/px of
the tiles a model was trained on. :data:`NATIVE_SCALE` holds it for every image encoder of the zoo,
with its source, quoted, and what kind of evidence it is (:attr:`NativeScale.evidence`, the
``mpp_evidence`` column of :func:`hespotex.pp.list_encoders`):

``"publication"``
    the model's card, paper or the authors' own repository states the scale of the training tiles or
    of the input the model expects (authors' recommendations, e.g. CTransPath's "1.0mpp", count here).
``"toolkit"``
    no statement by the authors was found; TRIDENT, the Mahmood lab's WSI toolkit, sets a per-encoder
    ``--patch_size`` and ``--mag`` ("The encoder dictates `--patch_size` and `--mag` [...] Each model
    was trained at a specific resolution", its ``.claude/skills/trident/SKILL.md``), ``--mag M`` being
    ``10 / M`` µm/px (``trident/wsi_objects/WSIPatcher.py`` L142). For the Mahmood lab's own models
    (UNI2-h, CONCH) TRIDENT is the authors' toolkit.
``"derived"``
    a fine-tune of another entry, released as such: it keeps that entry's scale.
``"assumed"``
    nothing was found (``source=None``): 20x (0.5 µm/px), the scale nearly all histology encoders are
    trained at; :func:`hespotex.pp.list_encoders` marks them ``"assumed ..."`` with what was searched.

Models trained on several magnifications (Virchow2, Midnight, MUSK, OpenMidnight) have no single
native scale: hespotex cuts them at 0.5 µm/px (20x), a scale each was trained on and the one TRIDENT
uses, and ``magnification`` says so (``"mixed ... (20x used)"``).

``tile_px`` is the side of the published tile when the source names one that the entry's own
preprocessing then resizes (MADELEINE's 256 px CONCH tiles -> 224; MOOZY's 224 px tiles -> 248 then
a 224 centre crop; Prov-GigaPath's 256 px tiles -> 256 then a 224 centre crop; UNI2-h's and KEEP's
256 px tiles -> 224; CONCH's and CONCH v1.5's 512 px tiles -> 448; GPFM's 512 px tiles at 40x -> 224).
With it, hespotex cuts the same field of view (``tile_px * mpp`` µm) and lets the zoo's transform
resize and crop it as the authors' pipeline did; without it the tile is the transform's own input size
at ``mpp``. Changing a row changes how patches are cut for that encoder: embeddings record the µm/px
they were cut at, so ones made with an older table are re-made, not reused.

Repository snapshots quoted below (commit, date): mahmoodlab/TRIDENT a91fa84 (2026-06-24),
mahmoodlab/TITAN 33042f5 (2025-03-17), Xiyue-Wang/TransPath 26c6194 (2025-03-29), birkhoffkiki/GPFM
4f8be2b (2026-03-11), MedARC-AI/OpenMidnight f7d5a64 (2026-04-06), lilab-stanford/MUSK 714b666
(2025-10-26).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Kinds of evidence behind a row, strongest first (see the module docstring).
EVIDENCE = ("publication", "toolkit", "derived", "assumed")


@dataclass(frozen=True)
class NativeScale:
    """Published training scale of one zoo encoder."""

    mpp: float
    magnification: str
    source: str | None  # None: nothing published was found; the scale is assumed
    tile_px: int | None = None
    note: str | None = None  # why an assumed scale is assumed, when known
    kind: str = "publication"  # for a sourced row: "publication", "toolkit" or "derived"

    def __post_init__(self) -> None:
        if self.kind not in EVIDENCE[:-1]:
            msg = f"NativeScale kind must be one of {EVIDENCE[:-1]}, got {self.kind!r}."
            raise ValueError(msg)

    @property
    def assumed(self) -> bool:
        return self.source is None

    @property
    def evidence(self) -> str:
        """``"publication"``, ``"toolkit"``, ``"derived"`` or ``"assumed"``."""
        return "assumed" if self.source is None else self.kind

    @property
    def label(self) -> str:
        """``mpp_source`` as :func:`hespotex.pp.list_encoders` shows it."""
        if self.source is not None:
            return self.source
        return f"assumed ({self.magnification}; {self.note or 'no published scale found'})"


_ASSUMED = NativeScale(0.5, "20x", None)
_WSISTREAM = "https://ramonkaspar.github.io/wsistream/recipes/"
_TRIDENT_README = "https://github.com/mahmoodlab/TRIDENT/blob/a91fa84/README.md"
_TITAN_README = "https://github.com/mahmoodlab/TITAN/blob/33042f5/README.md"
_WAIV = "https://huggingface.co/papers/2607.22861"


def _trident(line: int, args: str) -> str:
    return f"TRIDENT README ({_TRIDENT_README}#L{line}): `{args}` (--mag M = 10/M µm/px)"


def _assumed(note: str) -> NativeScale:
    return NativeScale(0.5, "20x", None, note=note)


_NOT_IN_TRIDENT = "not in the TRIDENT encoder table"
_SEARCHED = "searched: hub card, paper abstract, authors' repository README"

#: Entries for which no published training scale was found: assumed 20x, with what was searched.
_NO_PUBLISHED_SCALE = {
    "gigapath-flash": _assumed(
        "no scale found for the Flash variant (hub card and arXiv 2607.18218 not readable here; the "
        "prov-gigapath repository snapshot 09d8e87 predates it); Prov-GigaPath itself is 0.5 µm/px"
    ),
    "crisp": _assumed(f"{_SEARCHED} (github.com/FT-ZHOU-ZZZ/CRISP: '50 million image patches', no scale)"),
    "crown": _assumed(f"cytology model; {_SEARCHED} (github.com/LexieK7/CROWN: '10 million cytology images')"),
    "hibou-b": _assumed(
        f"{_SEARCHED} (github.com/HistAI/hibou, huggingface.co/histai/hibou-b); TRIDENT's 224 px at 20x is "
        "set for hibou-L only"
    ),
    "lunit-bt": _assumed(f"{_SEARCHED}; TRIDENT's 224 px at 20x is set for the ViT-S/8 DINO weights only"),
    "lunit-mocov2": _assumed(f"{_SEARCHED}; TRIDENT's 224 px at 20x is set for the ViT-S/8 DINO weights only"),
    "lunit-swav": _assumed(f"{_SEARCHED}; TRIDENT's 224 px at 20x is set for the ViT-S/8 DINO weights only"),
    "lunit-dino-s16": _assumed(f"{_SEARCHED}; TRIDENT's 224 px at 20x is set for the ViT-S/8 DINO weights only"),
    "mstar": _assumed(f"{_SEARCHED} (github.com/Innse/mSTAR: CLAM patch coordinates, no scale); {_NOT_IN_TRIDENT}"),
    "path_orchestra": _assumed(f"{_SEARCHED} (github.com/yanfang-research/PathOrchestra); {_NOT_IN_TRIDENT}"),
    "rudolfv2-s": _assumed(f"{_SEARCHED} (huggingface.co/Aignostics/RudolfV-2-S); {_NOT_IN_TRIDENT}"),
    "rudolfv2-b": _assumed(f"{_SEARCHED} (huggingface.co/Aignostics/RudolfV-2-B); {_NOT_IN_TRIDENT}"),
    "rudolfv2": _assumed(f"{_SEARCHED} (huggingface.co/Aignostics/RudolfV-2); {_NOT_IN_TRIDENT}"),
    "plip": _assumed(
        "image-text pairs from medical Twitter ('A visual--language foundation model for pathology image analysis "
        "using medical Twitter', github.com/PathologyFoundation/plip README L62), no fixed scale"
    ),
    **dict.fromkeys(
        ("quiltnet-b32", "quiltnet-b16", "quiltnet-b16-pmb"),
        _assumed(
            "image-text pairs from 'educational histopathology videos' on YouTube and other sources (Quilt-1M, "
            "github.com/wisdomikezogwo/quilt1m README L10), no fixed scale"
        ),
    ),
    "biomedclip": _assumed("general biomedical image-text model (PMC-15M image-text pairs), no histology scale"),
    "conceptclip": _assumed("general biomedical image-text model, no histology scale found"),
    "medsiglip": _assumed("general medical image model, no histology scale found"),
    "omiclip": _assumed(
        "Loki/OmiCLIP patches follow each Visium slide's spot diameter in pixels (Loki docs, "
        "loki.preprocess.get_spot_diameter_in_pixels), no fixed µm/px found"
    ),
}

#: Training scale of every image encoder of lazyslide-models 0.1.0, by registry name (tests check that
#: the table covers the installed registry exactly).
NATIVE_SCALE: dict[str, NativeScale] = {
    # --- scale stated by the model's card, paper or the authors' repository
    "h-optimus-0": NativeScale(
        0.5, "20x", "model card https://huggingface.co/bioptimus/H-optimus-0: '224x224 images extracted at 0.5 µm/px'"
    ),
    "uni": NativeScale(
        0.5,
        "20x",
        "Chen et al., Nat Med 2024 (https://doi.org/10.1038/s41591-024-02857-3): 256/512 px at 0.5 µm/px; "
        f"{_WSISTREAM}uni/",
    ),
    "gigapath": NativeScale(
        0.5,
        "20x",
        "Xu et al., Nature 2024 (https://doi.org/10.1038/s41586-024-07441-w): 256 px tiles, slides resized to "
        f"0.5 µm/px, Resize 256 -> CenterCrop 224 at inference; {_WSISTREAM}prov-gigapath/",
        tile_px=256,
    ),
    "phikon": NativeScale(
        0.5,
        "20x",
        f"Filiot et al. 2023 (https://doi.org/10.1101/2023.07.21.23292757): 224 px, 20x; {_WSISTREAM}phikon/",
    ),
    "phikonv2": NativeScale(
        0.5,
        "20x",
        f"Filiot et al. 2024 (https://arxiv.org/abs/2409.09173): 224 px tiles at 0.5 µm/px; {_WSISTREAM}phikon/",
    ),
    "virchow": NativeScale(
        0.5, "20x", "Vorontsov et al., Nat Med 2024 (https://doi.org/10.1038/s41591-024-03141-0): 224 px tiles at 20x"
    ),
    "virchow2": NativeScale(
        0.5,
        "mixed 5x-40x (20x used)",
        "Zimmermann et al. 2024 (https://arxiv.org/abs/2408.00738): tiles sampled at 5x, 10x, 20x and 40x",
    ),
    "midnight": NativeScale(
        0.5,
        "mixed 0.25-2 µm/px (0.5 used)",
        "Karasikov et al., MICCAI 2025 (https://arxiv.org/abs/2504.05186): tiles at 0.25, 0.5, 1 and 2 µm/px; "
        + _WSISTREAM,
    ),
    "conch-madeleine": NativeScale(
        1.0,
        "10x",
        "lazyslide-models vision/madeleine.py and Jaume et al. 2024 (https://arxiv.org/abs/2408.02859): CONCH "
        "features of 256 px tiles at 10x",
        tile_px=256,
    ),
    "lunit-dino-s8-moozy": NativeScale(
        0.5, "20x", "lazyslide-models vision/moozy.py: MOOZY's patch features: 224 px tiles at 0.5 µm/px", tile_px=224
    ),
    "titan": NativeScale(
        0.5,
        "20x",
        f"TITAN README ({_TITAN_README}#L61): TITAN builds its grid 'from CONCH v1.5 patch features'; "
        "'patch_size_lv0 [...] is 1024 if slide is 40x, or 512 if slide is 20x', i.e. 512 px tiles at 20x; "
        + _trident(129, "--patch_encoder conch_v15 --patch_size 512 --mag 20"),
        tile_px=512,
    ),
    "conch_v1.5": NativeScale(
        0.5,
        "20x",
        f"TITAN README ({_TITAN_README}#L61): CONCH v1.5 patches, 'patch_size_lv0 [...] is 1024 if slide is 40x, or "
        "512 if slide is 20x', i.e. 512 px tiles at 20x; "
        + _trident(129, "--patch_encoder conch_v15 --patch_size 512 --mag 20"),
        tile_px=512,
    ),
    "ctranspath": NativeScale(
        1.0,
        "10x",
        "TransPath README (https://github.com/Xiyue-Wang/TransPath/blob/26c6194/README.md#L45): 'It is recommended "
        "to first try to extract features at 1.0mpp, and then try other magnifications'",
    ),
    "gpfm": NativeScale(
        0.25,
        "40x",
        "GPFM README (https://github.com/birkhoffkiki/GPFM/blob/4f8be2b/README.md#L36): 'we prefer image with size of "
        "512*512 (extracted from 40X)' (pretraining: 512 px patches at each slide's native level, "
        f"{_WSISTREAM}gpfm/; TRIDENT's setting differs: 224 px at 20x, {_TRIDENT_README}#L142)",
        tile_px=512,
    ),
    "musk": NativeScale(
        0.5,
        "mixed (20x used)",
        "MUSK musk/utils.py (https://github.com/lilab-stanford/MUSK/blob/714b666/musk/utils.py#L61): 'During MUSK "
        "pretraining, we used multi-scale image inputs, i.e., incorporating mixed magnifications'; "
        + _trident(139, "--patch_encoder musk --patch_size 384 --mag 20"),
        tile_px=384,
    ),
    "open-midnight": NativeScale(
        0.5,
        "mixed pyramid levels (20x used)",
        "OpenMidnight prepatching_scripts/create_sample_dataset_txt.py (https://github.com/MedARC-AI/OpenMidnight/"
        "blob/f7d5a64/prepatching_scripts/create_sample_dataset_txt.py#L9): 'patch_size = 224', sampled on every "
        "pyramid level of the TCGA slides ('# Iterate through each level of the slide', L51); "
        + _trident(141, "--patch_encoder openmidnight --patch_size 224 --mag 20"),
        tile_px=224,
    ),
    # --- no statement by the authors found: TRIDENT's per-encoder setting
    "uni2": NativeScale(
        0.5, "20x", _trident(127, "--patch_encoder uni_v2 --patch_size 256 --mag 20"), tile_px=256, kind="toolkit"
    ),
    "conch": NativeScale(
        0.5, "20x", _trident(128, "--patch_encoder conch_v1 --patch_size 512 --mag 20"), tile_px=512, kind="toolkit"
    ),
    "keep": NativeScale(
        0.5, "20x", _trident(134, "--patch_encoder keep --patch_size 256 --mag 20"), tile_px=256, kind="toolkit"
    ),
    "h-optimus-1": NativeScale(
        0.5, "20x", _trident(137, "--patch_encoder hoptimus1 --patch_size 224 --mag 20"), tile_px=224, kind="toolkit"
    ),
    "h0-mini": NativeScale(
        0.5, "20x", _trident(138, "--patch_encoder h0-mini --patch_size 224 --mag 20"), tile_px=224, kind="toolkit"
    ),
    "genbio-pathfm": NativeScale(
        0.5,
        "20x",
        _trident(143, "--patch_encoder genbio-pathfm --patch_size 224 --mag 20"),
        tile_px=224,
        kind="toolkit",
    ),
    "lunit-dino-s8": NativeScale(
        0.5, "20x", _trident(146, "--patch_encoder lunit-vits8 --patch_size 224 --mag 20"), tile_px=224, kind="toolkit"
    ),
    "hibou-l": NativeScale(
        0.5, "20x", _trident(147, "--patch_encoder hibou_l --patch_size 224 --mag 20"), tile_px=224, kind="toolkit"
    ),
    "chief": NativeScale(
        1.0,
        "10x",
        _trident(148, "--patch_encoder ctranspath --patch_size 256 --mag 10")
        + " for 'CTransPath-CHIEF', the CHIEF weights (trident/patch_encoder_models/load.py L424: "
        "CHIEF_CTransPath.pth)",
        tile_px=256,
        kind="toolkit",
    ),
    # --- fine-tunes released as such: the scale of the model they start from
    "mascaret": NativeScale(
        0.5,
        "mixed 0.25-2 µm/px (0.5 used)",
        f"Filiot et al. 2026 ({_WAIV}): 'the fine-tuned versions of Phikon-v2 (Phaet) and Midnight-12k (Mascaret)'; "
        "Midnight's scale (row 'midnight')",
        kind="derived",
    ),
    "phaet": NativeScale(
        0.5,
        "20x",
        f"Filiot et al. 2026 ({_WAIV}): 'the fine-tuned versions of Phikon-v2 (Phaet) and Midnight-12k (Mascaret)'; "
        "Phikon-v2's scale (row 'phikonv2')",
        kind="derived",
    ),
    # --- nothing published found in this survey: assumed 20x (0.5 µm/px)
    **_NO_PUBLISHED_SCALE,
}


def native_scale(name: str) -> NativeScale:
    """The :class:`NativeScale` of zoo entry ``name``; entries newer than this table are assumed 20x."""
    return NATIVE_SCALE.get(name, _ASSUMED)
