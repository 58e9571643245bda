"""Shift benchmark: how hespotex and tuned baselines transfer to sections that differ like new patients do.

Leave-one-section-out on her2st C2-C6 with the 785-gene panel as the modelled genes. The held-out
section is scored as it is (``clean``) and under three emulated shifts:

- ``thinned``: its counts binomially thinned to about 650 counts per spot (the depth of a section of
  another her2st patient); the truth is computed from the thinned counts, the image is unchanged;
- ``restained``: its H&E image perturbed in HED colour space (per-channel gain and shift,
  :func:`skimage.color.rgb2hed` / :func:`~skimage.color.hed2rgb`), slightly blurred (Gaussian,
  radius 1.5 px) and JPEG-recompressed (quality 40), then re-embedded;
- ``rescaled``: its µm/px given 10 % too large, so patches are cut 10 % too small (re-embedded).

Every method is scored under three truths: log1p CP10k with the library over all genes
(``lib_all``), with the library over the scored (modelled) genes (``lib_scored``), and
HEST-Benchmark's log1p of raw counts (``log1p_raw``); mean per-gene Pearson over the top-50 HVG
(ranked on the training sections) and over all modelled genes; mean over folds, and over seeds
with the spread (max - min of the seed means).

Methods: hespotex single models and their ensembles (one member per held-out validation section),
and ridge / retrieval baselines with α and k tuned by leave-one-training-section-out on the training
sections, fitted to the same targets as the model, raw and spatially smoothed (6 nearest spots).

    python benchmarks/shift.py embed            # embeddings per (section, condition, patch size), cached
    python benchmarks/shift.py run --grid select --seeds 0
    python benchmarks/shift.py run --grid final --seeds 0 1 2
    python benchmarks/shift.py report

Work files (embeddings, per-task rows) go to ``--work`` (default /tmp/hespotex_shift); each task
writes its rows when it finishes, so a rerun skips finished tasks.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ENCODER = "efficientnet_lite0.imagenet"
CONDITIONS = ("clean", "thinned", "restained", "rescaled")
IMAGE_CONDITION = {"clean": "clean", "thinned": "clean", "restained": "restained", "rescaled": "rescaled"}
TRUTHS = ("lib_all", "lib_scored", "log1p_raw")
THIN_TARGET = 650.0
RESCALE = 1.10


# ----------------------------------------------------------------------------- data and conditions
def restain_image(rgb: np.ndarray, seed: int) -> np.ndarray:
    """HED gain/shift per channel (seeded), Gaussian blur, JPEG quality 40; uint8 in, uint8 out."""
    from PIL import Image, ImageFilter
    from skimage.color import hed2rgb, rgb2hed

    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.75, 1.25, size=3)
    shift = rng.uniform(-0.03, 0.03, size=3)
    out = np.empty_like(rgb)
    for start in range(0, rgb.shape[0], 1024):  # strips: a float64 copy of the whole slide is 2 GB
        hed = rgb2hed(rgb[start : start + 1024])
        hed = hed * gain + shift
        out[start : start + 1024] = np.clip(hed2rgb(hed) * 255 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=1.5))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def load_section(sid: str, condition: str, data: str | None, work: Path):
    """The section as a sample, with the condition's image and µm/px (counts untouched here)."""
    import hespotex as hx
    from hespotex.datasets._her2st import her2st_path
    from hespotex.io import read_st

    cond = IMAGE_CONDITION[condition]
    root = her2st_path(data)
    image = root / "images" / f"{sid}.jpg"
    if cond == "restained":
        image = work / "images" / f"{sid}_restained.png"
        if not image.is_file():
            from PIL import Image

            image.parent.mkdir(parents=True, exist_ok=True)
            rgb = np.asarray(Image.open(root / "images" / f"{sid}.jpg").convert("RGB"))
            Image.fromarray(restain_image(rgb, seed=int(sid[1:]))).save(image, compress_level=1)
    sdata = read_st(
        root / "counts" / f"{sid}.tsv.gz", root / "spots" / f"{sid}_selection.tsv", image, sample_id=sid, join="inner"
    )
    if cond == "rescaled":
        info = sdata.tables["table"].uns["hespotex_sample"]
        info["microns_per_pixel"] = float(info["microns_per_pixel"]) * RESCALE
    del hx
    return sdata


def embedding_path(work: Path, sid: str, condition: str, patch_um: float, tta: bool) -> Path:
    return work / "emb" / f"{sid}_{IMAGE_CONDITION[condition]}_{patch_um:g}{'_tta' if tta else ''}.npy"


def embed_one(sid: str, condition: str, patch_um: float, tta: bool, data: str | None, work: str) -> str:
    """Embed one (section, image condition, patch size) once; the array goes to ``work/emb``."""
    import hespotex as hx

    hx.settings.progress = False
    hx.settings.num_threads = 1
    work = Path(work)
    path = embedding_path(work, sid, condition, patch_um, tta)
    if path.is_file():
        return str(path)
    t0 = time.perf_counter()
    sdata = load_section(sid, condition, data, work)
    hx.pp.embed(sdata, encoder=ENCODER, patch_um=patch_um, tta=tta, key_added="X", cache=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, sdata.tables["table"].obsm["X"])
    os.replace(tmp, path)
    (path.with_suffix(".seconds")).write_text(f"{time.perf_counter() - t0:.1f}")
    return str(path)


def run_parallel(fn, tasks: list[dict], workers: int) -> list:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        futures = [client.submit(fn, **t, pure=False) for t in tasks]
        return client.gather(futures)


def cmd_embed(args) -> None:
    from hespotex.datasets._her2st import her2st_sections

    sections = her2st_sections(args.data)
    tasks = [
        {"sid": s, "condition": c, "patch_um": p, "tta": t, "data": args.data, "work": args.work}
        for p in args.patch for t in args.tta for c in ("clean", "restained", "rescaled") for s in sections
    ]  # fmt: skip
    t0 = time.perf_counter()
    run_parallel(embed_one, tasks, args.workers)
    print(f"{len(tasks)} embeddings in {(time.perf_counter() - t0) / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["embed", "run", "report"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--work", default="/tmp/hespotex_shift")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patch", type=float, nargs="+", default=[100.0, 200.0])
    parser.add_argument("--tta", type=int, nargs="+", default=[0])
    parser.add_argument("--grid", default="select")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="benchmarks/results/shift.md")
    args = parser.parse_args()
    args.tta = [bool(t) for t in args.tta]
    {"embed": cmd_embed}[args.stage](args)


if __name__ == "__main__":
    main()
