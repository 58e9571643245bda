"""The scale each LazySlide zoo encoder was trained at, with where that is written: one table.

``lazyslide-models`` registers architecture, preprocessing, width and licence, but not the µm/px of
the tiles a model was trained on. :data:`NATIVE_SCALE` holds it for every image encoder of the zoo,
with its source (model card, paper, or the zoo's own documentation). Where no published scale was
found the row says so (``source=None``): those entries are *assumed* to be 20x (0.5 µm/px), the scale
nearly all histology encoders are trained at, and :func:`hespotex.pp.list_encoders` marks them
``"assumed ..."`` in ``mpp_source``.

``tile_px`` is the side of the published tile when the source names one that the entry's own
preprocessing then resizes (MADELEINE's 256 px CONCH tiles -> 224; MOOZY's 224 px tiles -> 248 then
a 224 centre crop; Prov-GigaPath's 256 px tiles -> 256 then a 224 centre crop). With it, hespotex cuts
the same field of view (``tile_px * mpp`` µm) and lets the zoo's transform resize and crop it as the
authors' pipeline did; without it the tile is the transform's own input size at ``mpp``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NativeScale:
    """Published training scale of one zoo encoder."""

    mpp: float
    magnification: str
    source: str | None  # None: nothing published was found; the scale is assumed
    tile_px: int | None = None
    note: str | None = None  # why an assumed scale is assumed, when known

    @property
    def assumed(self) -> bool:
        return self.source is None

    @property
    def label(self) -> str:
        """``mpp_source`` as :func:`hespotex.pp.list_encoders` shows it."""
        if self.source is not None:
            return self.source
        return f"assumed ({self.magnification}; {self.note or 'no published scale found'})"


_ASSUMED = NativeScale(0.5, "20x", None)
_WSISTREAM = "https://ramonkaspar.github.io/wsistream/recipes/"

#: Entries for which no published training scale was found (model cards and papers surveyed for
#: hespotex's issue #12): assumed 20x.
_NO_PUBLISHED_SCALE = (
    "uni2", "conch", "titan", "conch_v1.5", "h-optimus-1", "h0-mini", "gigapath-flash",
    "ctranspath", "crisp", "crown", "chief", "genbio-pathfm", "hibou-b", "hibou-l", "lunit-bt",
    "lunit-mocov2", "lunit-swav", "lunit-dino-s8", "lunit-dino-s16", "mstar", "open-midnight",
    "path_orchestra", "rudolfv2-s", "rudolfv2-b", "rudolfv2", "mascaret", "phaet", "musk", "plip",
    "biomedclip", "conceptclip", "keep", "medsiglip", "omiclip", "quiltnet-b32", "quiltnet-b16",
    "quiltnet-b16-pmb",
)  # fmt: skip

#: Training scale of every image encoder of lazyslide-models 0.1.0, by registry name (tests check that
#: the table covers the installed registry exactly).
NATIVE_SCALE: dict[str, NativeScale] = {
    # --- scale found in a model card, paper or the zoo's documentation
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
    # --- nothing published found in this survey: assumed 20x (0.5 µm/px)
    **dict.fromkeys(_NO_PUBLISHED_SCALE, _ASSUMED),
    "gpfm": NativeScale(
        0.5,
        "20x",
        None,
        note=f"trained on 512 px patches at each slide's native resolution, no fixed scale: {_WSISTREAM}gpfm/",
    ),
}


def native_scale(name: str) -> NativeScale:
    """The :class:`NativeScale` of zoo entry ``name``; entries newer than this table are assumed 20x."""
    return NATIVE_SCALE.get(name, _ASSUMED)
